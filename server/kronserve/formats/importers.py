"""Which format an upload is, and its conversion to a native adapter.

- native: one kronserve `.safetensors`;
- AdapterHub: `adapter_config.json` + `pytorch_adapter.bin` or `adapter.safetensors` (head files ignored);
- AdapterHub prefix tuning and MAM (a prefix + bottleneck union): the same files;
- PEFT LoRA and prefix tuning: `adapter_config.json` (with `peft_type`) + `adapter_model.safetensors`;
- the Compacter paper's code: a lone whole-model `pytorch_model.bin`.
Files are matched by base name, so a client may send a directory's files as they are. Importers produce the
native spec + tensors and nothing else; the result is checked like any native file before it is served.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..backbone import Fingerprint
from ..errors import BadRequest, UnsupportedFormat
from ..methods import MethodSpec
from . import adapterhub, adapterhub_prefix, native, paper, peft
from .native import AdapterFile
from .weights import load_weights

ADAPTERHUB_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
IGNORED = ("head_config.json", "pytorch_model_head.bin", "model_head.safetensors", "README.md")


def read_source(src: str | Path) -> dict[str, bytes]:
    """A file, or every file of a directory, by base name."""
    path = Path(src)
    files = [p for p in sorted(path.iterdir()) if p.is_file()] if path.is_dir() else [path]
    return {p.name: p.read_bytes() for p in files}


def to_adapter(
    parts: dict[str, bytes],
    task: str,
    fingerprint: Fingerprint,
    allow_pickle: bool = True,
    backbone_weights: dict[str, torch.Tensor] | None = None,
) -> AdapterFile:
    """Detect the format of `parts` (base name -> bytes) and return it as a validated native adapter for `task`.

    A source that proves its backbone (the paper's checkpoint carries its weights) is compared with
    `backbone_weights` (the serving backbone's, by transformers name) and refused on a mismatch; a source that
    only declares it (PEFT, AdapterHub) has the declared name recorded as the native file's `base_model`.
    """
    parts = {Path(name).name: data for name, data in parts.items() if Path(name).name not in IGNORED}
    if not parts:
        raise BadRequest("no adapter files in the upload")
    if "adapter_config.json" in parts:
        cfg = adapterhub.parse_config(parts["adapter_config.json"])
        if peft.is_peft_config(cfg):
            return _from_peft(cfg, parts, task, fingerprint, allow_pickle)
        if adapterhub.is_adapterhub_config(cfg):
            return _from_adapterhub(cfg, parts, task, fingerprint, allow_pickle)
        raise UnsupportedFormat("adapter_config.json is neither an AdapterHub nor a PEFT adapter config")
    if len(parts) == 1:
        name, data = next(iter(parts.items()))
        if name.endswith((".bin", ".pt", ".pth")):
            return _from_paper(load_weights(data, name, allow_pickle), task, fingerprint, backbone_weights)
        return replace(native.loads(data, fingerprint), task=task)
    raise BadRequest(
        f"cannot tell the format of files {sorted(parts)}: send one native .safetensors file or a "
        "saved adapter directory with its adapter_config.json"
    )


def _from_paper(state: dict, task: str, fingerprint: Fingerprint, backbone_weights: dict | None) -> AdapterFile:
    if not paper.is_paper_checkpoint(state):
        raise UnsupportedFormat(
            "a lone .bin file that is not a Compacter paper checkpoint (no adapter_controller keys)"
        )
    if backbone_weights is not None:
        paper.check_backbone(state, backbone_weights)
    names = {k.split(".adapters.")[1].split(".")[0] for k in state if ".adapter_controller.adapters." in k}
    spec, tensors = paper.import_paper(state, fingerprint.geometry, task if task in names else None)
    return _checked(task, spec, fingerprint, tensors)


def _from_peft(
    cfg: dict, parts: dict[str, bytes], task: str, fingerprint: Fingerprint, allow_pickle: bool
) -> AdapterFile:
    state = _weights(parts, PEFT_WEIGHTS, "PEFT", allow_pickle)
    if peft.is_prefix_tuning(cfg):
        spec, tensors = peft.import_prefix(cfg, state, fingerprint.geometry)
    else:
        spec, tensors = peft.import_lora(cfg, state, fingerprint.geometry)
    return _checked(task, spec, fingerprint, tensors, _declared(cfg.get("base_model_name_or_path")))


def _from_adapterhub(
    cfg: dict, parts: dict[str, bytes], task: str, fingerprint: Fingerprint, allow_pickle: bool
) -> AdapterFile:
    state = _weights(parts, ADAPTERHUB_WEIGHTS, "AdapterHub", allow_pickle)
    if adapterhub_prefix.is_prefix_config(cfg):
        spec, tensors = adapterhub_prefix.import_prefix(cfg, state, fingerprint.geometry)
    else:
        spec = adapterhub.spec_from_config(cfg)
        tensors = adapterhub.tensors_from_state(spec, cfg, state)
    return _checked(task, spec, fingerprint, tensors, _declared(cfg.get("model_name")))


def _weights(parts: dict[str, bytes], names: tuple[str, ...], source: str, allow_pickle: bool) -> dict:
    """The first weights file of `names` present in the upload, read (pickles only through weights_only)."""
    name = next((n for n in names if n in parts), None)
    if name is None:
        raise BadRequest(f"{source} adapter without weights: expected one of {list(names)}")
    return load_weights(parts[name], name, allow_pickle)


def _declared(name: object) -> str | None:
    """A declared base model worth recording: a non-empty string (longer ones are cut to the file's limit)."""
    if not isinstance(name, str) or not name.strip():
        return None
    return name.strip()[: native.MAX_BASE_MODEL]


def _checked(
    task: str, spec: MethodSpec, fingerprint: Fingerprint, tensors: dict, base_model: str | None = None
) -> AdapterFile:
    """An imported adapter, validated exactly as a native file is."""
    return AdapterFile(task, spec, fingerprint, native.check_tensors(spec, fingerprint.geometry, tensors), base_model)
