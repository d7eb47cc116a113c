"""Measure the time from an activation to a gateway's live view serving it.

Each backend runs `--runs` activations. One store object activates a new
version, and an `ActivePrompts` on a second store object (as in another
process) is timed until its snapshot contains that version:

- disk: `DiskPromptStore`, polled every `--poll-interval` seconds;
- redis-poll: `RedisPromptStore` with the change channel turned off;
- redis-push: `RedisPromptStore` with the change channel, the default.

The Redis backends start a real `redis-server` (Debian package redis-server)
on a free loopback port in a temporary directory. The script prints the
median, 95th percentile and maximum per backend, and the push/poll ratio of
the medians.

    .venv/bin/python bench/activation_latency.py [--runs 40] [--poll-interval 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.store import ActivePrompts, DiskPromptStore, PromptStore  # noqa: E402
from gateway.store.redis import RedisPromptStore  # noqa: E402
from tests.redis_server import start_redis_server  # noqa: E402

StoreFactory = Callable[[], PromptStore]


async def measure(
    open_store: StoreFactory, runs: int, poll_interval: float, push: bool
) -> list[float]:
    """Return the seconds from each activation until the live view serves it."""
    writer = open_store()
    first = writer.create("The first instruction.", [])
    writer.activate(first.version)
    prompts = ActivePrompts(open_store(), poll_interval, push=push)
    await prompts.start()
    delays: list[float] = []
    try:
        for run in range(runs):
            version = writer.create(f"Instruction number {run}.", [])
            # Spread the activations over the poll cycle, as real ones are.
            await asyncio.sleep(poll_interval * ((run * 7919) % 100) / 100)
            started = time.perf_counter()
            writer.activate(version.version)
            while (served := prompts.active.get("*")) is None or (
                served.version != version.version
            ):
                await asyncio.sleep(0.0005)
            delays.append(time.perf_counter() - started)
    finally:
        await prompts.stop()
        writer.close()
    return delays


def summary(name: str, delays: list[float]) -> str:
    ordered = sorted(delays)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    return (
        f"{name:<11} median {statistics.median(ordered) * 1000:7.1f} ms   "
        f"p95 {p95 * 1000:7.1f} ms   max {ordered[-1] * 1000:7.1f} ms"
    )


@contextmanager
def redis_url(directory: Path) -> Iterator[str]:
    server = start_redis_server(directory / "redis")
    try:
        yield server.url
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--poll-interval", type=float, default=0.2)
    options = parser.parse_args()
    runs, interval = options.runs, options.poll_interval

    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        results: dict[str, list[float]] = {}
        results["disk"] = asyncio.run(
            measure(lambda: DiskPromptStore(directory / "disk"), runs, interval, False)
        )
        with redis_url(directory) as url:
            results["redis-poll"] = asyncio.run(
                measure(
                    lambda: RedisPromptStore(url, prefix="poll"), runs, interval, False
                )
            )
            results["redis-push"] = asyncio.run(
                measure(
                    lambda: RedisPromptStore(url, prefix="push"), runs, interval, True
                )
            )

    print(f"{runs} activations per backend, poll interval {interval} s")
    for name, delays in results.items():
        print(summary(name, delays))
    ratio = statistics.median(results["redis-push"]) / statistics.median(
        results["redis-poll"]
    )
    print(f"redis push/poll median ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
