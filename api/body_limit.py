"""A request body size limit (Starlette and FastAPI have none): larger bodies get 413.

It is plain ASGI middleware in front of everything else, so the limit holds before any parsing: a
``Content-Length`` above the limit is refused without reading the body, and a body sent without one
(chunked) is counted while it arrives and refused as soon as it passes the limit. The body read so far
is then replayed to the application in one message; the API needs the whole body anyway, and the limit
bounds the memory it takes.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import problem_response


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._too_large(scope, receive, send, declared)
            return

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away; there is nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(scope, receive, send, None)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body, only http.disconnect remains

        await self.app(scope, replay, send)

    async def _too_large(
        self, scope: Scope, receive: Receive, send: Send, declared: int | None
    ) -> None:
        size = f"{declared} bytes" if declared is not None else "more than that"
        response = problem_response(
            413,
            f"The request body is too large: the limit is {self.max_body_bytes} bytes and this "
            f"request sent {size}. Send fewer or smaller reports per request.",
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
