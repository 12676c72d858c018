"""The single-process backend as a cluster replica uses it: a ring share preloaded, others on demand."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kronserve.api.errors import status_of
from kronserve.config import Settings
from kronserve.errors import InvalidRequest, RequestTimeout
from kronserve.formats.native import dumps
from kronserve.messages import GenerationParams
from kronserve.service import Service
from kronserve.store import LocalStore, StoreConflict, StoreError

from .conftest import make_adapter


def test_a_replica_loads_its_share_serves_others_on_demand_and_deletes_what_it_cannot_load(
    tiny_dir: Path, tmp_path: Path, backbone
) -> None:
    store = LocalStore(tmp_path)
    for task in ("mine", "other"):
        store.activate(store.write(task, dumps(make_adapter(backbone, task, "compacter", seed=1))))
    store.activate(store.write("broken", b"not an adapter at all"))

    async def run() -> None:
        service = Service(Settings(backbone=str(tiny_dir), store=str(tmp_path)), name="r0", preload="mine".__eq__)
        await service.start()
        try:
            assert [e.task for e in service.engine.registry.entries()] == ["mine"]
            pin = store.active("other")
            result = await service.score("other", ["x"], ["y"], pin)  # not preloaded: loaded at the pinned version
            assert (result.task, result.version, result.replica) == ("other", pin.version, "r0")
            await service.delete("broken")  # never loadable, still deletable
            assert store.active("broken") is None
            predicted = await service.predict("mine", ["x"], GenerationParams(max_new_tokens=2))
            assert predicted.replica == "r0"

            owned = "mine".__eq__
            assert service.evict_idle(owned, idle_s=3600) == []  # "other" was used just now
            assert service.evict_idle(owned, idle_s=0) == ["other"]  # its owner is back: the copy goes...
            assert [e.task for e in service.engine.registry.entries()] == ["mine"]
            await asyncio.to_thread(service.engine.owner, lambda: None)  # the loop has run what was posted before
            assert service.engine.registry.resident() == 1 and store.active("other") == pin  # ...the store keeps it
            again = await service.score("other", ["x"], ["y"], pin)  # and a later spill loads it again
            assert again.values == result.values
        finally:
            await service.stop()

    asyncio.run(run())


def test_store_failures_map_to_their_statuses() -> None:
    assert status_of(StoreConflict("a planted link")) == 409
    assert status_of(StoreError("bucket unreachable")) == 503


def test_scheduler_and_store_settings_take_effect(tiny_dir: Path, tmp_path: Path, backbone) -> None:
    """KRONSERVE_BATCHING, _REQUEST_TIMEOUT_S and _STORE_POLL_S reach the loop, the scheduler and the change feed."""
    store = LocalStore(tmp_path)
    store.activate(store.write("t", dumps(make_adapter(backbone, "t", "compacter", seed=1))))
    settings = Settings(
        backbone=str(tiny_dir), store=str(tmp_path), batching="static", request_timeout_s=0.05, store_poll_s=0.1
    )

    async def run() -> None:
        service = Service(settings)
        await service.start()
        try:
            await service.predict("t", ["x"], GenerationParams(max_new_tokens=2))  # static: one generate() call
            samples = service.metrics.registry.get_sample_value
            assert samples("kronserve_engine_seconds_count", {"kind": "generate"}) == 1
            assert samples("kronserve_step_seconds_count") == 0  # the step loop never ran
            with pytest.raises(InvalidRequest, match="needs KRONSERVE_BATCHING=continuous"):
                await service.predict("t", ["x"], GenerationParams(max_new_tokens=2, temperature=0.7))
            # 512 decode steps of even a tiny T5 take far longer than 0.05 s
            with pytest.raises(RequestTimeout, match=r"within 0\.05 s"):
                await service.predict("t", ["x"], GenerationParams(max_new_tokens=512, min_new_tokens=512))
            v2 = store.write("t", dumps(make_adapter(backbone, "t", "compacter", seed=2)))
            store.activate(v2)  # as another process would: only the poll can tell this one
            for _ in range(100):
                if service.engine.registry.peek("t").version == v2.version:
                    break
                await asyncio.sleep(0.05)
            assert service.engine.registry.peek("t").version == v2.version
        finally:
            await service.stop()

    asyncio.run(run())
