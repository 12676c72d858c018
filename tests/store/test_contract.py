"""One contract, every store: what the registry relies on holds for the local directory and for S3 alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kronserve.errors import InvalidRequest, UnknownTask
from kronserve.store import AdapterStore, LocalStore, StoreError, VersionRef, sha256_of
from kronserve.store import local as local_module


class LocalBackend:
    """A LocalStore plus the ways a test reaches behind it (its files)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store: AdapterStore = LocalStore(root)

    def objects(self, task: str) -> list[str]:
        """The task's files, also those a delete renamed away (`.tmp-<hex>-deleted-<task>`) and left behind."""
        dirs = [self.root / task, *self.root.glob(f".tmp-*-deleted-{task}")]
        return sorted(p.name for d in dirs if d.is_dir() for p in d.iterdir())

    def corrupt(self, ref: VersionRef) -> None:
        next((self.root / ref.task).glob(f"v{ref.version:06d}-*.safetensors")).write_bytes(b"tampered")

    def break_cleanup(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Removing a task's files after its pointer does nothing, as if the process died right there."""
        monkeypatch.setattr(local_module.shutil, "rmtree", lambda *a, **k: None)


class S3Backend:
    """An S3Store on the real local server, plus a raw client to reach behind it."""

    def __init__(self, client: Any, bucket: str) -> None:
        from kronserve.store.s3 import S3Store

        self.client, self.bucket = client, bucket
        self.store: AdapterStore = S3Store(bucket, "kron/", client=client)

    def objects(self, task: str) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"kron/{task}/").get("Contents", [])
        return sorted(o["Key"].removeprefix(f"kron/{task}/") for o in listed)

    def corrupt(self, ref: VersionRef) -> None:
        key = f"kron/{ref.task}/versions/{ref.sha256}.safetensors"
        self.client.put_object(Bucket=self.bucket, Key=key, Body=b"tampered")

    def break_cleanup(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(self.store, "_remove", lambda *a, **k: None)


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> LocalBackend | S3Backend:
    if request.param == "local":
        return LocalBackend(tmp_path / "store")
    return S3Backend(request.getfixturevalue("s3_client"), request.getfixturevalue("bucket"))


def test_a_written_version_is_readable_but_not_active(backend) -> None:
    store = backend.store
    ref = store.write("t", b"one")
    assert ref == VersionRef("t", 1, sha256_of(b"one"))
    assert store.active("t") is None and store.tasks() == [] and store.epoch() == ""
    assert store.read(ref) == b"one"


def test_activate_moves_the_pointer_and_drops_the_replaced_version(backend) -> None:
    store = backend.store
    v1 = store.write("t", b"one")
    store.activate(v1)
    assert store.active("t") == v1 and store.tasks() == ["t"]
    v2 = store.write("t", b"two")
    assert store.active("t") == v1  # writing is not activating
    store.activate(v2)
    assert store.active("t") == v2 and store.read(v2) == b"two"
    with pytest.raises(StoreError):
        store.read(v1)
    assert len(backend.objects("t")) == 2  # the pointer and the one version it names


def test_read_detects_content_changed_behind_the_stores_back(backend) -> None:
    store = backend.store
    ref = store.write("t", b"payload")
    store.activate(ref)
    backend.corrupt(ref)
    with pytest.raises(StoreError, match="does not match its sha256"):
        store.read(ref)


def test_versions_count_up_per_task_and_restart_after_delete(backend) -> None:
    store = backend.store
    store.activate(store.write("t", b"one"))
    store.activate(store.write("t", b"two"))
    store.activate(store.write("other", b"x"))
    assert store.write("t", b"three").version == 3
    assert store.active("other").version == 1 and store.tasks() == ["other", "t"]
    store.delete("t")
    assert store.write("t", b"again").version == 1


def test_reuploading_identical_bytes_is_a_new_version_that_keeps_the_content(backend) -> None:
    store = backend.store
    v1 = store.write("t", b"same")
    store.activate(v1)
    again = store.write("t", b"same")
    assert again.version == 2 and again.sha256 == v1.sha256
    store.discard(again)  # a failed re-upload must not take the active content with it
    assert store.active("t") == v1 and store.read(v1) == b"same"
    again = store.write("t", b"same")
    store.activate(again)
    assert store.active("t") == again and store.read(again) == b"same"
    assert len(backend.objects("t")) == 2


def test_discard_removes_only_the_never_activated_version(backend) -> None:
    store = backend.store
    v1 = store.write("t", b"one")
    store.activate(v1)
    epoch = store.epoch()
    v2 = store.write("t", b"two")
    store.discard(v2)
    with pytest.raises(StoreError):
        store.read(v2)
    assert store.active("t") == v1 and store.read(v1) == b"one" and store.epoch() == epoch
    assert len(backend.objects("t")) == 2


def test_delete_removes_the_task_and_then_is_unknown(backend) -> None:
    store = backend.store
    store.activate(store.write("t", b"x"))
    store.activate(store.write("keep", b"y"))
    store.delete("t")
    assert store.active("t") is None and store.tasks() == ["keep"] and backend.objects("t") == []
    with pytest.raises(UnknownTask):
        store.delete("t")
    with pytest.raises(UnknownTask):
        store.delete("never")
    store.write("unfinished", b"z")
    with pytest.raises(UnknownTask):  # an upload that never activated is not a task
        store.delete("unfinished")
    assert store.read(store.active("keep")) == b"y"


def test_delete_removes_the_pointer_before_the_objects(backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dying between the two steps leaves orphans that are never served, not a task without its file."""
    store = backend.store
    store.activate(store.write("t", b"x"))
    epoch = store.epoch()
    backend.break_cleanup(monkeypatch)
    store.delete("t")
    assert store.active("t") is None and store.tasks() == [] and store.epoch() != epoch
    assert backend.objects("t")  # the version is still there, but nothing names it


def test_epoch_moves_on_activate_and_delete_only(backend) -> None:
    store = backend.store
    seen = [store.epoch()]
    ref = store.write("t", b"one")
    assert store.epoch() == seen[-1]
    store.activate(ref)
    seen.append(store.epoch())
    store.read(ref)
    store.discard(store.write("t", b"abandoned"))
    assert store.epoch() == seen[-1]  # reads, writes and discards change nothing a replica serves
    store.activate(store.write("t", b"two"))
    seen.append(store.epoch())
    store.delete("t")
    seen.append(store.epoch())
    assert seen[0] == "" and len(set(seen)) == 4


BAD_IDS = ["..", "../x", "/abs", "a/b", "UP", "a\0b", "x" * 65, "", "t/../../etc"]
CALLS = {
    "write": lambda s, t: s.write(t, b"x"),
    "active": lambda s, t: s.active(t),
    "read": lambda s, t: s.read(VersionRef(t, 1, sha256_of(b"x"))),
    "activate": lambda s, t: s.activate(VersionRef(t, 1, sha256_of(b"x"))),
    "discard": lambda s, t: s.discard(VersionRef(t, 1, sha256_of(b"x"))),
    "delete": lambda s, t: s.delete(t),
}


@pytest.mark.parametrize("call", CALLS)
def test_invalid_task_ids_are_refused_at_every_entry_point(backend, call: str) -> None:
    for bad in BAD_IDS:
        with pytest.raises(InvalidRequest):
            CALLS[call](backend.store, bad)
    assert backend.store.tasks() == [] and backend.store.epoch() == ""
