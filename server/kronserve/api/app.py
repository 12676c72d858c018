"""The app factory: one Service per app, built from Settings, started in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..config import Settings
from ..core.client import EngineClient
from ..errors import KronserveError
from ..metrics import Metrics
from ..service import Service
from .backend import Backend
from .connections import BodyDeadline, deadlines
from .errors import install_error_handlers
from .openai import router as openai_router
from .routes import router

log = logging.getLogger(__name__)
# How `serve` hands an API worker process its settings and the engine's addresses.
WORKER_SETTINGS, WORKER_ENGINE, WORKER_STATUS = "KRONSERVE_WORKER_SETTINGS", "KRONSERVE_ENGINE", "KRONSERVE_STATUS"


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
    app.add_middleware(HeadAsGet)
    return app


class HeadAsGet:
    """HEAD answers every GET route as GET does, without a body (FastAPI routes answer GET only: HEAD was 405;
    load generators such as aiperf probe `HEAD /metrics` first). Elsewhere, HEAD gets the 405 GET would."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


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
    """Run the API under uvicorn, the engine in its own process (supervised) unless `engine_process` is off.

    SIGTERM flips readiness at once, then drains accepted work; a start-up that fails, or an engine crash loop,
    exits non-zero with the reason."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.admin_token is None:
        log.warning(
            "no admin token (KRONSERVE_ADMIN_TOKEN unset or empty): anyone who reaches %s:%d can upload and delete "
            "adapters",
            settings.host,
            settings.port,
        )
    if not settings.engine_process:
        import torch

        torch.set_num_threads(settings.intra_op_threads())
        _serve_app(settings, create_app(settings))
        return
    from ..core.supervisor import Supervisor

    fatal: list[str] = []
    stop_api: list[Callable[[], None]] = []

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        for stop in stop_api:
            stop()

    supervisor = Supervisor(settings, on_fatal)
    supervisor.start()
    try:
        if settings.api_workers > 1:
            _serve_workers(settings, supervisor, stop_api)
        else:
            client = EngineClient(settings, supervisor.engine_address, supervisor.status_address)
            _serve_app(settings, create_app(settings, client), stop_api)
    finally:
        supervisor.stop()
    if fatal:
        raise KronserveError(fatal[0] if fatal[0].startswith("crash loop") else f"start-up failed: {fatal[0]}")


def worker_app() -> FastAPI:
    """One of `api_workers` API processes (uvicorn's factory): settings and the engine's addresses from its parent."""
    settings = Settings.model_validate_json(os.environ[WORKER_SETTINGS])
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    client = EngineClient(settings, os.environ[WORKER_ENGINE], os.environ[WORKER_STATUS])
    return create_app(settings, client)


def _serve_workers(settings: Settings, supervisor: Any, stop_api: list[Callable[[], None]]) -> None:
    """`api_workers` uvicorn processes on one listening socket (uvicorn's own multiprocess supervisor), each a client
    of the one engine. They drain as uvicorn does on SIGTERM (finish what they accepted, up to the timeout)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    data = settings.model_dump(mode="json")
    data["admin_token"] = settings.admin_token.get_secret_value() if settings.admin_token else None
    os.environ[WORKER_SETTINGS] = json.dumps(data)
    os.environ[WORKER_ENGINE], os.environ[WORKER_STATUS] = supervisor.engine_address, supervisor.status_address
    options = _uvicorn_options(settings) | {"http": "kronserve.api.connections:WorkerDeadlines"}
    config = uvicorn.Config("kronserve.api.app:worker_app", factory=True, workers=settings.api_workers, **options)
    workers = Multiprocess(config, sockets=[config.bind_socket()])
    stop_api.append(workers.should_exit.set)
    try:
        workers.run()
    finally:  # a worker left running (uvicorn failed to start the others) would keep this process from exiting
        for worker in workers.processes:
            if worker.process.is_alive():
                worker.kill()


def _uvicorn_options(settings: Settings) -> dict[str, Any]:
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": int(settings.request_timeout_s) + 5,
        "timeout_keep_alive": settings.keepalive_timeout_s,
        "limit_concurrency": settings.max_connections,
        "http": deadlines(settings.header_timeout_s, settings.stream_write_timeout_s),
    }


def _serve_app(settings: Settings, app: FastAPI, stop_api: list[Callable[[], None]] | None = None) -> None:
    import uvicorn

    service = app.state.backend

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

    config = uvicorn.Config(app, **_uvicorn_options(settings))
    # uvicorn re-raises the signal it drained on; after a clean SIGTERM drain that must be a no-op (exit 0).
    signal.signal(signal.SIGTERM, lambda *_: None)
    server = DrainingServer(config)
    app.state.on_start_failure = lambda: setattr(server, "should_exit", True)
    if stop_api is not None:
        stop_api.append(app.state.on_start_failure)
    server.run()
    if service.startup_error is not None and stop_api is None:
        raise KronserveError(f"start-up failed: {service.startup_error}")
