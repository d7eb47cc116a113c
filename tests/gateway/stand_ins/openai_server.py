#!/usr/bin/env python3
"""Stand-in for an OpenAI-compatible model server (llama-server, vLLM).

It accepts any command line, takes the port from ``--port`` and serves on
127.0.0.1. Environment variables set its behaviour:

- STAND_IN_RECORD: file that receives the pid, the argv and the environment
  variable names as JSON.
- STAND_IN_READY_AFTER: seconds during which GET /health returns 503
  (default 0). After that it returns 200.
- STAND_IN_CHILD_PID_FILE: start a child process that sleeps, in the same
  process group, and write its pid to this file.
- STAND_IN_IGNORE_SIGTERM: when "1", SIGTERM is ignored, so only SIGKILL
  stops the server.

Only the standard library is used, so any Python 3 can run it.
"""

import json
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def read_port(argv: list[str]) -> int:
    return int(argv[argv.index("--port") + 1])


def record_invocation(path: str) -> None:
    record = {
        "pid": os.getpid(),
        "argv": sys.argv[1:],
        "environment": sorted(os.environ),
    }
    with open(path, "w", encoding="utf-8") as file:
        json.dump(record, file)


def start_child(pid_file: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        stdin=subprocess.DEVNULL,
    )
    with open(pid_file, "w", encoding="utf-8") as file:
        file.write(str(child.pid))


class Handler(BaseHTTPRequestHandler):
    ready_at = 0.0

    def do_GET(self) -> None:
        if self.path == "/health":
            ready = time.monotonic() >= self.ready_at
            status = 200 if ready else 503
            self.send_json(status, {"status": "ok" if ready else "loading"})
        elif self.path == "/v1/models":
            model = {"id": "stand-in", "object": "model", "owned_by": "tests"}
            self.send_json(200, {"object": "list", "data": [model]})
        else:
            self.send_json(404, {"error": {"message": "not found"}})

    def send_json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write("stand-in: " + format % args + "\n")


def main() -> None:
    if os.environ.get("STAND_IN_RECORD"):
        record_invocation(os.environ["STAND_IN_RECORD"])
    if os.environ.get("STAND_IN_CHILD_PID_FILE"):
        start_child(os.environ["STAND_IN_CHILD_PID_FILE"])
    if os.environ.get("STAND_IN_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))

    delay = float(os.environ.get("STAND_IN_READY_AFTER", "0"))
    Handler.ready_at = time.monotonic() + delay
    server = ThreadingHTTPServer(("127.0.0.1", read_port(sys.argv)), Handler)
    print(f"stand-in: listening on port {server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
