"""A backbone replica: the single-process `Service`, named, loading its ring share and others on demand.

Replies travel as an `Outcome` so a kronserve error (404, 422, 503…) reaches the gateway as itself,
not as a Ray task failure; anything else is a bug and does fail the call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ray import serve

from ..config import Settings
from ..errors import KronserveError
from ..service import Service
from .ring import Ring


@dataclass
class Outcome:
    value: Any = None
    error: KronserveError | None = None

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


@serve.deployment(ray_actor_options={"num_cpus": 0}, health_check_period_s=2, health_check_timeout_s=30)
class Replica:
    async def __init__(self, settings: Settings, name: str, replicas: list[str], threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        ring = Ring(replicas)
        self.name = name
        self.service = Service(settings, name=name, preload=lambda task: ring.owner(task) == name)
        await self.service.start()

    async def call(self, method: str, *args: Any) -> Outcome:
        """Run one `Backend` method of the service (predict, score, upload, delete, adapter(s), metrics_text)."""
        try:
            return Outcome(await getattr(self.service, method)(*args))
        except KronserveError as e:
            return Outcome(error=e)

    def info(self) -> dict[str, Any]:
        """Who and what: the gateway's health probe, and what tests need to find and kill a replica."""
        entries = self.service.engine.registry.entries() if self.service.ready else []
        tasks = {e.task: e.version for e in entries}
        return {"name": self.name, "pid": os.getpid(), "ready": self.service.ready, "tasks": tasks}
