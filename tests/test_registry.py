"""The registry: a swap or delete never frees a slot an accepted request still holds, and an unknown task holds
nothing (the store-facing paths are in test_store.py and test_changes.py)."""

from __future__ import annotations

import pytest

from kronserve.engine import Engine
from kronserve.errors import UnknownTask
from kronserve.formats.native import dumps


def test_a_replaced_version_keeps_its_slot_until_its_last_request_leaves(engine: Engine, adapter_for) -> None:
    registry, bank = engine.registry, engine.bank
    v1 = registry.upload("t", dumps(adapter_for("t", "compacter", seed=1)))
    (held,) = registry.acquire(["t"])  # a request accepted on v1
    v2 = registry.upload("t", dumps(adapter_for("t", "compacter", seed=2)))
    assert (held.version, registry.get("t").version) == (v1.version, v2.version) and v2.slot != v1.slot
    assert bank.loaded() == 2  # v1 still answers the request that holds it
    registry.delete("t")
    assert bank.loaded() == 1
    registry.release([held])
    assert bank.loaded() == 0  # its last request left: the slot is free
    again = registry.upload("u", dumps(adapter_for("u", "compacter", seed=3)))
    assert again.slot in (v1.slot, v2.slot)  # freed slots are reused, not leaked


def test_an_unknown_task_holds_nothing(engine: Engine, adapter_for) -> None:
    registry = engine.registry
    registry.upload("known", dumps(adapter_for("known", "compacter")))
    with pytest.raises(UnknownTask, match="nope"):
        registry.acquire(["known", "nope"])
    registry.delete("known")
    assert engine.bank.loaded() == 0  # had "known" been held by the failed acquire, its slot would still be used
    with pytest.raises(UnknownTask):
        registry.delete("known")
