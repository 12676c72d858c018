"""Malformed adapter files are refused with an error that names what is wrong."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch

from kronserve.backbone import load_backbone
from kronserve.errors import BackboneMismatch, InvalidAdapter, InvalidSpec
from kronserve.formats.native import AdapterFile, dumps, loads


@pytest.fixture
def good(adapter_for) -> AdapterFile:
    return adapter_for("sst2", "compacter", std=0.2)


def rewrite(a: AdapterFile, tensors: dict[str, torch.Tensor] | None = None, **meta: str) -> bytes:
    data = dumps(a)
    (n,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + n])["__metadata__"]
    metadata.update(meta)
    return safetensors.torch.save(tensors if tensors is not None else a.tensors, metadata=metadata)


def test_round_trip_keeps_everything(good: AdapterFile, backbone) -> None:
    back = loads(dumps(good), backbone.fingerprint)
    assert back.task == "sst2" and back.spec == good.spec
    assert all(torch.equal(back.tensors[k], v) for k, v in good.tensors.items())


def test_wrong_shape_names_the_tensor(good: AdapterFile, backbone) -> None:
    t = dict(good.tensors, **{"encoder.0.mh.down.b": torch.zeros(3)})
    with pytest.raises(InvalidAdapter, match=r"'encoder.0.mh.down.b' has shape \[3\]; expected \[4\]"):
        loads(rewrite(good, t), backbone.fingerprint)


def test_missing_and_extra_tensors(good: AdapterFile, backbone) -> None:
    missing = {k: v for k, v in good.tensors.items() if k != "phm_rule"}
    with pytest.raises(InvalidAdapter, match=r"missing tensors.*phm_rule"):
        loads(rewrite(good, missing), backbone.fingerprint)
    with pytest.raises(InvalidAdapter, match=r"unexpected tensors.*encoder.0.mh.lora_A"):
        loads(rewrite(good, dict(good.tensors, **{"encoder.0.mh.lora_A": torch.zeros(2)})), backbone.fingerprint)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_name_the_tensor(good: AdapterFile, backbone, bad: float) -> None:
    t = dict(good.tensors)
    t["decoder.1.ffn.up.W_left"] = t["decoder.1.ffn.up.W_left"].clone()
    t["decoder.1.ffn.up.W_left"][0, 0, 0] = bad
    with pytest.raises(InvalidAdapter, match=r"'decoder.1.ffn.up.W_left' holds NaN or Inf"):
        loads(rewrite(good, t), backbone.fingerprint)


def test_integer_dtype_is_refused(good: AdapterFile, backbone) -> None:
    t = dict(good.tensors, phm_rule=torch.zeros(4, 4, 4, dtype=torch.int32))
    with pytest.raises(InvalidAdapter, match=r"'phm_rule' has dtype torch.int32"):
        loads(rewrite(good, t), backbone.fingerprint)


@pytest.mark.parametrize(
    ("meta", "error", "needle"),
    [
        ({"spec": "{not json"}, InvalidAdapter, "metadata 'spec' is not JSON"),
        ({"spec": json.dumps({"method": "compacter"})}, InvalidSpec, "placement"),
        ({"spec": json.dumps({"method": "prefix-tuning"})}, InvalidSpec, "method"),
        ({"format_version": "2"}, InvalidAdapter, "format_version"),
        ({"format": "something-else"}, InvalidAdapter, "'format'"),
        ({"task": ""}, InvalidAdapter, "'task' is missing"),
        ({"backbone": json.dumps({"d_model": 128})}, BackboneMismatch, "not a fingerprint"),
    ],
)
def test_bad_metadata(good: AdapterFile, backbone, meta: dict, error: type, needle: str) -> None:
    with pytest.raises(error, match=needle):
        loads(rewrite(good, **meta), backbone.fingerprint)


def test_other_backbone_is_refused(adapter_for, other_tiny_dir, backbone) -> None:
    other = load_backbone(str(other_tiny_dir), device="cpu")
    with pytest.raises(BackboneMismatch, match="another backbone: digest"):
        loads(dumps(adapter_for("t", "compacter")), other.fingerprint)
    assert other.fingerprint.d_model == backbone.fingerprint.d_model  # same shape, other weights


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "empty file"),
        (b"\x80\x04\x95" + b"\0" * 40, "not a safetensors file"),
        (b"PK\x03\x04" + b"\0" * 40, "not a safetensors file"),
        (b"hello, this is a text file", "not a safetensors file"),
        (struct.pack("<Q", 10**6) + b"{}", "exceeds the file"),
        (struct.pack("<Q", 4) + b"{\xff\xfe}", "not readable JSON"),
        (struct.pack("<Q", 100_005) + b'{"a":' + b"[" * 100_000, "not readable JSON"),
        (struct.pack("<Q", 2) + b"{}", "no __metadata__"),
    ],
)
def test_not_safetensors(data: bytes, needle: str) -> None:
    with pytest.raises(InvalidAdapter, match=needle):
        loads(data)


@pytest.mark.parametrize("value", [5, None, ["a"], {"method": "compacter"}])
def test_non_string_metadata_is_refused(good: AdapterFile, backbone, value) -> None:
    data = dumps(good)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["spec"] = value
    raw = json.dumps(header).encode()
    with pytest.raises(InvalidAdapter, match="metadata values must be strings"):
        loads(struct.pack("<Q", len(raw)) + raw + data[8 + n :], backbone.fingerprint)


def test_huge_integers_and_nan_scaling_are_refused(good: AdapterFile, backbone) -> None:
    with pytest.raises(InvalidAdapter, match="not JSON"):
        loads(rewrite(good, spec='{"method": "compacter", "scaling": ' + "9" * 5000 + "}"), backbone.fingerprint)
    spec = json.loads(good.spec.model_dump_json())
    with pytest.raises(InvalidSpec, match="scaling"):
        loads(rewrite(good, spec=json.dumps({**spec, "scaling": float("nan")})), backbone.fingerprint)


@pytest.mark.parametrize(
    ("field", "value"), [("d_model", "128"), ("d_model", 128.0), ("num_layers", True), ("num_layers", 10**7)]
)
def test_fingerprint_fields_are_type_checked(good: AdapterFile, field: str, value) -> None:
    fp = dict(good.fingerprint.as_dict(), **{field: value})
    with pytest.raises(BackboneMismatch, match=f"backbone.{field}"):
        loads(rewrite(good, backbone=json.dumps(fp)))


def test_truncated_body(good: AdapterFile, backbone) -> None:
    data = dumps(good)
    with pytest.raises(InvalidAdapter, match="not a readable safetensors file"):
        loads(data[: len(data) - 100], backbone.fingerprint)
