"""The neutral request and answer types the API, the service, the engine loop and the cluster share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SAMPLING_EPS = 1e-5
STARTING = "loading the backbone and the store"  # what a start-up is doing until it says more (/readyz)
Prompt = str | list[int]  # an input as text, or as token ids (OpenAI's token-id prompts)
MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's top_logprobs limit)
# One generated token's log-probability and its `k` most likely alternatives (id, log-probability), as the engine
# gives them: from the model's raw logits, before temperature, top-k/top-p and the vocabulary limit (what /v1/score
# scores), so a greedy answer's log-probabilities sum to its score.
TokenIds = tuple[float, list[tuple[int, float]]]
# A streamed token: (input index, token id), and when the request asked for logprobs, its TokenIds after them.
StreamedToken = tuple[int, int] | tuple[int, int, float, list[tuple[int, float]]]


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
    stop: tuple[str, ...] = ()  # the text ends before the first of these (its finish reason is then "stop")
    include_stop: bool = False  # ... or with it (vLLM's include_stop_str_in_output)
    logprobs: int | None = None  # also each token's log-probability and this many alternatives (None: none)
    n: int = 1  # sequences per input (sampled apart; one encoder pass), answered input-major: input i's j-th at i*n+j

    @property
    def sampling(self) -> bool:
        """A temperature under 1e-5 is greedy (as vLLM's sampler treats it): dividing by it would overflow."""
        return self.temperature >= SAMPLING_EPS


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token as text, its log-probability and its alternatives' (text, log-probability)."""

    token: str
    logprob: float
    top: list[tuple[str, float]]
    special: bool = False  # EOS, a sentinel...: shown by name, absent from the answer's text


@dataclass(frozen=True)
class Generation:
    """One input's answer: its text, the tokens generated (EOS included) and why it ended."""

    text: str
    tokens: int
    prompt_tokens: int
    finish_reason: str  # "stop": EOS or a stop string; "length": max_new_tokens reached
    logprobs: list[TokenLogprob] | None = None  # every generated token's (EOS last), when asked


@dataclass(frozen=True)
class Output:
    """One input's answer as the engine gives it, before text: its generated ids (EOS included when reached), its
    prompt's length and why it ended ("stop": EOS; "length": max_new_tokens). The text side decodes it."""

    ids: list[int]
    prompt_tokens: int
    finish_reason: str
    logprobs: list[TokenIds] | None = None  # one per id, when the request asked


@dataclass(frozen=True)
class Started:
    """A stream's first event: the request was accepted and leased this version (its answers' headers)."""

    task: str
    version: int
    replica: str | None = None


@dataclass(frozen=True)
class Delta:
    """Text decoded since the last delta of input `index` (a stream's event), and the request's token counts so far
    (all inputs: prompt tokens, tokens generated) for usage in every chunk."""

    index: int
    text: str
    prompt_tokens: int = 0
    generated: int = 0
    logprobs: list[TokenLogprob] | None = None  # the tokens this input received since its last delta, when asked


@dataclass(frozen=True)
class Result:
    task: str
    version: int
    values: list[Any]  # `Generation`s (predict) or float scores (score)
    replica: str | None = None  # which cluster replica answered (None: the single-process server)
