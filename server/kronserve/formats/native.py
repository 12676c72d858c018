"""The native adapter file (`format_version` 1): one safetensors file, self-describing.

Metadata (all strings, as safetensors requires): `format` = "kronserve-adapter", `format_version`,
`task`, `spec` (JSON of the method spec), `backbone` (JSON of the backbone fingerprint). Tensors are
named as `MethodSpec.tensor_shapes` says. Everything is checked before anything is served.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ..backbone import Fingerprint
from ..errors import InvalidAdapter, InvalidSpec, UnsupportedFormat
from ..methods import Geometry, MethodSpec, parse_spec

FORMAT = "kronserve-adapter"
FORMAT_VERSION = "1"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEADER = 16 * 1024 * 1024


@dataclass(frozen=True)
class AdapterFile:
    """A validated adapter: its task, method spec, the backbone it belongs to, and float32 tensors."""

    task: str
    spec: MethodSpec
    fingerprint: Fingerprint
    tensors: dict[str, torch.Tensor]

    @property
    def geometry(self) -> Geometry:
        return self.fingerprint.geometry


def dumps(adapter: AdapterFile) -> bytes:
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": adapter.task,
        "spec": adapter.spec.model_dump_json(),
        "backbone": json.dumps(adapter.fingerprint.as_dict(), sort_keys=True),
    }
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in sorted(adapter.tensors.items())}
    return safetensors.torch.save(tensors, metadata=metadata)


def save(adapter: AdapterFile, path: str | Path) -> None:
    Path(path).write_bytes(dumps(adapter))


def load(path: str | Path, expect: Fingerprint | None = None) -> AdapterFile:
    return loads(Path(path).read_bytes(), expect)


def loads(data: bytes, expect: Fingerprint | None = None) -> AdapterFile:
    """Parse and validate a native file; `expect` is the serving backbone's fingerprint."""
    metadata = read_metadata(data)
    spec = _spec_of(metadata)
    fingerprint = Fingerprint.from_dict(_json_field(metadata, "backbone"))
    if expect is not None:
        expect.check(fingerprint)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own SafetensorError for any malformed body
        raise InvalidAdapter(f"not a readable safetensors file: {e}") from e
    adapter = AdapterFile(str(metadata["task"]), spec, fingerprint, tensors)
    return AdapterFile(adapter.task, spec, fingerprint, check_tensors(spec, adapter.geometry, tensors))


def is_native(data: bytes) -> bool:
    """Whether `data` is a safetensors file whose metadata says kronserve (valid or not: `loads` says)."""
    try:
        metadata = _header(data).get("__metadata__")
    except InvalidAdapter:
        return False
    return isinstance(metadata, dict) and metadata.get("format") == FORMAT


def read_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's `__metadata__`, checked to be a kronserve file of a known version."""
    metadata = _header(data).get("__metadata__")
    if not isinstance(metadata, dict):
        raise InvalidAdapter("safetensors file has no __metadata__: not a kronserve adapter")
    bad = sorted(k for k, v in metadata.items() if not isinstance(v, str))
    if bad:
        raise InvalidAdapter(f"metadata values must be strings; not so for {bad[:5]}")
    if metadata.get("format") != FORMAT:
        raise InvalidAdapter(f"metadata 'format' is {metadata.get('format')!r}, expected {FORMAT!r}")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise InvalidAdapter(
            f"metadata 'format_version' is {metadata.get('format_version')!r}; this server reads {FORMAT_VERSION!r}"
        )
    if not metadata.get("task"):
        raise InvalidAdapter("metadata 'task' is missing")
    return metadata


def _header(data: bytes) -> dict:
    """The JSON header of a safetensors file, or an error saying why `data` is not one."""
    if not data:
        raise InvalidAdapter("empty file")
    if len(data) < 9 or data[8:9] != b"{":
        raise UnsupportedFormat("not a safetensors file: it does not start with a length and a JSON header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise InvalidAdapter(f"not a safetensors file: header length {n} exceeds the file ({len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, huge ints, absurd nesting
        raise InvalidAdapter(f"not a safetensors file: header is not readable JSON ({type(e).__name__})") from e
    if not isinstance(header, dict):
        raise InvalidAdapter("not a safetensors file: header is not a JSON object")
    return header


def check_tensors(spec: MethodSpec, geometry: Geometry, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every expected tensor present with its shape, a float dtype and finite values; none extra.

    Returns float32 copies. Errors name the offending tensor.
    """
    spec.check_geometry(geometry)
    expected = spec.tensor_shapes(geometry)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise InvalidAdapter(f"missing tensors ({len(missing)}): {', '.join(missing[:5])}")
    if extra:
        raise InvalidAdapter(f"unexpected tensors ({len(extra)}): {', '.join(extra[:5])}")
    out = {}
    for name, shape in expected.items():
        t = tensors[name]
        if t.dtype not in FLOAT_DTYPES:
            raise InvalidAdapter(f"tensor {name!r} has dtype {t.dtype}; expected float32, float16 or bfloat16")
        if tuple(t.shape) != shape:
            raise InvalidAdapter(f"tensor {name!r} has shape {list(t.shape)}; expected {list(shape)}")
        t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            raise InvalidAdapter(f"tensor {name!r} holds NaN or Inf values")
        out[name] = t
    return out


def _json_field(metadata: dict[str, str], key: str) -> dict[str, Any]:
    if key not in metadata:
        raise InvalidAdapter(f"metadata {key!r} is missing")
    try:
        value = json.loads(metadata[key])
    except (ValueError, RecursionError) as e:
        raise InvalidAdapter(f"metadata {key!r} is not JSON: {type(e).__name__}: {str(e)[:200]}") from e
    if not isinstance(value, dict):
        raise InvalidAdapter(f"metadata {key!r} must be a JSON object")
    return value


def _spec_of(metadata: dict[str, str]) -> MethodSpec:
    try:
        return parse_spec(_json_field(metadata, "spec"))
    except InvalidSpec as e:
        raise InvalidSpec(f"metadata 'spec': {e}") from e
