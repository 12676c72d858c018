"""The neutral request and answer types the API, the service, the engine loop and the cluster share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GenerationParams:
    """How one predict request decodes. Every running row carries its own: rows with different settings
    share decode steps. `temperature` 0 is greedy (with `num_beams` > 1: beam search); above 0, sampling
    with `top_k` (0: off) and `top_p` (1: off), reproducible for a given `seed` whatever rides beside it."""

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    num_beams: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


@dataclass(frozen=True)
class Result:
    task: str
    version: int
    values: list[Any]  # output strings or float scores
    replica: str | None = None  # which cluster replica answered (None: the single-process server)
