"""The local store and the registry on top of it: atomic versions, bad files skipped, no symlinks followed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kronserve.backbone import Backbone
from kronserve.engine import Engine
from kronserve.errors import InvalidAdapter, InvalidRequest, UnknownTask
from kronserve.formats.native import dumps
from kronserve.metrics import Metrics
from kronserve.store import LocalStore, StoreConflict, StoreError, VersionRef


def test_versions_are_immutable_files_and_the_pointer_moves(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    v1 = store.write("task", b"one")
    assert store.active("task") is None and store.tasks() == []  # written, not active yet
    store.activate(v1)
    v2 = store.write("task", b"two")
    store.activate(v2)
    assert store.active("task") == v2 and v2.version == 2
    assert store.read(v2) == b"two"
    with pytest.raises(StoreError):  # the replaced version's file is gone once the new one is active
        store.read(v1)
    assert sorted(p.name for p in (tmp_path / "task").iterdir()) == ["ACTIVE", f"v000002-{v2.sha256[:16]}.safetensors"]
    assert store.write("task", b"three").version == 3


def test_read_verifies_the_hash(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    ref = store.write("t", b"payload")
    next((tmp_path / "t").glob("v*.safetensors")).write_bytes(b"tampered")
    with pytest.raises(StoreError, match="does not match its sha256"):
        store.read(ref)


@pytest.mark.parametrize("bad", ["..", "../x", "/abs", "a/b", "UP", "a\0b", "x" * 65, ""])
def test_task_ids_that_could_escape_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(InvalidRequest):
        LocalStore(tmp_path).write(bad, b"x")


def test_symlinked_task_directories_are_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "store"
    store = LocalStore(root)
    os.symlink(outside, root / "evil")
    assert store.tasks() == []
    with pytest.raises(StoreConflict, match="symlink"):
        store.write("evil", b"x")
    assert list(outside.iterdir()) == []
    planted = LocalStore(outside)  # a real task behind the link: still never read through it
    ref = planted.write("t", b"secret")
    planted.activate(ref)
    os.symlink(outside / "t", root / "t")
    assert store.active("t") is None and store.tasks() == []
    with pytest.raises(StoreConflict, match="symlink"):
        store.read(ref)


def test_planted_pointer_link_or_file_is_a_conflict(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"{}")
    root = tmp_path / "store"
    store = LocalStore(root)
    (root / "linked").mkdir()
    os.symlink(outside, root / "linked" / "ACTIVE")
    (root / "plain").write_bytes(b"x")
    assert store.tasks() == []
    for task in ("linked", "plain"):
        with pytest.raises(StoreConflict):
            store.write(task, b"x")
    assert outside.read_bytes() == b"{}" and (root / "plain").read_bytes() == b"x"
    assert sorted(p.name for p in (root / "linked").iterdir()) == ["ACTIVE"]


def test_delete_removes_pointer_and_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.activate(store.write("t", b"x"))
    store.delete("t")
    assert not (tmp_path / "t").exists()
    with pytest.raises(UnknownTask):
        store.delete("t")


def test_startup_skips_corrupt_and_foreign_files_and_loads_the_rest(
    tmp_path: Path, backbone: Backbone, adapter_for, other_tiny_dir: Path
) -> None:
    from kronserve.backbone import load_backbone

    from .conftest import make_adapter

    store = LocalStore(tmp_path)
    store.activate(store.write("good", dumps(adapter_for("good", "compacter", seed=1))))
    store.activate(store.write("corrupt", b"\x80\x04 not an adapter"))
    foreign = make_adapter(load_backbone(str(other_tiny_dir), device="cpu"), "foreign", "compacter")
    store.activate(store.write("foreign", dumps(foreign)))
    store.write("orphan", dumps(adapter_for("orphan", "compacter")))  # never activated: an unfinished upload
    metrics = Metrics()
    engine = Engine(backbone, store=store, metrics=metrics)
    assert engine.registry.load_store() == ["good"]
    assert [e.task for e in engine.registry.entries()] == ["good"]
    sample = metrics.registry.get_sample_value
    assert sample("kronserve_adapter_load_failures_total", {"source": "store", "code": "unsupported_format"}) == 1
    assert sample("kronserve_adapter_load_failures_total", {"source": "store", "code": "backbone_mismatch"}) == 1


def test_failed_upload_leaves_nothing_behind(tmp_path: Path, backbone: Backbone, adapter_for) -> None:
    store = LocalStore(tmp_path)
    engine = Engine(backbone, store=store)
    first = engine.registry.upload("t", dumps(adapter_for("t", "compacter", seed=1)))
    bad = adapter_for("t", "compacter", seed=2)
    bad.tensors["phm_rule"][0, 0, 0] = float("inf")
    with pytest.raises(InvalidAdapter):
        engine.registry.upload("t", dumps(bad))
    assert engine.registry.get("t") == first
    assert [p.name for p in (tmp_path / "t").iterdir()] and len(store.versions("t")) == 1


def test_check_reports_and_repairs_orphans(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    good = store.write("good", b"x")
    store.activate(good)
    store.write("good", b"unfinished upload")  # a version file nothing points to
    (tmp_path / "good" / ".tmp-123-ACTIVE").write_bytes(b"{")
    store.write("never", b"y")  # a task whose first upload died before its pointer
    (tmp_path / ".tmp-x").write_bytes(b"")
    os.symlink(tmp_path / "good", tmp_path / "link")
    report = store.check()
    assert report.ok == ["good"] and report.problems == [] and len(report.orphans) == 6 and not report.clean
    assert LocalStore(tmp_path).check(repair=True).removed == report.orphans
    after = store.check()
    assert after.clean and after.ok == ["good"] and store.read(good) == b"x"


def test_check_reports_a_tampered_active_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.activate(store.write("t", b"payload"))
    next((tmp_path / "t").glob("v*.safetensors")).write_bytes(b"tampered")
    report = store.check(repair=True)
    assert report.problems and "sha256" in report.problems[0]["problem"] and not report.clean


def test_epoch_moves_on_every_pointer_change(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    seen = [store.epoch()]
    ref = store.write("t", b"one")
    assert store.epoch() == seen[-1]  # a version that is not active changes nothing
    store.activate(ref)
    seen.append(store.epoch())
    store.activate(store.write("t", b"two"))
    seen.append(store.epoch())
    store.delete("t")
    seen.append(store.epoch())
    assert seen[0] == "" and len(set(seen)) == 4
    assert store.tasks() == [] and store.check().clean


def test_two_processes_sharing_a_directory_never_leave_a_pointer_to_a_missing_file(tmp_path: Path) -> None:
    a, b = LocalStore(tmp_path), LocalStore(tmp_path)
    ra = a.write("t", b"from a")
    rb = b.write("t", b"from b")  # b's upload is between its write and its activate...
    a.activate(ra)  # ...when a's lands: a must not remove b's newer file
    b.activate(rb)
    assert b.active("t") == rb and a.read(a.active("t")) == b"from b"
    assert a.check().clean  # a's older version went when b's became active
    a.discard(VersionRef("t", rb.version, "0" * 64))  # exact file only: the same number with other bytes
    assert a.read(a.active("t")) == b"from b"


class LostAnswer(LocalStore):
    """The pointer moves, then the answer is lost (as an S3 response can be): the change is made."""

    def activate(self, ref: VersionRef) -> None:
        super().activate(ref)
        raise StoreError("connection reset while reading the answer")


class PointerStuck(LocalStore):
    """The pointer cannot move (a full disk, a read-only directory): nothing changes."""

    def activate(self, ref: VersionRef) -> None:
        raise StoreError("no space left on device")


def test_an_upload_whose_pointer_moved_is_served_even_if_the_store_reported_an_error(
    tmp_path: Path, backbone: Backbone, adapter_for
) -> None:
    store = LostAnswer(tmp_path)
    engine = Engine(backbone, store=store)
    entry = engine.registry.upload("t", dumps(adapter_for("t", "compacter", seed=1)))
    assert engine.registry.get("t") == entry and store.active("t") == VersionRef("t", 1, entry.sha256)
    assert store.read(VersionRef("t", 1, entry.sha256))  # the file the pointer names was kept


def test_an_upload_whose_pointer_did_not_move_leaves_no_trace_and_is_counted(
    tmp_path: Path, backbone: Backbone, adapter_for
) -> None:
    metrics = Metrics()
    engine = Engine(backbone, store=PointerStuck(tmp_path), metrics=metrics)
    with pytest.raises(StoreError, match="no space"):
        engine.registry.upload("t", dumps(adapter_for("t", "compacter", seed=1)))
    assert engine.registry.peek("t") is None and list(tmp_path.iterdir()) == []  # no file, no empty task directory
    sample = metrics.registry.get_sample_value
    assert sample("kronserve_adapter_load_failures_total", {"source": "upload", "code": "store_error"}) == 1
