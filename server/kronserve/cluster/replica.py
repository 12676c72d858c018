"""A backbone replica: the single-process `Service`, named, loading its ring share and others on demand
(a spill or a failover), and dropping those others again once idle for `spill_idle_s`.

Replies travel as an `Outcome` so a kronserve error (404, 422, 503…) reaches the gateway as itself,
not as a Ray task failure; anything else is a bug and does fail the call.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from ..config import Settings
from ..errors import KronserveError
from ..service import Service
from .ring import Ring

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    value: Any = None
    error: KronserveError | None = None

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


# No access log: the gateway probes every replica's `info` twice a second, which logged `CALL info OK` while idle
# (each request is in the gateway's access log already).
@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    health_check_period_s=2,
    health_check_timeout_s=30,
    logging_config={"enable_access_log": False},
)
class Replica:
    async def __init__(self, settings: Settings, name: str, replicas: list[str], threads: int) -> None:
        import torch

        torch.set_num_threads(settings.torch_threads or threads)
        ring = Ring(replicas)
        self.name = name
        self.owns = lambda task: ring.owner(task) == name
        self.service = Service(settings, name=name, preload=self.owns)
        await self.service.start()
        self._evicting = asyncio.create_task(self._evict_forever(settings.spill_idle_s))

    async def _evict_forever(self, idle_s: float) -> None:
        while True:
            await asyncio.sleep(max(idle_s / 4, 1.0))
            dropped = self.service.evict_idle(self.owns, idle_s)
            if dropped:
                log.info("%s: dropped idle copies of %s (owned by other replicas)", self.name, dropped)

    async def call(self, method: str, *args: Any) -> Outcome:
        """Run one `Backend` method of the service (predict, score, upload, delete, adapter(s), metrics_text)."""
        try:
            return Outcome(await getattr(self.service, method)(*args))
        except KronserveError as e:
            return Outcome(error=e)

    async def stream(self, method: str, *args: Any) -> AsyncIterator[Outcome]:
        """Run one streaming `Backend` method (predict_stream); each event travels as an `Outcome`. The gateway
        cancelling the call closes the service's stream, which cancels the request in the engine."""
        try:
            async for item in getattr(self.service, method)(*args):
                yield Outcome(item)
        except KronserveError as e:
            yield Outcome(error=e)

    def info(self) -> dict[str, Any]:
        """Who and what: the gateway's health probe, and what tests need to find and kill a replica."""
        entries = self.service.engine.registry.entries() if self.service.ready else []
        tasks = {e.task: e.version for e in entries}
        tiers = self.service.tiers() if self.service.ready else {}
        return {"name": self.name, "pid": os.getpid(), "ready": self.service.ready, "tasks": tasks, "tiers": tiers}
