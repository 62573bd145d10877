"""The HTTP edge: uvicorn settings that close idle and half-sent connections, and an ASGI guard
that caps request bodies (413) and turns off Gradio's upload route (the UI needs no uploads).

``uvicorn_config(app, host, port)`` is what ``ccaserve serve`` and the tests run.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_BODY_BYTES = 64 * 1024  # a generate request is < 1 KB of JSON
HEADER_TIMEOUT_S = 10.0  # a connection must finish its request headers this soon after opening or going idle
KEEP_ALIVE_TIMEOUT_S = 5.0  # an idle keep-alive connection is closed after this


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline: a connection that sends nothing, or only part
    of its request headers, is closed after ``header_timeout_s`` (uvicorn waits forever)."""

    header_timeout_s = HEADER_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._between_requests():
            self._arm_header_timer()
        super().data_received(data)
        if not self._between_requests():  # the headers are in: the request's own timeouts apply now
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._between_requests() and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                   header_timeout_s: float = HEADER_TIMEOUT_S) -> uvicorn.Config:
    protocol = type("Guarded", (GuardedH11Protocol,), {"header_timeout_s": header_timeout_s})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                          timeout_keep_alive=int(KEEP_ALIVE_TIMEOUT_S), h11_max_incomplete_event_size=16 * 1024)


class _BodyTooLarge(HTTPException):
    """An HTTPException so that FastAPI's body parsing passes it on as a 413, not a 400."""

    def __init__(self, limit: int):
        super().__init__(status_code=413, detail=f"request body over {limit} bytes")


class RequestGuard:
    """ASGI middleware: 413 for bodies over ``max_body_bytes`` (declared or streamed), 403 for
    Gradio's upload route."""

    def __init__(self, app: Any, max_body_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path.rstrip("/").endswith("/upload") and path.startswith("/ui"):
            return await _reply(send, 403, "uploads are disabled: the UI takes no files")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_body_bytes
            except ValueError:
                return await _reply(send, 400, "invalid Content-Length")
            if too_large:
                return await _reply(send, 413, f"request body over {self.max_body_bytes} bytes")
        received = 0
        started = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge(self.max_body_bytes)
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _reply(send, 413, f"request body over {self.max_body_bytes} bytes")


async def _reply(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
