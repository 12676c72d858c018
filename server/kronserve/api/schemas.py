"""Request and response bodies of API v1 (the public contract; see README)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ..config import TASK_ID_PATTERN

TaskId = Annotated[str, StringConstraints(pattern=TASK_ID_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(_Strict):
    task: TaskId
    inputs: list[str] = Field(min_length=1, max_length=64)
    max_new_tokens: int = Field(default=32, ge=1, description="unset: 32, or the server's limit if lower")
    min_new_tokens: int = Field(default=0, ge=0, description="suppress end-of-sequence before this many tokens")
    num_beams: int = Field(default=1, ge=1)
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


class PredictResponse(BaseModel):
    task: str
    version: int
    outputs: list[str]


class ScoreRequest(_Strict):
    task: TaskId
    inputs: list[str] = Field(min_length=1, max_length=64)
    targets: list[str] = Field(min_length=1, max_length=64)


class ScoreResponse(BaseModel):
    task: str
    version: int
    scores: list[float]


class AdapterInfo(BaseModel):
    task: str
    version: int
    created: int = Field(default=0, description="Unix time this version began to be served (by the answering process)")
    method: str
    params: int
    sha256: str
    spec: dict[str, Any]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
