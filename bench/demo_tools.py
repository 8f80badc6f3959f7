"""A stand-in for a team's ticketing, paging and webhook systems, for `sluice run` on a laptop.

The example tenant configs point their tools at ``${SLUICE_TOOLS_URL}``; `sluice run` starts this
server on loopback (``python -m bench.demo_tools --port N``, as a process of its own) and sets that
variable, so the sample exceptions exercise real HTTP tool calls. It accepts every POST, answers
like the systems it stands in for (a ticket id for /tickets), keeps the last requests in memory
(:attr:`DemoToolServer.calls`, for a caller that runs it in-process, as `sluice bench
--tools http` does) and answers ``GET /healthz``
so a starter can wait for it. Point SLUICE_TOOLS_URL at your real systems (or edit the tenant
files) to use Sluice for real.
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class DemoToolServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.calls: deque[dict[str, Any]] = deque(maxlen=1000)
        self._ids = itertools.count(1)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {"unparsed": raw.decode(errors="replace")}
                server.calls.append(
                    {
                        "path": self.path,
                        "idempotency_key": self.headers.get("Idempotency-Key"),
                        "body": body,
                    }
                )
                answer: dict[str, Any] = {"ok": True}
                status = 200
                if self.path.rstrip("/").endswith("/tickets"):
                    answer, status = {"id": f"DEMO-{next(server._ids)}"}, 201
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                status = 200 if self.path.rstrip("/") == "/healthz" else 404
                data = json.dumps({"ok": status == 200}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return  # quiet: `sluice run` prints its own summary

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> DemoToolServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM or SIGINT (Ctrl-C), then stop cleanly with status 0."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.demo_tools", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    server = DemoToolServer(args.host, args.port).start()
    try:
        stop.wait()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
