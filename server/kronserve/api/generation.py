"""What `/v1/predict` and the OpenAI routes share: checking generation settings against the server's limits,
and turning a backend's stream into server-sent events that stop cleanly when the client leaves."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..config import Settings
from ..errors import InvalidRequest, KronserveError
from ..messages import SAMPLING_EPS, Delta, GenerationParams, Result, Started, TokenLogprob

Event = Started | Delta | Result


def checked_params(
    settings: Settings,
    max_new_tokens: int | None,
    min_new_tokens: int = 0,
    num_beams: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
    include_stop: bool = False,
    logprobs: int | None = None,
    n: int = 1,
    names: dict[str, str] | None = None,
) -> GenerationParams:
    """Settings within the server's limits; `max_new_tokens` None: min(32, the limit). `names` maps kronserve's
    field names to the caller's (OpenAI's `max_tokens`...), so an error names the field the client sent."""
    name = (names or {}).get
    limit = settings.max_new_tokens
    max_new = min(32, limit) if max_new_tokens is None else max_new_tokens
    if max_new > limit:
        raise InvalidRequest(
            f"{name('max_new_tokens', 'max_new_tokens')} {max_new} exceeds {limit}",
            name("max_new_tokens", "max_new_tokens"),
        )
    if min_new_tokens > max_new:
        raise InvalidRequest(
            f"{name('min_new_tokens', 'min_new_tokens')} {min_new_tokens} exceeds "
            f"{name('max_new_tokens', 'max_new_tokens')} {max_new}",
            name("min_new_tokens", "min_new_tokens"),
        )
    if num_beams > settings.max_beams:
        raise InvalidRequest(f"num_beams {num_beams} exceeds {settings.max_beams}", "num_beams")
    if num_beams > 1 and temperature >= SAMPLING_EPS:
        raise InvalidRequest(
            "num_beams > 1 is beam search: it cannot be combined with sampling (temperature > 0)", "num_beams"
        )
    if n > settings.max_beams:
        raise InvalidRequest(f"n {n} exceeds {settings.max_beams} (max_beams)", "n")
    if n > 1 and num_beams > 1:
        raise InvalidRequest("n > 1 samples sequences apart; beam search returns one per input", "n")
    if num_beams > 1 and logprobs is not None:
        raise InvalidRequest(
            "logprobs are given for greedy and sampled tokens, not beam search", name("logprobs", "logprobs")
        )
    return GenerationParams(
        max_new, min_new_tokens, num_beams, temperature, top_p, top_k, seed, stop, include_stop, logprobs, n
    )


def logprobs_out(logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
    """kronserve's shape of a sequence's log-probabilities (`/v1/predict`)."""
    return [
        {"token": t.token, "logprob": t.logprob, "top_logprobs": [{"token": a, "logprob": v} for a, v in t.top]}
        for t in logprobs
    ]


async def opened(events: AsyncIterator[Event]) -> Started:
    """The stream's first event; errors before it (unknown task, overload...) raise here, as plain HTTP errors."""
    first = await anext(events)
    if not isinstance(first, Started):
        raise RuntimeError(f"a stream must open with Started, not {type(first).__name__}")
    return first


async def sse(
    started: Started,
    events: AsyncIterator[Event],
    encode: Callable[[Event], list[bytes]],
    error: Callable[[KronserveError], bytes],
) -> AsyncIterator[bytes]:
    """Server-sent events of `started` and the rest of `events`; an error after the stream began is one more
    event. Closing this iterator (the client left) closes `events`, which cancels the request in the engine."""
    try:
        for chunk in encode(started):
            yield chunk
        async for event in events:
            for chunk in encode(event):
                yield chunk
    except KronserveError as e:
        yield error(e)
    except Exception as e:  # the response has begun: say so in the stream, never leave it hanging
        yield error(KronserveError(f"internal error: {type(e).__name__}"))
    finally:
        await events.aclose()


def event(data: Any, name: str | None = None) -> bytes:
    head = f"event: {name}\n" if name else ""
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"{head}data: {body}\n\n".encode()
