"""What only the S3 store has: its object layout, a shared bucket, a compare-and-swap pointer, clear errors,
and two replicas serving the same adapter from one bucket."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kronserve.backbone import load_backbone
from kronserve.engine import Engine
from kronserve.errors import UnknownTask
from kronserve.formats.native import dumps
from kronserve.store import LocalStore, StoreConflict, StoreError, open_store, sha256_of

pytest.importorskip("boto3")
from kronserve.store.s3 import S3Store


def _body(client: Any, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_objects_are_laid_out_as_documented(s3_client: Any, bucket: str) -> None:
    """Other tools (and other kronserve versions) find adapters by this layout, so it is a contract."""
    store = S3Store(bucket, "/team/adapters/", client=s3_client)
    ref = store.write("t", b"data")
    store.activate(ref)
    keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"])
    sha = sha256_of(b"data")
    assert keys == ["team/adapters/EPOCH", "team/adapters/t/ACTIVE", f"team/adapters/t/versions/{sha}.safetensors"]
    assert json.loads(_body(s3_client, bucket, "team/adapters/t/ACTIVE")) == {"version": 1, "sha256": sha}
    assert _body(s3_client, bucket, f"team/adapters/t/versions/{sha}.safetensors") == b"data"
    assert _body(s3_client, bucket, "team/adapters/EPOCH").decode() == store.epoch() != ""


def test_sibling_prefixes_in_one_bucket_do_not_see_each_other(s3_client: Any, bucket: str) -> None:
    a, b = S3Store(bucket, "a", client=s3_client), S3Store(bucket, "b", client=s3_client)
    a.activate(a.write("t", b"from a"))
    assert b.tasks() == [] and b.active("t") is None and b.epoch() == ""
    b.activate(b.write("t", b"from b"))
    b.activate(b.write("t", b"from b, v2"))
    assert a.active("t").version == 1 and a.read(a.active("t")) == b"from a"
    a.delete("t")
    assert a.tasks() == [] and b.tasks() == ["t"] and b.read(b.active("t")) == b"from b, v2"


def test_tasks_follow_the_listing_across_pages(s3_client: Any, bucket: str) -> None:
    store = S3Store(bucket, "p", client=s3_client)
    store.page_size = 2
    names = [f"task{i}" for i in range(5)]
    for name in names:
        store.activate(store.write(name, name.encode()))
    store.write("unfinished", b"x")
    assert store.tasks() == names


def test_a_stale_upload_cannot_overwrite_a_newer_pointer(s3_client: Any, bucket: str) -> None:
    """Two gateways number their uploads after the same active version: the first to activate wins."""
    a, b = S3Store(bucket, "p", client=s3_client), S3Store(bucket, "p", client=s3_client)
    a.activate(a.write("t", b"v1"))
    theirs, ours = a.write("t", b"theirs"), b.write("t", b"ours")
    assert theirs.version == ours.version == 2
    a.activate(theirs)
    with pytest.raises(StoreConflict, match="changed during this upload"):
        b.activate(ours)
    b.discard(ours)  # what the registry does next
    assert b.active("t") == theirs and b.read(theirs) == b"theirs"


class RivalBeforePointerWrite:
    """A real client that lets a rival gateway act once, between our pointer read and our pointer write."""

    def __init__(self, client: Any, rival: Callable[[], None]) -> None:
        self._client, self._rival = client, rival

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def put_object(self, **kwargs: Any) -> Any:
        rival, self._rival = self._rival, None
        if kwargs["Key"].endswith("/ACTIVE") and rival is not None:
            rival()
        return self._client.put_object(**kwargs)


@pytest.mark.parametrize("first_upload", [True, False])
def test_the_pointer_write_is_conditional(s3_client: Any, bucket: str, first_upload: bool) -> None:
    """The server refuses our pointer write (If-Match / If-None-Match) when a rival moved it after we read it."""
    a = S3Store(bucket, "p", client=s3_client)
    if not first_upload:
        a.activate(a.write("t", b"v1"))
    theirs = a.write("t", b"theirs")
    b = S3Store(bucket, "p", client=s3_client)
    ours = b.write("t", b"ours")
    b.client = RivalBeforePointerWrite(s3_client, lambda: a.activate(theirs))
    with pytest.raises(StoreConflict, match="changed by another writer"):
        b.activate(ours)
    assert a.active("t") == theirs and a.read(theirs) == b"theirs"


def test_a_missing_bucket_is_a_clear_store_error(s3_endpoint: str) -> None:
    store = open_store("s3://no-such-bucket/p", endpoint_url=s3_endpoint)
    calls = [store.tasks, store.epoch, lambda: store.active("t"), lambda: store.write("t", b"x")]
    for call in calls:
        with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist") as caught:
            call()
        assert not isinstance(caught.value, StoreConflict)


def test_an_unreachable_endpoint_is_a_clear_store_error(s3_endpoint: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    store = S3Store("bucket", endpoint_url=f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(StoreError, match=f"cannot reach http://127.0.0.1:{port}"):
        store.tasks()
    assert time.monotonic() - started < 20  # bounded retries, no hang


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("AccessDenied", "access denied to s3://b/t/ACTIVE"),
        ("InvalidAccessKeyId", "check the credentials"),
        ("SlowDown", "S3 get_object s3://b/t/ACTIVE failed: SlowDown: why"),
    ],
)
def test_client_errors_name_their_cause(code: str, expected: str) -> None:
    """moto does not enforce credentials, so these answers are replayed through a client that only raises."""
    from botocore.exceptions import ClientError

    class Refusing:
        def get_object(self, **kwargs: Any) -> Any:
            raise ClientError({"Error": {"Code": code, "Message": "why"}}, "GetObject")

    with pytest.raises(StoreError, match=expected):
        S3Store("b", client=Refusing()).active("t")


def test_open_store_picks_the_store_by_location(s3_endpoint: str, tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path / "dir")), LocalStore)
    store = open_store("s3://bkt/a/b/", endpoint_url=s3_endpoint)
    assert isinstance(store, S3Store) and (store.bucket, store.prefix) == ("bkt", "a/b/")
    assert open_store("s3://bkt").prefix == ""
    with pytest.raises(ValueError, match="bucket"):
        open_store("s3:///prefix")
    with pytest.raises(ValueError, match="fault_point"):
        open_store("s3://bkt", fault_point="pointer_renamed")


def test_the_local_default_never_imports_boto3(tmp_path: Path) -> None:
    code = f"import sys; from kronserve.store import open_store; open_store({str(tmp_path)!r}); "
    code += "print('boto3' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_a_second_replica_serves_what_the_first_uploaded(
    s3_client: Any, bucket: str, tiny_dir: Path, adapter_for
) -> None:
    """Two engines (own backbone copy, own bank) on one bucket: refresh is how a replica picks up an upload."""
    store = S3Store(bucket, "replicas", client=s3_client)
    a = Engine(load_backbone(str(tiny_dir), device="cpu"), store=store)
    b = Engine(load_backbone(str(tiny_dir), device="cpu"), store=store)
    rows = (["t", None], ["summarize: the cat sat", "summarize: the cat sat"], ["a cat", "a cat"])

    epoch = store.epoch()
    data = dumps(adapter_for("t", "compacter", seed=1))
    up = a.registry.upload("t", data)
    assert store.epoch() != epoch  # what a polling replica watches
    got = b.registry.refresh("t")
    assert (got.version, got.sha256) == (up.version, up.sha256) == (1, sha256_of(data))
    first = a.score(*rows).scores
    assert b.score(*rows).scores == pytest.approx(first, abs=1e-6)
    assert first[0] != pytest.approx(first[1], abs=1e-3)  # the adapter changes the answer

    up2 = a.registry.upload("t", dumps(adapter_for("t", "compacter", seed=2)))
    assert b.registry.refresh("t").sha256 == up2.sha256 and b.registry.get("t").version == 2
    second = b.score(*rows).scores
    assert second == pytest.approx(a.score(*rows).scores, abs=1e-6) and second[0] != pytest.approx(first[0])
    fresh = Engine(load_backbone(str(tiny_dir), device="cpu"), store=store)
    assert fresh.registry.load_store() == ["t"] and fresh.registry.get("t").version == 2  # a replica starting now

    a.registry.delete("t")
    assert b.registry.refresh("t") is None and store.tasks() == []
    with pytest.raises(UnknownTask):
        b.score(*rows)
