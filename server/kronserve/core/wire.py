"""What crosses the process boundary, and how: msgpack frames over ZMQ (no pickle, no user text).

API → engine, one frame `[generation, kind, rid, body]`:
- `add` {task, inputs, targets, params, pin, stream}: token ids in, never text;
- `stop` index (a stop string ended that input), `abort` (the caller left);
- `call` [method, args]: a catalogue or residency command (upload, delete, pin...), run by the engine.
A frame stamped with another generation than the engine's own is dropped: it was meant for a dead engine.

Engine → API, one frame `[kind, rid, body]`: `started` [task, version, replica] (streams), `tokens`
[[index, token], ...] (one frame per request per step), `done` [task, version, replica, values], `error`
{code, message, retry_after, param}, `reply` value.

The supervisor publishes the engine's state on its own socket: `[state, generation, detail]` with state
`starting`, `up` (detail: what the API needs to tokenize), `dead` (detail: why) or `failed` (the server stops).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from ..errors import InvalidRequest, KronserveError, Overloaded
from ..messages import GenerationParams, Output
from ..store import VersionRef

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def pack(*fields: Any) -> bytes:
    return _encoder.encode(fields)


def unpack(frame: bytes) -> list[Any]:
    return _decoder.decode(frame)


def params_out(params: GenerationParams | None) -> dict[str, Any] | None:
    return None if params is None else dataclasses.asdict(params)


def params_in(body: dict[str, Any] | None) -> GenerationParams | None:
    if body is None:
        return None
    return GenerationParams(**{**body, "stop": tuple(body.get("stop", ()))})


def pin_out(pin: VersionRef | None) -> list[Any] | None:
    return None if pin is None else [pin.task, pin.version, pin.sha256]


def pin_in(body: list[Any] | None) -> VersionRef | None:
    return None if body is None else VersionRef(*body)


def outputs_out(values: list[Any]) -> list[Any]:
    return [[o.ids, o.prompt_tokens, o.finish_reason, o.logprobs] if isinstance(o, Output) else o for o in values]


def outputs_in(values: list[Any]) -> list[Output]:
    return [Output(list(ids), prompt, reason, _logprobs_in(lp)) for ids, prompt, reason, lp in values]


def _logprobs_in(body: list[Any] | None) -> list[tuple[float, list[tuple[int, float]]]] | None:
    return None if body is None else [(lp, [(t, v) for t, v in top]) for lp, top in body]


def error_out(error: BaseException) -> dict[str, Any]:
    """A kronserve error as itself (its code decides the HTTP status on the other side); anything else as internal."""
    if not isinstance(error, KronserveError):
        error = KronserveError(f"internal error in the engine: {type(error).__name__}: {error}")
    return {
        "code": error.code,
        "message": str(error),
        "retry_after": getattr(error, "retry_after", None),
        "param": getattr(error, "param", None),
    }


def error_in(body: dict[str, Any]) -> KronserveError:
    """The same class the engine raised (by its code), with its message and extras."""
    cls = _classes().get(body["code"], KronserveError)
    error = cls.__new__(cls)
    Exception.__init__(error, body["message"])
    if issubclass(cls, Overloaded):
        error.retry_after = body.get("retry_after") or 1.0  # type: ignore[attr-defined]
    if issubclass(cls, InvalidRequest):
        error.param = body.get("param")  # type: ignore[attr-defined]
    return error


def _classes() -> dict[str, type[KronserveError]]:
    found: dict[str, type[KronserveError]] = {}
    todo = [KronserveError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.code, cls)
        todo.extend(cls.__subclasses__())
    return found
