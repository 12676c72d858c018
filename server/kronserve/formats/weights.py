"""Reading foreign weight files: safetensors, or a torch pickle through the `weights_only` loader only.

A `.bin` file is a pickle. It is never unpickled plainly: `torch.load(weights_only=True)` admits only
tensors and plain containers, and anything else is refused as UnsupportedFormat.
"""

from __future__ import annotations

import io
import pickle
import zipfile

import safetensors.torch
import torch

from ..errors import InvalidAdapter, UnsupportedFormat


def load_safetensors(data: bytes, name: str) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # SafetensorError and friends: any malformed body
        raise InvalidAdapter(f"{name}: not a readable safetensors file: {e}") from e


def load_torch_pickle(data: bytes, name: str, allow: bool = True) -> dict[str, torch.Tensor]:
    """A state dict saved with torch.save, read with torch's restricted (weights-only) unpickler."""
    if not allow:
        raise UnsupportedFormat(
            f"{name}: pickle files are refused by this server (KRONSERVE_ACCEPT_PICKLE=false); "
            "convert offline with `kronserve import SRC OUT.safetensors --backbone DIR` and upload that"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, TypeError) as e:
        raise UnsupportedFormat(f"{name}: not a weights-only torch state dict ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidAdapter(f"{name}: expected a dict of tensors")
    return {str(k): v for k, v in state.items()}


def load_weights(data: bytes, name: str, allow_pickle: bool = True) -> dict[str, torch.Tensor]:
    """By file name: `.safetensors`, or `.bin`/`.pt`/`.pth` (pickle)."""
    if name.endswith(".safetensors"):
        return load_safetensors(data, name)
    if name.endswith((".bin", ".pt", ".pth")):
        return load_torch_pickle(data, name, allow_pickle)
    raise UnsupportedFormat(f"{name}: unknown weights file type (expected .safetensors or .bin)")
