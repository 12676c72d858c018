"""What a slow or vanished client may hold: deadlines for the request head, body and answer, on top of uvicorn's own.

uvicorn times out idle keep-alive connections and caps concurrency (`timeout_keep_alive`,
`limit_concurrency`, passed from Settings in `app.serve`), but it waits forever for a request head
that trickles in, for a body that stalls and for a client that stops reading its answer. `Deadlines`
closes a connection whose request head is not complete `header_timeout_s` after its first byte (or
after the connection opened), and aborts one whose answer has not moved for `stream_write_timeout_s`;
`BodyDeadline` answers 408 `body_timeout` when no body bytes came for `body_timeout_s`, and 499
`client_closed` when the client leaves mid-body (never a 5xx: nothing went wrong on our side).
"""

from __future__ import annotations

import asyncio
import json
import os

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

BODY_TIMEOUT = 408
# nginx's "client closed request": the client left before the answer; counted apart so it never looks like a 5xx.
CLIENT_CLOSED = 499


class BodyDeadline:
    """ASGI middleware: each read of a request body waits at most `timeout_s`; a disconnect mid-body is 499.

    Raised as HTTPExceptions, which FastAPI passes through its body parsing (other errors there become 400).
    Once the body is complete, reads are left alone (Starlette waits on them for disconnects).
    """

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        complete = False

        async def receive_in_time() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout(self.timeout_s):
                    message = await receive()
            except TimeoutError:
                detail = f"no request body bytes for {self.timeout_s:g} s"
                raise HTTPException(BODY_TIMEOUT, detail, headers={"Connection": "close"}) from None
            if message["type"] == "http.disconnect":
                raise HTTPException(CLIENT_CLOSED, "the client closed the connection before sending the whole body")
            complete = not message.get("more_body", False)
            return message

        await self.app(scope, receive_in_time, send)


class Deadlines(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus two deadlines:
    - a request head must be complete `header_timeout_s` after the connection opens, or after its first byte on a
      kept-alive connection (until then keep-alive's timer runs); else the connection is closed;
    - an answer being written must move: once the transport's buffer is full (the client reads nothing, and the
      kernel's buffers are full too) and stays full for `write_timeout_s`, the connection is aborted. uvicorn
      would wait forever; the aborted stream's generator is closed, so its request leaves the engine."""

    header_timeout_s = 10.0
    write_timeout_s = 30.0
    _head_timer: asyncio.TimerHandle | None = None
    _write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def on_message_begin(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_too_slow)
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._head_timer = _cancelled(self._head_timer)
        super().on_headers_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout_s, self._write_stuck)

    def resume_writing(self) -> None:
        self._write_timer = _cancelled(self._write_timer)
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_timer = _cancelled(self._head_timer)
        self._write_timer = _cancelled(self._write_timer)
        super().connection_lost(exc)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.logger.info("closing a connection whose request head took over %g s", self.header_timeout_s)
            self.transport.close()

    def _write_stuck(self) -> None:
        self._write_timer = None
        self.logger.info("dropping a connection that took no bytes of its answer for %g s", self.write_timeout_s)
        self.transport.abort()  # close() would wait to flush what the client does not read


def _cancelled(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


def deadlines(header_timeout_s: float, write_timeout_s: float) -> type[Deadlines]:
    """The protocol class uvicorn builds per connection, with these deadlines (uvicorn passes no extra arguments)."""
    return type(
        "DeadlinesProtocol", (Deadlines,), {"header_timeout_s": header_timeout_s, "write_timeout_s": write_timeout_s}
    )


_WORKER_SETTINGS = json.loads(os.environ.get("KRONSERVE_WORKER_SETTINGS", "{}"))


class WorkerDeadlines(Deadlines):
    """`deadlines` for `api_workers` processes, which uvicorn starts by pickling their config (a class made on the
    fly cannot be): the deadlines come from the settings `serve` hands the workers in its environment."""

    header_timeout_s = float(_WORKER_SETTINGS.get("header_timeout_s", Deadlines.header_timeout_s))
    write_timeout_s = float(_WORKER_SETTINGS.get("stream_write_timeout_s", Deadlines.write_timeout_s))
