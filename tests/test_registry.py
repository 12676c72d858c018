"""The registry: a swap or delete never drops a version an accepted request still holds, an unknown task holds
nothing, and registering a stored version reads its header only (the store-facing paths are in test_store.py and
test_changes.py)."""

from __future__ import annotations

import dataclasses

import pytest

from kronserve.engine import Engine
from kronserve.errors import BankFull, UnknownTask
from kronserve.formats.native import dumps

from .conftest import held_slots


def test_a_replaced_version_stays_resident_until_its_last_request_leaves(engine: Engine, adapter_for) -> None:
    registry = engine.registry
    v1 = registry.upload("t", dumps(adapter_for("t", "compacter", seed=1)))
    (held,) = registry.acquire(["t"])  # a request accepted on v1
    v2 = registry.upload("t", dumps(adapter_for("t", "compacter", seed=2)))
    assert (held.version, registry.get("t").version) == (v1.version, v2.version)
    assert registry.resident() == 2 and registry.tier(v1) == "host"  # v1 still answers the request that holds it
    registry.delete("t")
    assert registry.resident() == 1
    registry.release([held])
    assert registry.resident() == 0  # its last request left: nothing of it stays in memory


def test_an_unknown_task_holds_nothing(engine: Engine, adapter_for) -> None:
    registry = engine.registry
    registry.upload("known", dumps(adapter_for("known", "compacter")))
    with pytest.raises(UnknownTask, match="nope"):
        registry.acquire(["known", "nope"])
    registry.delete("known")
    assert registry.resident() == 0  # had "known" been held by the failed acquire, it would still be in memory
    with pytest.raises(UnknownTask):
        registry.delete("known")


def test_a_device_slot_outlives_its_version_only_while_held(engine: Engine, adapter_for) -> None:
    engine.load(adapter_for("t", "compacter", seed=1))
    (slot,) = held_slots(engine, ["t"])
    old = engine.registry.get("t")
    engine.load(adapter_for("t", "compacter", seed=2), version=2)
    assert engine.device.resident(old.key) is not None  # the holder's rows still read it
    engine.release([slot])
    engine.registry.release([old])
    assert engine.device.resident(old.key) is None and engine.device.used_bytes == 0


def test_max_adapters_caps_registered_tasks_but_never_updates(backbone, adapter_for) -> None:
    engine = Engine(backbone, max_adapters=2)
    for task in ("a", "b"):
        engine.registry.upload(task, dumps(adapter_for(task, "compacter")))
    with pytest.raises(BankFull, match="at most 2 tasks"):
        engine.registry.upload("c", dumps(adapter_for("c", "compacter")))
    assert engine.registry.upload("a", dumps(adapter_for("a", "compacter", seed=5))).version == 2
    engine.registry.delete("b")
    assert engine.registry.upload("c", dumps(adapter_for("c", "compacter"))).task == "c"


def test_a_restart_registers_unchanged_versions_from_its_snapshot_and_rereads_changed_ones(
    backbone, adapter_for, tmp_path, monkeypatch
) -> None:
    from kronserve.store import LocalStore

    store = LocalStore(tmp_path / "store")
    for i in range(5):
        store.activate(store.write(f"s{i}", dumps(adapter_for(f"s{i}", "compacter", seed=i))))
    snapshot = tmp_path / "cache" / "index.json"
    first = Engine(backbone, store=store)
    assert first.registry.load_store(snapshot=snapshot) == [f"s{i}" for i in range(5)]
    store.activate(store.write("s1", dumps(adapter_for("s1", "houlsby", seed=9))))  # changed since the snapshot
    damaged = store.active("s2")
    path = next((tmp_path / "store" / "s2").glob("v*.safetensors"))
    path.write_bytes(path.read_bytes()[:-10])  # cut short: the snapshot's size no longer matches
    heads = []
    real_head = LocalStore.head
    monkeypatch.setattr(
        LocalStore, "head", lambda self, ref, limit: heads.append(ref.task) or real_head(self, ref, limit)
    )
    from kronserve.backbone import load_backbone

    again = Engine(load_backbone(str(backbone.source), device="cpu"), store=store)
    assert again.registry.load_store(snapshot=snapshot) == ["s0", "s1", "s3", "s4"]
    assert sorted(heads) == ["s1", "s2"]  # only the changed and the damaged one were read
    assert again.registry.get("s1").spec.method == "houlsby" and "s2" in again.registry.unavailable()
    assert again.registry.get("s0").spec == first.registry.get("s0").spec and damaged is not None
    assert again.score(["s0"], ["x"], ["y"]).scores == first.score(["s0"], ["x"], ["y"]).scores


def test_a_leased_version_answers_after_its_file_left_the_store(backbone, adapter_for, tmp_path) -> None:
    """The store removes a replaced or deleted version's file at once; a request that leased it still gets its
    weights (even with no host tier to cache them), the task never turns unavailable, and nothing stays once the
    last lease ends."""
    from kronserve.store import LocalStore

    engine = Engine(backbone, store=LocalStore(tmp_path / "store"), host_adapter_mb=0)
    registry = engine.registry
    v1 = registry.upload("t", dumps(adapter_for("t", "compacter", seed=1)))
    want = registry.fetch(v1).flat.clone()
    (held_v1,) = registry.acquire(["t"])
    v2 = registry.upload("t", dumps(adapter_for("t", "compacter", seed=2)))
    assert [p.name for p in (tmp_path / "store" / "t").glob("v*")] == [
        f"v{v2.version:06d}-{v2.sha256[:16]}.safetensors"
    ]
    assert registry.fetch(held_v1).flat.equal(want)
    (held_v2,) = registry.acquire(["t"])
    want_v2 = registry.fetch(held_v2).flat.clone()
    registry.delete("t")
    assert not (tmp_path / "store" / "t").exists()
    assert registry.fetch(held_v1).flat.equal(want) and registry.fetch(held_v2).flat.equal(want_v2)
    assert registry.unavailable() == {} and registry.metrics.adapters_unavailable._value.get() == 0
    registry.release([held_v1, held_v2])
    assert registry._kept == {} and registry.resident() == 0


def test_a_backbone_mismatch_names_both_backbones(engine: Engine, other_tiny_dir) -> None:
    """Refused with the name the adapter records (`base_model`) and the name this server was given, not only the
    first field that differs."""
    from kronserve.backbone import load_backbone
    from kronserve.errors import BackboneMismatch

    from .conftest import make_adapter

    other = make_adapter(load_backbone(str(other_tiny_dir), device="cpu"), "t", "compacter")
    data = dumps(dataclasses.replace(other, base_model=str(other_tiny_dir)))
    with pytest.raises(BackboneMismatch) as refused:
        engine.registry.upload("t", data)
    message = str(refused.value)
    assert f"made on {str(other_tiny_dir)!r}" in message
    assert f"this server runs {engine.backbone.source!r}" in message
