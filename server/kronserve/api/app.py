"""The app factory: one Service per app, built from Settings, started in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..config import Settings
from ..errors import KronserveError
from ..metrics import Metrics
from ..service import Service
from .backend import Backend
from .connections import BodyDeadline, head_deadline
from .errors import install_error_handlers
from .openai import router as openai_router
from .routes import router

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> FastAPI:
    """The `/v1` app over `backend` (default: a single-process `Service` built from `settings`)."""
    settings = settings or Settings()
    service = backend or Service(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load in the background: /healthz answers while the backbone loads; /readyz waits for it.
        starting = asyncio.create_task(service.start())
        starting.add_done_callback(lambda task: _on_started(app, task))
        try:
            yield
        finally:
            if not starting.done():
                starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
            await service.stop()

    # FastAPIOffline: /docs and /redoc from Swagger UI and ReDoc files shipped in the wheel, not from a CDN, so the
    # docs work on a machine without internet (assets under /static-offline-docs).
    app = FastAPIOffline(
        title="kronserve",
        version=__version__,
        description="Thousands of Compacter-family adapters on one frozen T5, mixed per row in every batch. "
        'Every error is JSON `{"error": {"code", "message"}}`; PUT and DELETE need the admin token when the '
        "server sets one (Authorize).",
        lifespan=lifespan,
    )
    app.state.backend = service
    service.metrics.queue_capacity.set(service.settings.queue_size)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(openai_router)

    app.add_middleware(JsonBodyLimit, limit=settings.max_request_bytes, metrics=service.metrics)
    app.add_middleware(BodyDeadline, timeout_s=settings.body_timeout_s)
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    return app


class JsonBodyLimit:
    """413 for a predict, score or OpenAI body over `limit` bytes, decided while it streams in: a huge body is never
    buffered or parsed (uploads have their own limit, `max_upload_bytes`)."""

    PATHS = frozenset({"/v1/predict", "/v1/score", "/v1/completions", "/v1/chat/completions"})

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.PATHS:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, send, f"request body of {int(declared)} bytes exceeds {self.limit} bytes")
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(scope, send, f"request body exceeds {self.limit} bytes")
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, message: str) -> None:
        self.metrics.failures.labels(scope["path"], "payload_too_large").inc()
        body = json.dumps({"error": {"code": "payload_too_large", "message": message}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _on_started(app: FastAPI, task: asyncio.Task[None]) -> None:
    """A start-up that failed can never become ready: tell whoever runs the app (`serve` sets `on_start_failure`),
    so the process exits non-zero instead of answering /readyz 503 forever."""
    if task.cancelled() or task.exception() is None:
        return
    stop = getattr(app.state, "on_start_failure", None)
    if stop is not None:
        stop()


class RequestMetrics:
    """Requests by endpoint and status, and latency: a plain ASGI middleware (cheaper than BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")  # the router fills scope["route"]
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


def serve(settings: Settings) -> None:
    """Run the app under uvicorn; SIGTERM flips readiness at once, then drains accepted work."""
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.admin_token is None:
        log.warning(
            "no admin token (KRONSERVE_ADMIN_TOKEN unset or empty): anyone who reaches %s:%d can upload and delete "
            "adapters",
            settings.host,
            settings.port,
        )
    app = create_app(settings)
    service: Service = app.state.backend

    class DrainingServer(uvicorn.Server):
        """First SIGTERM: keep listening, answer /readyz 503 and refuse new work until accepted work is done,
        then shut down as uvicorn does. A second signal, or SIGINT, stops at once."""

        def handle_exit(self, sig: int, frame: object) -> None:
            if sig != signal.SIGTERM or service.draining:
                super().handle_exit(sig, frame)  # type: ignore[arg-type]
                return
            service.begin_drain()
            threading.Thread(target=self._exit_when_drained, args=(sig, frame), daemon=True).start()

        def _exit_when_drained(self, sig: int, frame: object) -> None:
            service.wait_drained(timeout_s=settings.request_timeout_s)
            super().handle_exit(sig, frame)  # type: ignore[arg-type]

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
        timeout_keep_alive=settings.keepalive_timeout_s,
        limit_concurrency=settings.max_connections,
        http=head_deadline(settings.header_timeout_s),
    )
    # uvicorn re-raises the signal it drained on; after a clean SIGTERM drain that must be a no-op (exit 0).
    signal.signal(signal.SIGTERM, lambda *_: None)
    server = DrainingServer(config)
    app.state.on_start_failure = lambda: setattr(server, "should_exit", True)
    server.run()
    if service.startup_error is not None:
        raise KronserveError(f"start-up failed: {service.startup_error}")
