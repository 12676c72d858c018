"""The single-process backend: settings, metrics, engine (backbone, tiers, registry), scheduler.

The API calls it through the `Backend` protocol (api/backend.py), the same one the cluster gateway
implements, so one set of routes serves both. Built in the app factory; nothing is module-global.
The backbone loads on a thread after the server starts, so `/healthz` answers at once and `/readyz`
turns 200 only once the backbone is loaded and the store scanned. A cluster replica is this same
class with a name (the `x-kronserve-replica` header), a preload of its ring share only, and a change feed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from .admission import default_step_tokens
from .backbone import DEFAULT_HUB_ID, default_backbone, load_backbone
from .changes import ChangeFeed
from .config import Settings
from .demo import DEMO_TASKS, demo_adapters
from .engine import Engine
from .errors import KronserveError, NotReady
from .formats.importers import to_adapter
from .formats.native import AdapterFile, dumps, is_native
from .front import TextFront
from .jobs import Job, TokenStream
from .loop import Bounds
from .messages import STARTING, GenerationParams, Started, StreamedToken
from .methods import init_tensors, preset
from .metrics import Metrics
from .registry import Entry
from .scheduler import Scheduler
from .store import VersionRef, open_store
from .t5_sites import base_norms
from .text import TextCodec
from .train import torch_threads

log = logging.getLogger(__name__)
DEMO_TASK = "demo"


class Service(TextFront):
    def __init__(
        self,
        settings: Settings,
        name: str | None = None,
        preload: Callable[[str], bool] | None = None,
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        """`name` labels answers (a cluster replica's); `preload` picks the store's tasks to load at start
        (all when None; a replica loads the tasks the ring gives it, and others on demand); `on_phase` hears what
        start-up is doing whenever that changes (the engine process tells its supervisor)."""
        self.settings, self.name, self.preload, self.on_phase = settings, name, preload, on_phase
        self.phase = STARTING  # what start-up is doing now: /readyz says it
        self.metrics = Metrics(settings.metrics_max_tasks)
        self.changes: ChangeFeed | None = None
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
        step_tokens = s.max_step_tokens or default_step_tokens(engine.geometry, engine.backbone.device.type == "cuda")
        bounds = Bounds(s.max_batch_rows, s.max_batch_tokens, s.max_cached_tokens, s.batch_wait_ms / 1000, step_tokens)
        scheduler = Scheduler(
            engine, self.metrics, bounds, s.queue_size, s.request_timeout_s, static=s.batching == "static"
        )
        scheduler.start()
        self._engine, self._scheduler = engine, scheduler
        if s.redis_url or s.store_poll_s > 0:
            self.changes = ChangeFeed(engine.registry, s.redis_url, s.store_poll_s)
            self.changes.start()
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
        if self.changes is not None:
            self.changes.stop()
        if self._scheduler is not None:
            await self._scheduler.drain_and_stop()

    # ---- the Backend protocol ------------------------------------------------------------------
    async def readiness(self) -> dict[str, object]:
        if not self.ready:
            why = self.startup_error or ("draining" if self.draining else self.phase)
            raise NotReady(f"not ready: {why}", retry_after=5)
        registry = self.engine.registry
        ready: dict[str, object] = {"status": "ready", "adapters": len(registry.entries())}
        if unavailable := registry.unavailable():  # stored tasks that could not be loaded: they answer 503
            ready["unavailable"] = unavailable
        return ready

    @property
    def codec(self) -> TextCodec:
        return self.engine.codec

    async def open_run(
        self,
        task: str,
        inputs: list[list[int]],
        targets: list[list[int]] | None,
        params: GenerationParams | None,
        pin: VersionRef | None,
        stream: bool,
    ) -> LocalRun:
        """Lease the task's active version at acceptance (404 if none); the engine holds it until the request
        leaves (its last step, or the step after its caller gave up)."""
        scheduler = self.scheduler
        if pin is not None:
            await self._ensure(task, pin)
        (entry,) = self.engine.registry.acquire([task])
        job = await scheduler.accept(entry, inputs, targets, params, TokenStream() if stream else None)
        return LocalRun(scheduler, job, Started(entry.task, entry.version, self.name))

    async def upload(self, task: str, parts: dict[str, bytes], pin: bool = False) -> dict[str, object]:
        """A native file is stored as sent; another format is converted to native first."""
        self.engine  # noqa: B018 - raises NotReady while the backbone loads
        entry = await asyncio.to_thread(self._upload, task, parts, pin)
        if self.changes is not None:
            self.changes.publish(task)
        return self._described(entry, residency=pin)

    async def delete(self, task: str) -> None:
        registry = self.engine.registry
        if registry.peek(task) is None and self.preload is not None and registry.store is not None:
            # A replica holds only some tasks: delete one it does not hold from the store, without loading it
            # (a version that cannot load must still be deletable).
            await asyncio.to_thread(registry.store.delete, task)
        else:
            await asyncio.to_thread(registry.delete, task)
        if self.changes is not None:
            self.changes.publish(task)

    async def adapters(
        self, after: str | None = None, limit: int | None = None, residency: bool = False
    ) -> tuple[list[dict[str, object]], str | None]:
        """A page of registered tasks in task order (all of them when `limit` is None), and the next page's cursor."""
        registry = self.engine.registry
        entries, cursor = registry.page(after, registry.count() if limit is None else limit)
        return [self._described(e, residency) for e in entries], cursor

    async def adapter(self, task: str, pin: VersionRef | None = None, residency: bool = False) -> dict[str, object]:
        if pin is not None:
            await self._ensure(task, pin)
        return self._described(self.engine.registry.get(task), residency)

    async def pin_task(self, task: str, pinned: bool) -> dict[str, object]:
        """Keep the task on the device (never evicted), or return it to LRU; this process only, until restart
        (KRONSERVE_PINNED_TASKS is the lasting list)."""
        engine = self.engine
        entry = engine.registry.get(task)
        await asyncio.to_thread(engine.pin if pinned else engine.unpin, task)
        return self._described(entry, residency=True)

    def tiers(self) -> dict[str, dict[str, int]]:
        """Each tier's resident adapters, bytes and budget (`/v1/cluster` shows every replica's)."""
        e = self.engine
        return {
            "host": {"adapters": e.host.count(), "bytes": e.host.used_bytes, "budget_bytes": e.host.budget},
            "device": {"adapters": e.device.count(), "bytes": e.device.used_bytes, "budget_bytes": e.device.budget},
        }

    async def metrics_text(self) -> bytes:
        return self.metrics.render()

    def evict_idle(self, keep: Callable[[str], bool], idle_s: float) -> list[str]:
        """Drop held tasks that `keep` does not claim and no request used for `idle_s` (a replica's spill and
        failover copies), so memory returns to the ring share once the owner is back."""
        registry = self.engine.registry
        idle = [e.task for e in registry.entries() if not keep(e.task) and registry.idle_s(e.task) >= idle_s]
        for task in idle:
            registry.evict(task)
        return idle

    def _described(self, entry: Entry, residency: bool = False) -> dict[str, object]:
        """The version's identity (stable: what clients compare), and with `residency` where it is now (live)."""
        live = self.engine.where(entry) if residency else {}
        return {**entry.describe(), **live, "replica": self.name}

    async def _ensure(self, task: str, pin: VersionRef) -> None:
        """The gateway read `pin` from the store: serve it or something newer, never an older version.

        Identity (version and hash), not order, decides: a task deleted and made anew starts again at 1.
        """
        current = self.engine.registry.peek(task)
        if current is None or (current.version, current.sha256) != (pin.version, pin.sha256):
            await asyncio.to_thread(self.engine.registry.refresh, task)

    def _upload(self, task: str, parts: dict[str, bytes], pin: bool) -> Entry:
        registry = self.engine.registry
        if len(parts) == 1 and is_native(data := next(iter(parts.values()))):
            return registry.upload(task, data, pin)
        try:
            weights = self.engine.backbone.weights
            adapter = to_adapter(parts, task, registry.fingerprint, self.settings.accept_pickle, weights)
        except KronserveError as e:
            registry.metrics.adapter_load_failures.labels("upload", e.code).inc()
            raise
        return registry.upload(task, dumps(adapter), pin)

    def _build_engine(self) -> Engine:
        s = self.settings
        source = s.backbone or default_backbone(s.cache_dir)
        backbone = load_backbone(source, s.device, s.dtype)
        engine = Engine(
            backbone,
            store=open_store(s.store, s.s3_endpoint_url, s.fault_point),
            metrics=self.metrics,
            max_input_tokens=s.max_input_tokens,
            host_adapter_mb=s.host_adapter_mb,
            device_adapter_mb=s.device_adapter_mb,
            max_adapters=s.max_adapters,
        )
        started = time.perf_counter()
        indexed = engine.registry.load_store(self.preload, self._snapshot_path())
        log.info(
            "indexed %d stored adapters in %.2f s (weights load on first use)",
            len(indexed),
            time.perf_counter() - started,
        )
        for task in s.pinned:
            try:
                engine.pin(task)
            except KronserveError as e:
                log.error("cannot pin %r: %s", task, e)
        if self.preload is None and s.backbone is None:
            if source == DEFAULT_HUB_ID:
                self._add_demo_adapter(engine)
            else:
                self._add_demo_adapters(engine)
        return engine

    def _snapshot_path(self) -> Path:
        """This process's start-up index of its store (one per store and replica, under the cache dir)."""
        s = self.settings
        key = hashlib.sha256(f"{s.store}|{s.s3_endpoint_url}|{self.name}".encode()).hexdigest()[:16]
        return s.cache_dir / "index" / f"{key}.json"

    @staticmethod
    def _add_demo_adapter(engine: Engine) -> None:
        """On t5-small from the hub: a near-identity Compacter++ (the paper's init), so `demo` answers T5's own
        pretraining tasks ("translate English to German: ...", "sst2 sentence: ...")."""
        if DEMO_TASK in {e.task for e in engine.registry.entries()}:
            return
        spec = preset("compacter++")
        norms = {k: v.float() for k, v in base_norms(engine.backbone.model).items()}
        tensors = init_tensors(spec, engine.geometry, seed=0, base_norms=norms)
        data = dumps(AdapterFile(DEMO_TASK, spec, engine.backbone.fingerprint, tensors))
        engine.registry.upload(DEMO_TASK, data)
        log.info("added demo adapter %r", DEMO_TASK)

    def _add_demo_adapters(self, engine: Engine) -> None:
        """On the offline demo backbone: the demo tasks (kronserve.demo), trained once and put in the store as
        ordinary adapters, never over a task the store already has."""
        have = {e.task for e in engine.registry.entries()}
        missing = [t for t in DEMO_TASKS if t.name not in have]
        if not missing:
            return
        bb = engine.backbone
        with torch_threads(self.settings.intra_op_threads(training=True)):
            files = demo_adapters(bb.source, bb.fingerprint, self.settings.cache_dir, self._starting)
        for task in missing:
            engine.registry.upload(task.name, files[task.name].read_bytes())
            log.info("added demo adapter %r", task.name)

    def _starting(self, phase: str) -> None:
        if phase != self.phase:
            self.phase = phase
            if self.on_phase is not None:
                self.on_phase(phase)


class LocalRun:
    """A request accepted by this process's scheduler, as the text side sees it (`front.Run`)."""

    def __init__(self, scheduler: Scheduler, job: Job, started: Started) -> None:
        self.job, self.started = job, started
        self._answer = asyncio.ensure_future(scheduler.wait(job))

    async def tokens(self) -> list[StreamedToken] | None:
        stream = self.job.stream
        if stream is None:
            return None
        while stream.queue.empty():
            if self._answer.done():
                return None
            getting = asyncio.ensure_future(stream.queue.get())
            await asyncio.wait({getting, self._answer}, return_when=asyncio.FIRST_COMPLETED)
            if getting.done():
                return getting.result() + self._drain()
            getting.cancel()
        return self._drain()

    def _drain(self) -> list[StreamedToken]:
        assert self.job.stream is not None
        pairs: list[StreamedToken] = []
        while not self.job.stream.queue.empty():
            pairs += self.job.stream.queue.get_nowait()
        return pairs

    async def result(self) -> list:
        return await self._answer

    def stop(self, index: int) -> None:
        if self.job.stream is not None:
            self.job.stream.stop(index)

    def cancel(self) -> None:
        if not self._answer.done():
            self._answer.cancel()
