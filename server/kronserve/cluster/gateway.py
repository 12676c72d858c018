"""The cluster's `Backend`: pin the store's version, pick the task's replica, forward, name who answered.

The gateway reads the task's active version from the shared store for every request and sends it
along; a replica that holds an older one loads the pinned one first, so no request gets a version
older than an upload that returned before it was sent. Predict, score and reads are idempotent: when a
replica dies under them they go to the task's next replica. Uploads and deletes are not retried (the
replica may have finished them): they fail with a clear 503 instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from ..config import Settings
from ..errors import KronserveError, NotReady, ReplicaUnavailable, UnknownTask
from ..messages import Delta, GenerationParams, Prompt, Result, Started
from ..metrics import Metrics, merged_with_source
from ..store import VersionRef, open_store
from .ring import Ring

log = logging.getLogger(__name__)
_REPLICA_DIED = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)


class ClusterBackend:
    def __init__(self, settings: Settings, names: Sequence[str], handles: Sequence[DeploymentHandle]) -> None:
        self.settings = settings
        self.metrics = Metrics(settings.metrics_max_tasks)
        self.store = open_store(settings.store, settings.s3_endpoint_url)
        self.ring = Ring(names, floor=settings.max_batch_rows)
        self.handles = dict(zip(names, handles, strict=True))
        self.up = dict.fromkeys(names, False)
        self.load: Counter[str] = Counter()
        self._probe: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._probe is None:
            self._probe = asyncio.create_task(self._probe_forever())

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe

    async def readiness(self) -> dict[str, object]:
        replicas = {name: "ready" if ok else "unavailable" for name, ok in self.up.items()}
        if not any(self.up.values()):
            raise NotReady(f"no replica is ready: {replicas}", retry_after=5)
        return {"status": "ready", "replicas": replicas}

    async def predict(self, task: str, inputs: list[Prompt], params: GenerationParams) -> Result:
        return await self._forward(task, "predict", task, inputs, params, await self._pin(task))

    async def predict_stream(
        self, task: str, inputs: list[Prompt], params: GenerationParams
    ) -> AsyncIterator[Started | Delta | Result]:
        """The task's replica streams its events through; a replica lost before the first event is replaced by the
        next one, after it the stream ends with `replica_unavailable` (the text so far cannot be taken back)."""
        pin = await self._pin(task)
        tried = []
        for name in self.ring.choose(task, self.up, self.load):
            tried.append(name)
            call = self.handles[name].options(stream=True).stream.remote("predict_stream", task, inputs, params, pin)
            began = False
            self.load[name] += 1
            try:
                async for outcome in call:
                    began = True
                    yield outcome.unwrap()
                return
            except _REPLICA_DIED as e:
                self._down(name, e)
                if began:
                    raise ReplicaUnavailable(f"replica {name} failed while streaming {task!r}; retry") from None
            finally:
                self.load[name] -= 1
                call.cancel()
        raise ReplicaUnavailable(f"no replica could serve {task!r} (tried {', '.join(tried)})", retry_after=5)

    async def score(self, task: str, inputs: list[str], targets: list[str]) -> Result:
        return await self._forward(task, "score", task, inputs, targets, await self._pin(task))

    async def adapter(self, task: str, *, residency: bool = False) -> dict[str, object]:
        return await self._forward(task, "adapter", task, await self._pin(task), residency)

    async def upload(self, task: str, parts: dict[str, bytes], pin: bool = False) -> dict[str, object]:
        return await self._forward(task, "upload", task, parts, pin, retry=False)

    async def delete(self, task: str) -> None:
        await self._forward(task, "delete", task, retry=False)

    async def adapters(
        self, after: str | None, limit: int | None, residency: bool = False
    ) -> tuple[list[dict[str, object]], str | None]:
        """A page of the store's tasks, each described by a replica holding its active version (loaded if none
        does)."""
        held: dict[tuple[str, str], dict[str, object]] = {}
        for page in await self._everywhere("adapters", None, None, residency):
            infos, _ = page
            held.update({(str(i["task"]), str(i["sha256"])): i for i in infos})
        tasks = [t for t in await asyncio.to_thread(self.store.tasks) if after is None or t > after]
        limit = len(tasks) if limit is None else limit
        out = []
        for task in tasks[:limit]:
            ref = await asyncio.to_thread(self.store.active, task)
            if ref is None:
                continue
            info = held.get((task, ref.sha256))
            if info is None:
                try:
                    info = await self._forward(task, "adapter", task, ref, residency)
                except KronserveError as e:  # as the single process does: a version that cannot load is left out
                    log.error("list: skipping task %r: %s", task, e)
                    continue
            out.append(info)
        return out, (tasks[limit - 1] if len(tasks) > limit else None)

    async def pin_task(self, task: str, pinned: bool) -> dict[str, object]:
        """On the task's replica (its owner while it is up): pins are per process."""
        await self._forward(task, "adapter", task, await self._pin(task))  # its replica holds the active version
        return await self._forward(task, "pin_task", task, pinned, retry=False)

    async def metrics_text(self) -> bytes:
        """The gateway's metrics and every live replica's, each sample labelled with where it came from."""
        texts = {"gateway": self.metrics.render()}
        for name, text in zip(self.handles, await self._everywhere("metrics_text", with_names=True), strict=True):
            if text is not None:
                texts[name] = text
        return merged_with_source(texts)

    async def replicas(self) -> list[dict[str, Any]]:
        """Each replica's own report, and whether this gateway routes to it now (`routable`, from its probe)."""
        infos = await asyncio.gather(*(self._info(name) for name in self.handles))
        return [
            {**(info or {"name": name, "ready": False}), "routable": self.up[name]}
            for name, info in zip(self.handles, infos, strict=True)
        ]

    # ---- routing -------------------------------------------------------------------------------
    async def _pin(self, task: str) -> VersionRef:
        ref = await asyncio.to_thread(self.store.active, task)
        if ref is None:
            raise UnknownTask(f"unknown task {task!r}")
        return ref

    async def _forward(self, task: str, method: str, *args: Any, retry: bool = True) -> Any:
        tried = []
        for name in self.ring.choose(task, self.up, self.load):
            tried.append(name)
            self.load[name] += 1
            try:
                outcome = await self._call_while_up(name, method, *args)
            except _REPLICA_DIED as e:
                self._down(name, e)
                if retry:
                    continue
                raise ReplicaUnavailable(
                    f"replica {name} failed during {method} of {task!r}; it may or may not have happened, retry"
                ) from None
            finally:
                self.load[name] -= 1
            return outcome.unwrap()
        raise ReplicaUnavailable(f"no replica could serve {task!r} (tried {', '.join(tried)})", retry_after=5)

    async def _call_while_up(self, name: str, method: str, *args: Any) -> Any:
        """Serve holds a request for a dead replica until its replacement is up (many seconds for a large
        backbone); give it up as soon as the probe sees the replica down, so the next replica answers."""
        response = self.handles[name].call.remote(method, *args)
        waiting = asyncio.ensure_future(_awaited(response))
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=self.settings.probe_interval_s)
            if done:
                return waiting.result()
            if not self.up[name]:
                response.cancel()
                waiting.cancel()
                with contextlib.suppress(BaseException):
                    await waiting  # collect the cancellation, so nothing is left unretrieved
                raise DeploymentUnavailableError(f"replica {name} went down while the request waited")

    async def _everywhere(self, method: str, *args: Any, with_names: bool = False) -> list[Any]:
        """`method` on every live replica; a replica that fails is marked down and gives None."""

        async def one(name: str) -> Any:
            if not self.up[name]:
                return None
            try:
                call = self.handles[name].call.remote(method, *args)
                return (await asyncio.wait_for(_awaited(call), timeout=5 * self.settings.probe_timeout_s)).unwrap()
            except (TimeoutError, *_REPLICA_DIED) as e:
                self._down(name, e)
                return None

        results = await asyncio.gather(*(one(n) for n in self.handles))
        return results if with_names else [r for r in results if r is not None]

    def _down(self, name: str, why: BaseException) -> None:
        if self.up.get(name):
            log.warning("replica %s unavailable (%s); its tasks go to their next replica", name, type(why).__name__)
        self.up[name] = False

    async def _info(self, name: str) -> dict[str, Any] | None:
        """The replica's report, or None when it does not answer in time or at all (for any reason)."""
        try:
            return await asyncio.wait_for(
                _awaited(self.handles[name].info.remote()), timeout=self.settings.probe_timeout_s
            )
        except Exception as e:
            log.debug("probe of %s failed: %r", name, e)
            return None

    @property
    def probing(self) -> bool:
        return self._probe is not None and not self._probe.done()

    async def _probe_forever(self) -> None:
        """Keep `up` true to each replica's state: the gateway routes around a dead one at once."""
        while True:  # `_info` turns every failure into None, so this loop only ends when cancelled
            infos = await asyncio.gather(*(self._info(name) for name in self.handles))
            for name, info in zip(self.handles, infos, strict=True):
                was, self.up[name] = self.up[name], bool(info and info["ready"])
                if was != self.up[name]:
                    log.info("replica %s is %s", name, "up" if self.up[name] else "down")
            await asyncio.sleep(self.settings.probe_interval_s)


async def _awaited(response: Any) -> Any:
    return await response
