"""A real HTTP server on loopback that plays the tool endpoints and the LLM endpoint in tests.

It listens on 127.0.0.1 with a free port and serves from its own threads, so both in-process tests
(httpx in the test's event loop) and worker subprocesses in integration tests reach it over real
sockets. Every request is recorded; failures, odd answers and delays are programmed per path prefix.

Normal answers: ``.../tickets`` -> 201 ``{"id": "T-<n>"}`` (the same Idempotency-Key gets the same
id, as a ticket system that honours the key would answer), ``.../chat/completions`` -> an
OpenAI-shaped completion whose content is set by :meth:`MockHTTPServer.set_llm_reply`, anything else
-> 200 ``{"ok": true}``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

DEFAULT_LLM_REPLY: dict[str, Any] = {
    "severity": "medium",
    "category": "uncategorized",
    "note": "mock classification",
}


class Headers(Mapping[str, str]):
    """Request headers with case-insensitive lookup (``headers["idempotency-key"]``)."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = {name.lower(): value for name, value in items}

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: Headers
    body: bytes
    json: Any
    at: float = field(default_factory=time.time)

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("idempotency-key")


@dataclass
class _Rule:
    prefix: str
    times: int
    status: int = 0
    retry_after: float | str | None = None
    seconds: float = 0.0
    body: Any = None


class MockHTTPServer:
    """Loopback HTTP server for tests; use as a context manager or call start() and stop()."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._requests: list[RecordedRequest] = []
        self._failures: list[_Rule] = []
        self._delays: list[_Rule] = []
        self._tickets: dict[str, str] = {}
        self._ticket_count = 0
        self._llm_reply: str = json.dumps(DEFAULT_LLM_REPLY)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> MockHTTPServer:
        if self._server is not None:
            raise RuntimeError("the mock HTTP server is already running")
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="mock-http",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; delayed answers still pending are released at once so nothing hangs."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()  # joins the request threads
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> MockHTTPServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the mock HTTP server is not running; call start() first")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---------------------------------------------------------------------------- programming

    def fail(
        self, path_prefix: str, status: int, times: int = 1, retry_after: float | str | None = None
    ) -> None:
        """Answer ``status`` to the next ``times`` requests under ``path_prefix``. ``retry_after``
        is sent as the Retry-After header: seconds, or a string (an HTTP-date) sent verbatim."""
        with self._lock:
            self._failures.append(_Rule(path_prefix, times, status=status, retry_after=retry_after))

    def respond(self, path_prefix: str, status: int, body: Any, times: int = 1) -> None:
        """Answer ``status`` with ``body`` to the next ``times`` requests under ``path_prefix``:
        for answers a real endpoint might give that the normal ones do not (a str is sent as is)."""
        with self._lock:
            self._failures.append(_Rule(path_prefix, times, status=status, body=body))

    def delay(self, path_prefix: str, seconds: float, times: int = 1) -> None:
        """Wait ``seconds`` before answering the next ``times`` requests under ``path_prefix``."""
        with self._lock:
            self._delays.append(_Rule(path_prefix, times, seconds=seconds))

    def set_llm_reply(self, reply: dict[str, Any] | str) -> None:
        """The content of the next chat completions; a str is sent as is (malformed on purpose)."""
        with self._lock:
            self._llm_reply = reply if isinstance(reply, str) else json.dumps(reply)

    def heal(self) -> None:
        """Forget programmed failures and delays, keep the recorded requests: the tool recovered."""
        with self._lock:
            self._failures.clear()
            self._delays.clear()

    def reset(self) -> None:
        """Forget recorded requests, programmed behaviour, tickets and the LLM reply."""
        with self._lock:
            self._requests.clear()
            self._failures.clear()
            self._delays.clear()
            self._tickets.clear()
            self._ticket_count = 0
            self._llm_reply = json.dumps(DEFAULT_LLM_REPLY)

    # ------------------------------------------------------------------------------ inspection

    def calls(self, path_prefix: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [
                r for r in self._requests if path_prefix is None or r.path.startswith(path_prefix)
            ]

    def calls_by_idempotency_key(self) -> Counter[str]:
        with self._lock:
            return Counter(
                r.idempotency_key for r in self._requests if r.idempotency_key is not None
            )

    def wait_for_calls(
        self, count: int, path_prefix: str | None = None, timeout: float = 30.0
    ) -> list[RecordedRequest]:
        """Wait until at least ``count`` requests under ``path_prefix`` arrived (from a worker
        process, say); fail with what did arrive if they do not come in time."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.calls(path_prefix)
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"expected {count} request(s) under {path_prefix or '/'} within {timeout}s, "
                    f"got {len(found)}: {[(r.method, r.path) for r in found]}"
                )
            time.sleep(0.02)

    # ---------------------------------------------------------------------- request handling

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _take(self, rules: list[_Rule], path: str) -> _Rule | None:
        with self._lock:
            for rule in rules:
                if rule.times > 0 and path.startswith(rule.prefix):
                    rule.times -= 1
                    return rule
        return None

    def _answer(self, request: RecordedRequest) -> tuple[int, dict[str, str], Any]:
        delay = self._take(self._delays, request.path)
        if delay is not None:
            self._stopping.wait(delay.seconds)
        failure = self._take(self._failures, request.path)
        if failure is not None:
            headers = {}
            if failure.retry_after is not None:
                headers["Retry-After"] = (
                    failure.retry_after
                    if isinstance(failure.retry_after, str)
                    else f"{failure.retry_after:g}"
                )
            body = failure.body
            if body is None:
                body = {"error": f"mock failure {failure.status}"}
            return failure.status, headers, body
        path = request.path.split("?", 1)[0].rstrip("/")
        if request.method == "POST" and path.endswith("/tickets"):
            return 201, {}, {"id": self._ticket_id(request.idempotency_key)}
        if path.endswith("/chat/completions"):
            return 200, {}, self._completion(request)
        return 200, {}, {"ok": True}

    def _ticket_id(self, key: str | None) -> str:
        with self._lock:
            if key is not None and key in self._tickets:
                return self._tickets[key]
            self._ticket_count += 1
            ticket_id = f"T-{self._ticket_count}"
            if key is not None:
                self._tickets[key] = ticket_id
            return ticket_id

    def _completion(self, request: RecordedRequest) -> dict[str, Any]:
        with self._lock:
            content = self._llm_reply
        model = request.json.get("model", "mock") if isinstance(request.json, dict) else "mock"
        return {
            "id": f"chatcmpl-mock-{len(self.calls())}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }


def unused_url() -> str:
    """A loopback url nothing listens on, for connection-refused tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class _Server(ThreadingHTTPServer):
    # Non-daemon request threads, so server_close() joins them and nothing outlives stop().
    daemon_threads = False
    block_on_close = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        owner: MockHTTPServer,
    ) -> None:
        self.owner = owner
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out has closed its socket before a delayed answer: that is the test.
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a client that connects and never sends must not block stop()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        request = RecordedRequest(
            method=self.command,
            path=self.path,
            headers=Headers(list(self.headers.items())),
            body=body,
            json=parsed,
        )
        owner = self.server.owner
        owner._record(request)
        status, headers, answer = owner._answer(request)
        data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass

    do_POST = _handle
    do_GET = _handle
    do_PUT = _handle
    do_PATCH = _handle
    do_DELETE = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass
