"""The one object the app holds: settings, metrics, engine (backbone, bank, registry), scheduler.

Built in the app factory and reached through FastAPI dependencies; nothing is module-global. The
backbone loads on a thread after the server starts, so `/healthz` answers at once and `/readyz`
turns 200 only once the backbone is loaded and the store scanned.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .backbone import default_backbone, load_backbone
from .config import Settings
from .engine import Engine
from .errors import NotReady
from .formats.native import AdapterFile, dumps
from .methods import init_tensors, preset
from .metrics import Metrics
from .scheduler import Scheduler
from .store import LocalStore
from .t5_sites import base_norms

log = logging.getLogger(__name__)
DEMO_TASK = "demo"


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(settings.metrics_max_tasks)
        self._engine: Engine | None = None
        self._scheduler: Scheduler | None = None
        self.draining = False
        self.startup_error: str | None = None

    @property
    def ready(self) -> bool:
        return self._scheduler is not None and not self.draining

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise NotReady("the backbone is still loading", retry_after=5)
        return self._engine

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None or self.draining:
            raise NotReady("the server is starting or shutting down", retry_after=5)
        return self._scheduler

    async def start(self) -> None:
        try:
            engine = await asyncio.to_thread(self._build_engine)
        except Exception as e:
            self.startup_error = f"{type(e).__name__}: {e}"
            log.exception("start-up failed")
            raise
        s = self.settings
        scheduler = Scheduler(
            engine,
            self.metrics,
            s.max_batch_rows,
            s.max_batch_tokens,
            s.batch_wait_ms,
            s.queue_size,
            s.request_timeout_s,
        )
        scheduler.start()
        self._engine, self._scheduler = engine, scheduler
        log.info("ready: backbone %s, %d adapters", engine.backbone.source, len(engine.registry.entries()))

    def begin_drain(self) -> None:
        """SIGTERM: readiness goes 503 at once and new requests are refused; accepted ones finish."""
        self.draining = True
        if self._scheduler is not None:
            self._scheduler.stop_accepting()

    def wait_drained(self, timeout_s: float) -> None:
        """Block (off the event loop) until no accepted request is queued or running, or timeout."""
        deadline = time.monotonic() + timeout_s
        while self._scheduler is not None and not self._scheduler.idle and time.monotonic() < deadline:
            time.sleep(0.05)

    async def stop(self) -> None:
        self.begin_drain()
        if self._scheduler is not None:
            await self._scheduler.drain_and_stop()

    def _build_engine(self) -> Engine:
        s = self.settings
        source = s.backbone or default_backbone(s.cache_dir)
        backbone = load_backbone(source, s.device, s.dtype)
        engine = Engine(
            backbone,
            store=LocalStore(s.store, s.fault_point),
            metrics=self.metrics,
            max_input_tokens=s.max_input_tokens,
            max_adapters=s.max_adapters,
        )
        engine.registry.load_store()
        if s.backbone is None and DEMO_TASK not in {e.task for e in engine.registry.entries()}:
            self._add_demo_adapter(engine)
        return engine

    @staticmethod
    def _add_demo_adapter(engine: Engine) -> None:
        """The README's first curl needs a task: a Compacter++ with the paper's init (near-identity)."""
        spec = preset("compacter++")
        norms = {k: v.float() for k, v in base_norms(engine.backbone.model).items()}
        tensors = init_tensors(spec, engine.geometry, seed=0, base_norms=norms)
        data = dumps(AdapterFile(DEMO_TASK, spec, engine.backbone.fingerprint, tensors))
        engine.registry.upload(DEMO_TASK, data)
        log.info("added demo adapter %r", DEMO_TASK)
