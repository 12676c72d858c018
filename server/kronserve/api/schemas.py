"""Request and response bodies of API v1 (the public contract; see README)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ..config import TASK_ID_PATTERN
from ..messages import MAX_LOGPROBS

TaskId = Annotated[
    str, StringConstraints(pattern=TASK_ID_PATTERN), Field(description="task id: the adapter that answers")
]
# Every `error.code` the API answers with (README, "Every error is JSON"); tests/api/test_openapi.py checks that the
# error hierarchy has no code missing here.
ErrorCode = Literal[
    "malformed_json",
    "bad_request",
    "unauthorized",
    "unknown_task",
    "not_found",
    "method_not_allowed",
    "store_conflict",
    "payload_too_large",
    "unsupported_format",
    "validation_error",
    "invalid_request",
    "invalid_adapter",
    "invalid_spec",
    "backbone_mismatch",
    "overloaded",
    "not_ready",
    "timeout",
    "bank_full",
    "pin_refused",
    "store_error",
    "replica_unavailable",
    "engine_restarting",
    "body_timeout",
    "client_closed",
    "unsupported_parameter",
    "internal",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(_Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"task": "sentiment", "inputs": ["what a wonderful film"]},
                {"task": "sst2", "inputs": ["sst2 sentence: a great film"], "max_new_tokens": 4, "num_beams": 2},
            ]
        }
    )

    task: TaskId
    inputs: list[str] = Field(min_length=1, description="texts, one output each (at most the server's max_inputs)")
    max_new_tokens: int = Field(default=32, ge=1, description="unset: 32, or the server's limit if lower")
    min_new_tokens: int = Field(default=0, ge=0, description="suppress end-of-sequence before this many tokens")
    num_beams: int = Field(default=1, ge=1, description="beam search width; 1: greedy (at most the server's max_beams)")
    temperature: float = Field(default=0.0, ge=0, le=100, description="0: greedy (or beam search); above 0: sampling")
    top_p: float = Field(default=1.0, gt=0, le=1, description="sampling: keep the smallest set of ids with this mass")
    top_k: int = Field(default=0, ge=0, description="sampling: keep the k most likely ids (0: all)")
    seed: int | None = Field(
        default=None,
        ge=0,
        le=2**63 - 1,
        description="sampling: the same seed gives the same output, whatever else runs",
    )
    stop: list[str] = Field(default_factory=list, max_length=4, description="end each output before any of these")
    stream: bool = Field(default=False, description="answer text/event-stream: text deltas as tokens are decoded")
    n: int = Field(
        default=1,
        ge=1,
        description="sequences per input, sampled apart from one encoder pass (at most the server's max_beams); "
        "outputs[i * n + j] is input i's j-th",
    )
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="also each generated token's log-probability (EOS last) and this many likely alternatives; "
        "raw model log-probabilities, so a greedy output's sum to its score",
    )


class Alternative(BaseModel):
    token: str
    logprob: float


class TokenLogprobInfo(BaseModel):
    token: str = Field(description="the token's text (a special token by name: `</s>`)")
    logprob: float
    top_logprobs: list[Alternative] = Field(description="the most likely tokens at this step, best first")


class PredictResponse(BaseModel):
    task: str = Field(description="the task asked")
    version: int = Field(description="the adapter version that produced every output")
    outputs: list[str] = Field(description="outputs[i] answers inputs[i] (with n: outputs[i * n + j])")
    logprobs: list[list[TokenLogprobInfo]] | None = Field(
        default=None, description="with `logprobs`: logprobs[i] has one entry per token of outputs[i]"
    )


class ScoreRequest(_Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "task": "sst2",
                    "inputs": ["sst2 sentence: a great film", "sst2 sentence: a great film"],
                    "targets": ["positive", "negative"],
                }
            ]
        }
    )

    task: TaskId
    inputs: list[str] = Field(min_length=1, description="texts the targets are conditioned on (at most max_inputs)")
    targets: list[str] = Field(min_length=1, description="one per input, paired by position")


class ScoreResponse(BaseModel):
    task: str = Field(description="the task asked")
    version: int = Field(description="the adapter version that scored every pair")
    scores: list[float] = Field(
        description="sum of natural-log probabilities of each target's tokens, end-of-sequence included"
    )


class Residency(BaseModel):
    tier: Literal["device", "host", "store"] = Field(
        description="device (batches read it), host (packed in RAM), store (on disk only: the next request loads it)"
    )
    pinned: bool = Field(description="kept on the device, never evicted")
    bytes: int = Field(description="what it takes in the host or device tier (its packed form)")


class AdapterInfo(BaseModel):
    task: str = Field(description="task id")
    version: int = Field(description="counts up from 1 per task; a task deleted and made anew starts at 1 again")
    method: str = Field(description="compacter, compacter++, phm, houlsby, pfeiffer, lora, prefix or mam")
    params: int = Field(description="trainable parameters of the adapter")
    sha256: str = Field(description="hash of the stored native file: with `version`, the version's identity")
    spec: dict[str, Any] = Field(description="the adapter's full spec (method options, see the README)")
    base_model: str | None = Field(
        default=None,
        description="the backbone an imported adapter's source declares it was trained on (PEFT "
        "base_model_name_or_path, AdapterHub model_name); null: not declared",
    )
    residency: Residency | None = Field(
        default=None, description="where the version's weights are now (live state: it changes with traffic)"
    )


class ErrorBody(BaseModel):
    code: ErrorCode = Field(description="stable machine-readable name of the error")
    message: str = Field(description="what is wrong, for a person")


class ErrorResponse(BaseModel):
    error: ErrorBody
