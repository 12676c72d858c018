"""Typed views of the service's JSON replies.

Each `from_json` takes a decoded body and raises KeyError/TypeError/ValueError when it lacks the documented shape;
the client turns those into `InvalidResponse`, so callers see one error type for a contract mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

__all__ = ["AdapterInfo", "AdapterSpec", "PredictResult", "ScoreResult", "StreamDelta"]


class AdapterSpec(TypedDict, total=False):
    """An adapter's spec as the server reports it (`method` says which of the keys apply; see the README table)."""

    method: Literal["compacter", "compacter++", "phm", "houlsby", "pfeiffer", "lora", "prefix", "mam"]
    leave_out: list[int]  # global layer indices: encoder 0..L-1, decoder L..
    layer_norms: bool  # the task carries its own T5 RMSNorm weights
    placement: Literal["houlsby", "pfeiffer", "parallel"]
    sites: list[Literal["mh", "cross", "ffn"]]
    reduction_factor: int
    activation: Literal["gelu", "gelu_new", "relu", "swish"]
    scaling: float
    phm_dim: int  # PHM family
    rank: int | None  # PHM family (None: dense W_i) and LoRA
    shared_rule: bool
    factorized_rule: bool
    alpha: float  # LoRA
    targets: list[str]
    rslora: bool
    prefix_length: int  # prefix and MAM
    locations: list[Literal["encoder", "decoder", "cross"]]  # prefix: the attentions with a prefix
    positions: Literal["adapterhub", "peft"]  # prefix: how prefix positions count
    prefix_locations: list[Literal["encoder", "decoder", "cross"]]  # MAM's prefix
    prefix_positions: Literal["adapterhub", "peft"]
    prefix_leave_out: list[int]


def _mapping(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise TypeError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _list(obj: Any, what: str) -> list[Any]:
    if not isinstance(obj, list):
        raise TypeError(f"expected {what} to be a JSON list, got {type(obj).__name__}")
    return obj


@dataclass(frozen=True, slots=True)
class PredictResult:
    """Generations for one task; `outputs[i]` answers `inputs[i]`, and `version` is the adapter that produced them."""

    task: str
    version: int
    outputs: list[str]

    @classmethod
    def from_json(cls, obj: Any) -> PredictResult:
        body = _mapping(obj)
        return cls(
            task=str(body["task"]),
            version=int(body["version"]),
            outputs=[str(o) for o in _list(body["outputs"], "outputs")],
        )


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """Scores of `targets[i]` given `inputs[i]` under one adapter version, in request order."""

    task: str
    version: int
    scores: list[float]

    @classmethod
    def from_json(cls, obj: Any) -> ScoreResult:
        body = _mapping(obj)
        return cls(
            task=str(body["task"]),
            version=int(body["version"]),
            scores=[float(s) for s in _list(body["scores"], "scores")],
        )


_ADAPTER_KEYS = ("task", "version", "method", "params", "sha256", "spec")


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """One registered adapter.

    `extra` keeps whatever else the server reports, so a newer server's fields reach callers of an older client.
    """

    task: str
    version: int
    method: str
    params: int
    sha256: str
    extra: dict[str, Any] = field(default_factory=dict)
    spec: AdapterSpec | None = None  # None only from a server that does not report it

    @classmethod
    def from_json(cls, obj: Any) -> AdapterInfo:
        body = _mapping(obj)
        return cls(
            task=str(body["task"]),
            version=int(body["version"]),
            method=str(body["method"]),
            params=int(body["params"]),
            sha256=str(body["sha256"]),
            extra={k: v for k, v in body.items() if k not in _ADAPTER_KEYS},
            spec=AdapterSpec(**_mapping(body["spec"])) if body.get("spec") is not None else None,
        )

    def to_json(self) -> dict[str, Any]:
        """The server's own shape again (extra keys flattened back in), e.g. for printing or re-serialising."""
        return {
            **self.extra,
            "task": self.task,
            "version": self.version,
            "method": self.method,
            "params": self.params,
            "sha256": self.sha256,
            **({"spec": self.spec} if self.spec is not None else {}),
        }


@dataclass(frozen=True, slots=True)
class StreamDelta:
    """Text of input `index` decoded since its last delta; a stream's deltas of one input add up to its output."""

    index: int
    text: str

    @classmethod
    def from_json(cls, obj: Any) -> StreamDelta:
        body = _mapping(obj)
        return cls(index=int(body["index"]), text=str(body["text"]))
