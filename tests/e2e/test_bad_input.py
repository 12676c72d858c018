"""Each bad input gets its documented status and code, and changes nothing: store, list, answers."""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import safetensors.torch
import torch

from kronserve.backbone import load_backbone
from kronserve.formats.native import dumps

from ..conftest import make_adapter
from .conftest import MODES, Server, upload

TOKEN = "s3cret-token"
LIMIT = 200_000


@pytest.fixture(scope="module", params=MODES)
def guarded(
    request: pytest.FixtureRequest, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory, adapter_bytes
) -> Iterator[Server]:
    store = tmp_path_factory.mktemp("guarded-store")
    limits = {"KRONSERVE_ADMIN_TOKEN": TOKEN, "KRONSERVE_MAX_UPLOAD_BYTES": str(LIMIT)}
    s = Server(tiny_dir, store, request.param, **limits).start()
    assert upload(s.url, "base", adapter_bytes("base", seed=7), token=TOKEN).status_code == 201
    yield s
    s.stop()


def snapshot(s: Server) -> tuple:
    files = sorted(
        (str(p.relative_to(s.store)), hashlib.sha256(p.read_bytes()).hexdigest())
        for p in s.store.rglob("*")
        if p.is_file()
    )
    listed = httpx.get(f"{s.url}/v1/adapters").json()
    answer = httpx.post(f"{s.url}/v1/score", json={"task": "base", "inputs": ["x"], "targets": ["y"]}).json()
    return files, listed, answer


def nan_adapter(tiny_dir: Path) -> bytes:
    a = make_adapter(load_backbone(str(tiny_dir), device="cpu"), "base", "compacter", seed=3)
    a.tensors["decoder.0.ffn.up.b"][0] = float("nan")
    return dumps(a)


def other_backbone_adapter(other_tiny_dir: Path) -> bytes:
    return dumps(make_adapter(load_backbone(str(other_tiny_dir), device="cpu"), "base", "compacter", seed=3))


def other_backbone_paper_checkpoint(other_tiny_dir: Path) -> bytes:
    """A paper whole-model checkpoint (here one backbone tensor and one adapter tensor, within the upload limit)
    whose frozen backbone weights are another backbone's of the same shape."""
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    state = {
        q: load_backbone(str(other_tiny_dir), device="cpu").weights[q].clone(),
        "encoder.block.0.layer.1.adapter_controller.adapters.base.down_sampler.b": torch.zeros(4),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def wrong_shape_adapter(tiny_dir: Path) -> bytes:
    good = dumps(make_adapter(load_backbone(str(tiny_dir), device="cpu"), "base", "compacter", seed=3))
    (n,) = struct.unpack("<Q", good[:8])
    import json

    meta = json.loads(good[8 : 8 + n])["__metadata__"]
    tensors = safetensors.torch.load(good)
    tensors["encoder.0.mh.down.b"] = torch.zeros(5)
    return safetensors.torch.save(tensors, metadata=meta)


def put(s: Server, task: str, files=None, content=None, headers=None, token: str | None = TOKEN) -> httpx.Response:
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    return httpx.request("PUT", f"{s.url}/v1/adapters/{task}", files=files, content=content, headers=h, timeout=30)


def file_part(data: bytes) -> dict:
    return {"file": ("adapter.safetensors", data)}


def post(s: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{s.url}/v1/{path}", json=body, timeout=30)


def raw_json(s: Server, content: bytes) -> httpx.Response:
    return httpx.post(f"{s.url}/v1/predict", content=content, headers={"content-type": "application/json"})


def delete(s: Server, token: str) -> httpx.Response:
    return httpx.delete(f"{s.url}/v1/adapters/base", headers={"Authorization": f"Bearer {token}"})


CASES = {
    "malformed json": (lambda s, d: raw_json(s, b'{"task": "base", "inp'), 400, "malformed_json"),
    "unknown task": (lambda s, d: post(s, "predict", {"task": "nope", "inputs": ["x"]}), 404, "unknown_task"),
    "invalid task id in body": (
        lambda s, d: post(s, "predict", {"task": "Bad Task", "inputs": ["x"]}), 422, "validation_error"
    ),
    "upper-case task id": (lambda s, d: put(s, "UPPER", file_part(d["good"])), 422, "validation_error"),
    "dot-dot task id": (lambda s, d: put(s, "%2e%2e", file_part(d["good"])), 422, "validation_error"),
    "slash in task id": (lambda s, d: put(s, "a%2fb", file_part(d["good"])), 404, "not_found"),
    "65-char task id": (lambda s, d: put(s, "a" * 65, file_part(d["good"])), 422, "validation_error"),
    "oversize upload": (lambda s, d: put(s, "big", file_part(b"\0" * (LIMIT + 10))), 413, "payload_too_large"),
    "truncated safetensors": (lambda s, d: put(s, "base", file_part(d["good"][:-64])), 422, "invalid_adapter"),
    "corrupt bytes": (lambda s, d: put(s, "base", file_part(b"\x80\x04garbage" * 50)), 415, "unsupported_format"),
    "wrong shapes": (lambda s, d: put(s, "base", file_part(d["wrong_shape"])), 422, "invalid_adapter"),
    "another backbone": (lambda s, d: put(s, "base", file_part(d["other"])), 422, "backbone_mismatch"),
    "paper checkpoint of another backbone": (
        lambda s, d: put(s, "base", {"file": ("pytorch_model.bin", d["other_paper"])}), 422, "backbone_mismatch"
    ),
    "nan weights": (lambda s, d: put(s, "base", file_part(d["nan"])), 422, "invalid_adapter"),
    "empty part": (lambda s, d: put(s, "base", file_part(b"")), 422, "invalid_adapter"),
    "no file part": (lambda s, d: put(s, "base", {"other": ("x", b"abc")}), 400, "bad_request"),
    "empty inputs": (lambda s, d: post(s, "predict", {"task": "base", "inputs": []}), 422, "validation_error"),
    "too many inputs": (
        lambda s, d: post(s, "predict", {"task": "base", "inputs": ["x"] * 65}), 422, "invalid_request"
    ),
    "mismatched targets": (
        lambda s, d: post(s, "score", {"task": "base", "inputs": ["a", "b"], "targets": ["c"]}), 422, "invalid_request"
    ),
    "wrong admin token (put)": (lambda s, d: put(s, "base", file_part(d["good"]), token="wrong"), 401, "unauthorized"),
    "no admin token (put)": (lambda s, d: put(s, "base", file_part(d["good"]), token=None), 401, "unauthorized"),
    "wrong admin token (delete)": (lambda s, d: delete(s, "nope"), 401, "unauthorized"),
    "too many beams": (
        lambda s, d: post(s, "predict", {"task": "base", "inputs": ["x"], "num_beams": 99}), 422, "invalid_request"
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def payloads(tiny_dir: Path, other_tiny_dir: Path, adapter_bytes) -> dict[str, bytes]:
    return {
        "good": adapter_bytes("base", seed=8),
        "nan": nan_adapter(tiny_dir),
        "other": other_backbone_adapter(other_tiny_dir),
        "other_paper": other_backbone_paper_checkpoint(other_tiny_dir),
        "wrong_shape": wrong_shape_adapter(tiny_dir),
    }


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_and_changes_nothing(guarded: Server, payloads, case: str) -> None:
    send, status, code = CASES[case]
    before = snapshot(guarded)
    r = send(guarded, payloads)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["message"]
    assert snapshot(guarded) == before


def test_probes_and_openapi(guarded: Server) -> None:
    ready = httpx.get(f"{guarded.url}/readyz").json()
    if guarded.mode == "single":
        assert ready == {"status": "ready", "adapters": 1}
    else:
        assert ready == {"status": "ready", "replicas": {"replica-0": "ready", "replica-1": "ready"}}
    assert httpx.get(f"{guarded.url}/healthz").json() == {"status": "ok"}
    paths = httpx.get(f"{guarded.url}/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/score", "/v1/adapters", "/v1/adapters/{task}"} <= set(paths)


def test_right_token_can_delete(guarded: Server, payloads) -> None:
    assert put(guarded, "gone", file_part(payloads["good"])).status_code == 201
    r = httpx.delete(f"{guarded.url}/v1/adapters/gone", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 204
    assert httpx.get(f"{guarded.url}/v1/adapters/gone").status_code == 404
    assert not (guarded.store / "gone").exists()
