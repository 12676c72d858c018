"""A re-upload that cannot be served is refused with its own 4xx code and changes nothing: the old version keeps
answering exactly as before, the list is as it was, and the store holds the same files (no temp, no orphan)."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import safetensors.torch
import torch

from kronserve.methods import preset
from kronserve.store import LocalStore

from ..e2e.conftest import Server, upload
from .conftest import TIMEOUT, Payload, Reference, ask, error_code, tree

TASK = "keep"


def split(data: bytes) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A native file's metadata and tensors."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])["__metadata__"], safetensors.torch.load(data)


def with_spec(data: bytes, spec: dict) -> bytes:
    """The same tensors under another spec in the metadata."""
    meta, tensors = split(data)
    return safetensors.torch.save(tensors, metadata={**meta, "spec": json.dumps(spec)})


def with_tensor(data: bytes, name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> bytes:
    meta, tensors = split(data)
    assert name in tensors
    tensors[name] = make(tensors[name])
    return safetensors.torch.save(tensors, metadata=meta)


def nan_at_end(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[-1] = float("nan")
    return t


def renamed_method(data: bytes, method: str) -> bytes:
    meta, _ = split(data)
    return with_spec(data, {**json.loads(meta["spec"]), "method": method})


# name -> (how to spoil a good compacter file, or None for "use the other backbone's file"), status, code
CASES: dict[str, tuple[Callable[[bytes], bytes] | None, int, str]] = {
    "truncated body": (lambda d: d[:-100], 422, "invalid_adapter"),
    "truncated header": (lambda d: d[:200], 422, "invalid_adapter"),
    "truncated to 8 bytes": (lambda d: d[:8], 415, "unsupported_format"),
    "wrong-shape tensor": (lambda d: with_tensor(d, "encoder.0.mh.down.b", lambda t: torch.zeros(t.numel() + 1)),
                           422, "invalid_adapter"),
    "NaN tensor": (lambda d: with_tensor(d, "decoder.1.ffn.up.W_right", nan_at_end), 422, "invalid_adapter"),
    "Inf tensor": (lambda d: with_tensor(d, "phm_rule", lambda t: t.fill_(float("inf"))), 422, "invalid_adapter"),
    "other backbone": (None, 422, "backbone_mismatch"),
    "spec says houlsby": (lambda d: with_spec(d, preset("houlsby").model_dump()), 422, "invalid_adapter"),
    "spec says lora": (lambda d: with_spec(d, preset("lora").model_dump()), 422, "invalid_adapter"),
    "spec says compacter++": (lambda d: with_spec(d, preset("compacter++").model_dump()), 422, "invalid_adapter"),
    "unknown method": (lambda d: renamed_method(d, "compacter-xl"), 422, "invalid_spec"),
}  # fmt: skip


@pytest.fixture(scope="module")
def keeper(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory, payload: Payload) -> Iterator[Server]:
    s = Server(tiny_dir, tmp_path_factory.mktemp("failed-swap") / "store").start()
    r = upload(s.url, TASK, payload(TASK, seed=21))
    assert r.status_code == 201 and r.json()["version"] == 1, r.text
    yield s
    s.stop()


def state(s: Server) -> tuple:
    """What a failed swap must not change: the store tree (every file's hash), the list and the task's answer."""
    listed = httpx.get(f"{s.url}/v1/adapters", timeout=TIMEOUT).json()
    return tree(s.store), listed, ask(s.url, TASK)


@pytest.mark.parametrize("case", list(CASES))
def test_failed_reupload_changes_nothing(
    keeper: Server, payload: Payload, other_payload: Payload, reference: Reference, case: str
) -> None:
    spoil, status, code = CASES[case]
    good = payload(TASK, seed=22)
    bad = other_payload(TASK, seed=22) if spoil is None else spoil(good)
    before = state(keeper)
    version, answer = before[2]
    assert version == 1 and answer.matches(reference.answer(payload(TASK, seed=21)))  # v1 serves as it should

    r = upload(keeper.url, TASK, bad)
    assert r.status_code == status, r.text
    assert error_code(r) == code, r.text

    assert state(keeper) == before
    files = sorted(p.name for p in (keeper.store / TASK).iterdir())
    assert files[0] == "ACTIVE" and len(files) == 2 and files[1].startswith("v000001-"), files
    report = LocalStore(keeper.store).check()
    assert report.ok == [TASK] and report.problems == [] and report.orphans == []


def test_after_failed_swaps_a_good_one_is_the_next_version(
    keeper: Server, payload: Payload, reference: Reference
) -> None:
    data = payload(TASK, seed=23)
    r = upload(keeper.url, TASK, data)
    assert r.status_code == 201 and r.json()["version"] == 2, r.text
    assert r.json()["sha256"] == hashlib.sha256(data).hexdigest()
    version, answer = ask(keeper.url, TASK)
    assert version == 2 and answer.matches(reference.answer(data))
    assert sorted(p.name for p in (keeper.store / TASK).iterdir()) == [
        "ACTIVE",
        f"v000002-{r.json()['sha256'][:16]}.safetensors",
    ]
