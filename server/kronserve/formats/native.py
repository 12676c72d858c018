"""The native adapter file (`format_version` 1): one safetensors file, self-describing.

Metadata (all strings, as safetensors requires): `format` = "kronserve-adapter", `format_version`,
`task`, `spec` (JSON of the method spec), `backbone` (JSON of the backbone fingerprint), and optionally
`base_model`: the backbone an imported adapter's source declares it was trained on (PEFT's
`base_model_name_or_path`, AdapterHub's `model_name`), kept as a record; the fingerprint is what is checked. Tensors are
named as `MethodSpec.tensor_shapes` says. Everything is checked before anything is served, and refusing
is cheap: the header's length is bounded by what any adapter for the backbone needs, and every tensor's
name, shape and dtype is checked from the header before a byte of tensor data is read.
"""

from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ..backbone import Fingerprint
from ..errors import BackboneMismatch, InvalidAdapter, InvalidSpec, UnsupportedFormat
from ..methods import Geometry, MethodSpec, parse_spec

FORMAT = "kronserve-adapter"
FORMAT_VERSION = "1"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEADER_DTYPES = {"F32", "F16", "BF16"}  # safetensors' names for FLOAT_DTYPES
# safetensors' dtype names -> torch's, to name a refused dtype as `check_tensors` does
_TORCH_NAMES = {"F64": "float64", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8"}
MAX_HEADER = 16 * 1024 * 1024  # any file, backbone unknown
NATIVE_PROBE_HEADER = 1024 * 1024  # `is_native` parses no more (a t5-xxl adapter's header is ~300 KB)
# A header bound per backbone: metadata (spec, fingerprint: a few KB) + per tensor its entry (~100 bytes), for
# at most 16 tensors per site, 2 per projection, one per norm and a few shared: a sane writer stays far below.
_HEADER_BASE, _HEADER_PER_TENSOR = 64 * 1024, 160
MAX_BASE_MODEL = 1024  # characters of a declared base model (a hub id or a path)


@dataclass(frozen=True)
class AdapterFile:
    """A validated adapter: its task, method spec, the backbone it belongs to, and float32 tensors."""

    task: str
    spec: MethodSpec
    fingerprint: Fingerprint
    tensors: dict[str, torch.Tensor]
    base_model: str | None = None  # the declared training backbone of an imported adapter, if its source says

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
    if adapter.base_model is not None:
        metadata["base_model"] = adapter.base_model
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in sorted(adapter.tensors.items())}
    return safetensors.torch.save(tensors, metadata=metadata)


def save(adapter: AdapterFile, path: str | Path) -> None:
    Path(path).write_bytes(dumps(adapter))


def load(path: str | Path, expect: Fingerprint | None = None) -> AdapterFile:
    return loads(Path(path).read_bytes(), expect)


def loads(data: bytes, expect: Fingerprint | None = None) -> AdapterFile:
    """Parse and validate a native file; `expect` is the serving backbone's fingerprint.

    Everything but the values (NaN/Inf) is checked from the header first, so a wrong file costs
    milliseconds whatever its size or tensor count.
    """
    header = _header(data, MAX_HEADER if expect is None else header_limit(expect.geometry))
    metadata = _metadata(header)
    spec = _spec_of(metadata)
    fingerprint = Fingerprint.from_dict(_json_field(metadata, "backbone"))
    if expect is not None:
        _check_backbone(expect, fingerprint, metadata)
    check_header(spec, fingerprint.geometry, header)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own SafetensorError for any malformed body
        raise InvalidAdapter(f"not a readable safetensors file: {e}") from e
    tensors = check_tensors(spec, fingerprint.geometry, tensors)
    return AdapterFile(str(metadata["task"]), spec, fingerprint, tensors, _base_model(metadata))


def loads_header(head: bytes, expect: Fingerprint) -> tuple[MethodSpec, str | None, int]:
    """(spec, declared base model, file size the header describes) from a file's first bytes (at least its
    header): every check `loads` makes before reading tensor data. Registering a stored version needs no more
    (a size that differs from the file's is damage the caller reports); its weights are read and their values
    checked when a request first needs them."""
    header = _header(head, header_limit(expect.geometry))
    data = 0
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if name != "__metadata__" and isinstance(entry, dict) else None
        if isinstance(offsets, list) and len(offsets) == 2 and isinstance(offsets[1], int) and offsets[1] > data:
            data = offsets[1]
    metadata = _metadata(header)
    spec = _spec_of(metadata)
    if "backbone" not in metadata:
        raise InvalidAdapter("metadata 'backbone' is missing")
    fingerprint = _fingerprint_of(metadata["backbone"])
    _check_backbone(expect, fingerprint, metadata)
    check_header(spec, fingerprint.geometry, header)
    return spec, _base_model(metadata), 8 + int.from_bytes(head[:8], "little") + data


@functools.lru_cache(maxsize=64)
def _fingerprint_of(text: str) -> Fingerprint:
    """A catalogue's files name one backbone: parse its fingerprint once."""
    return Fingerprint.from_dict(_json_field({"backbone": text}, "backbone"))


def is_native(data: bytes) -> bool:
    """Whether `data` is a safetensors file whose metadata says kronserve (valid or not: `loads` says).

    A header too large for any adapter is not parsed here (False): the importers then refuse it cheaply.
    """
    try:
        metadata = _header(data, NATIVE_PROBE_HEADER).get("__metadata__")
    except InvalidAdapter:
        return False
    return isinstance(metadata, dict) and metadata.get("format") == FORMAT


def read_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's `__metadata__`, checked to be a kronserve file of a known version."""
    return _metadata(_header(data, MAX_HEADER))


def _metadata(header: dict) -> dict[str, str]:
    metadata = header.get("__metadata__")
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


def _check_backbone(expect: Fingerprint, fingerprint: Fingerprint, metadata: dict[str, str]) -> None:
    """BackboneMismatch also names the backbone the file says it was made on (`base_model`), not digests alone."""
    try:
        expect.check(fingerprint)
    except BackboneMismatch as e:
        base = metadata.get("base_model")
        raise BackboneMismatch(f"{e}; the adapter was made on {base!r}" if base else str(e)) from None


def _base_model(metadata: dict[str, str]) -> str | None:
    base = metadata.get("base_model")
    if base is not None and not 0 < len(base) <= MAX_BASE_MODEL:
        raise InvalidAdapter(f"metadata 'base_model' must be 1 to {MAX_BASE_MODEL} characters")
    return base


@functools.lru_cache(maxsize=64)
def header_limit(geometry: Geometry) -> int:
    """The longest safetensors header an adapter for `geometry` can need (see _HEADER_BASE)."""
    tensors = 16 * len(geometry.all_sites()) + 2 * len(geometry.all_linears()) + len(geometry.all_norms()) + 8
    return _HEADER_BASE + _HEADER_PER_TENSOR * tensors


def _header(data: bytes, limit: int) -> dict:
    """The JSON header of a safetensors file, or an error saying why `data` is not one; a header over `limit`
    bytes is refused unread (parsing 100,000 entries takes seconds and hundreds of MB)."""
    if not data:
        raise InvalidAdapter("empty file")
    if len(data) < 9 or data[8:9] != b"{":
        raise UnsupportedFormat("not a safetensors file: it does not start with a length and a JSON header")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise InvalidAdapter(f"not a safetensors file: header length {n} exceeds the file ({len(data)} bytes)")
    if n > limit:
        raise InvalidAdapter(
            f"safetensors header of {n} bytes is larger than any adapter for this backbone needs "
            f"({limit} bytes): too many tensors or too much metadata"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, huge ints, absurd nesting
        raise InvalidAdapter(f"not a safetensors file: header is not readable JSON ({type(e).__name__})") from e
    if not isinstance(header, dict):
        raise InvalidAdapter("not a safetensors file: header is not a JSON object")
    return header


def check_header(spec: MethodSpec, geometry: Geometry, header: dict) -> None:
    """Every expected tensor listed with its shape and a float dtype, none extra: from the header alone.

    The same refusals as `check_tensors`, before any tensor data is read or allocated.
    """
    expected = _expected(spec, geometry)
    listed = {k: v for k, v in header.items() if k != "__metadata__"}
    _check_names(expected, listed)
    for name, shape in expected.items():
        entry = listed[name]
        if not isinstance(entry, dict):
            raise InvalidAdapter(f"tensor {name!r}: its header entry is not a JSON object")
        dtype = entry.get("dtype")
        if dtype not in HEADER_DTYPES:
            named = f"torch.{_TORCH_NAMES[dtype]}" if dtype in _TORCH_NAMES else repr(dtype)
            raise InvalidAdapter(f"tensor {name!r} has dtype {named}; expected float32, float16 or bfloat16")
        if entry.get("shape") != list(shape):
            raise InvalidAdapter(f"tensor {name!r} has shape {entry.get('shape')}; expected {list(shape)}")


@functools.lru_cache(maxsize=1024)
def _expected(spec: MethodSpec, geometry: Geometry) -> dict[str, tuple[int, ...]]:
    """The spec checked against the backbone (an InvalidSpec is raised, never cached), and its tensors' shapes."""
    spec.check_geometry(geometry)
    return spec.tensor_shapes(geometry)


def _check_names(expected: dict[str, tuple[int, ...]], tensors: dict[str, object]) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise InvalidAdapter(f"missing tensors ({len(missing)}): {', '.join(missing[:5])}")
    if extra:
        raise InvalidAdapter(f"unexpected tensors ({len(extra)}): {', '.join(extra[:5])}")


def check_tensors(spec: MethodSpec, geometry: Geometry, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every expected tensor present with its shape, a float dtype and finite values; none extra.

    Returns float32 copies. Errors name the offending tensor.
    """
    spec.check_geometry(geometry)
    expected = spec.tensor_shapes(geometry)
    _check_names(expected, tensors)
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
    if "spec" not in metadata:
        raise InvalidAdapter("metadata 'spec' is missing")
    return _parsed_spec(metadata["spec"])


def spec_from_text(text: str) -> MethodSpec:
    """A spec from its JSON text (a start-up snapshot's), parsed once per distinct text."""
    return _parsed_spec(text)


@functools.lru_cache(maxsize=4096)
def _parsed_spec(text: str) -> MethodSpec:
    """Specs are immutable, and a catalogue of 100,000 tasks has few distinct ones: parse each text once and share
    the object (a registered version costs its spec only once)."""
    try:
        return parse_spec(_json_field({"spec": text}, "spec"))
    except InvalidSpec as e:
        raise InvalidSpec(f"metadata 'spec': {e}") from e
