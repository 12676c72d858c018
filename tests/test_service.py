"""The single-process backend as a cluster replica uses it: a ring share preloaded, others on demand."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kronserve.api.errors import status_of
from kronserve.config import Settings
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
            assert service.engine.bank.loaded() == 1 and store.active("other") == pin  # ...the store keeps it
            again = await service.score("other", ["x"], ["y"], pin)  # and a later spill loads it again
            assert again.values == result.values
        finally:
            await service.stop()

    asyncio.run(run())


def test_store_failures_map_to_their_statuses() -> None:
    assert status_of(StoreConflict("a planted link")) == 409
    assert status_of(StoreError("bucket unreachable")) == 503
