"""OpenAI-compatible routes: every task is a `model`; completions and chat completions, streamed or not.

They ride the same backend and step loop as `/v1/predict` (an OpenAI request shares decode steps with
kronserve rows of other tasks). Errors on these routes take OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`; a field kronserve cannot honour is a 400 naming it, never
silently ignored. T5 tasks take one input: for chat it is the last user message's content.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute

from ..errors import InvalidRequest, KronserveError, Overloaded, UnknownTask
from ..messages import Delta, Generation, GenerationParams, Prompt, Result, Started, TokenLogprob
from .errors import endpoint_of, status_of
from .generation import Event, checked_params, event, opened, sse
from .openai_schemas import NEUTRAL, ChatRequest, CompletionRequest, OpenAIErrorResponse, _Sampling, is_neutral
from .routes import BackendDep, _check_limits, _count, _headers, until_disconnected


class Unsupported(KronserveError):
    """A field or value the OpenAI API has and kronserve does not honour (400, naming it)."""

    code = "unsupported_parameter"

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class OpenAIRoute(APIRoute):
    """Errors of these routes in OpenAI's shape (the rest of the API keeps kronserve's)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as e:
                first = e.errors()[0] if e.errors() else {}
                loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
                if first.get("type") == "json_invalid":
                    return _error(request, 400, "malformed_json", "the body is not valid JSON", None)
                param = ".".join(loc) or None
                return _error(request, 422, "validation_error", f"{param}: {first.get('msg', 'invalid')}", param)
            except KronserveError as e:
                # OpenAI answers 400 for any request it will not serve as sent; kronserve's 422 is for schema errors.
                status = 400 if isinstance(e, Unsupported | InvalidRequest) else status_of(e)
                code = "model_not_found" if isinstance(e, UnknownTask) else e.code
                param = getattr(e, "param", None) or ("model" if isinstance(e, UnknownTask) else None)
                headers = {"Retry-After": str(int(e.retry_after))} if isinstance(e, Overloaded) else None
                return _error(request, status, code, str(e), param, headers)

        return route


router = APIRouter(route_class=OpenAIRoute, tags=["OpenAI-compatible"])
_WHEN = {
    400: "a field or value kronserve does not honour (named in `param`), or a request it will not serve as sent",
    404: "no task with an active version has this id (`model_not_found`)",
    413: "body over max_request_bytes",
    422: "a field of the wrong type or out of range",
    503: "overloaded, starting or draining, or timed out; with Retry-After",
}
_STREAMED = {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with `stream`"}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": OpenAIErrorResponse, "description": _WHEN[s]} for s in statuses}


@router.get("/v1/models", responses=_errors(503))
async def list_models(backend: BackendDep) -> dict[str, Any]:
    infos, _ = await backend.adapters(None, None, False)  # OpenAI's list is not paged: every task
    return {"object": "list", "data": [_model(info) for info in infos]}


@router.get("/v1/models/{model}", responses=_errors(404, 503))
async def get_model(request: Request, backend: BackendDep) -> dict[str, Any]:
    # Read from the path, not declared as a parameter: any id is a valid request (unknown ones are 404, never 422).
    return _model(await backend.adapter(request.path_params["model"]))


@router.post("/v1/completions", responses={**_errors(400, 404, 413, 422, 503), 200: _STREAMED})
async def completions(body: CompletionRequest, backend: BackendDep, request: Request, response: Response) -> Any:
    prompts = _prompts(body.prompt)
    if not prompts:
        raise InvalidRequest("prompt must not be empty", "prompt")
    # OpenAI's default of 16, capped by the server's limit when the client did not ask for it.
    max_tokens = body.max_tokens if "max_tokens" in body.model_fields_set else min(16, backend.settings.max_new_tokens)
    params = _params(backend, body, max_tokens, {"max_new_tokens": "max_tokens"}, body.logprobs)
    _check_limits(backend, prompts)
    reply = _Reply("cmpl", "text_completion", body.model, params.n)
    if body.stream:
        return await _stream(backend, body, prompts, params, reply)
    result = await until_disconnected(request, backend.predict(body.model, prompts, params))
    _count(backend, result, "completions")
    response.headers.update(_headers(result.version, result.replica))
    return reply.completion(result)


@router.post("/v1/chat/completions", responses={**_errors(400, 404, 413, 422, 503), 200: _STREAMED})
async def chat_completions(body: ChatRequest, backend: BackendDep, request: Request, response: Response) -> Any:
    max_tokens = body.max_completion_tokens or body.max_tokens
    names = {"max_new_tokens": "max_completion_tokens" if body.max_completion_tokens else "max_tokens"}
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", "top_logprobs")
    params = _params(backend, body, max_tokens, names, (body.top_logprobs or 0) if body.logprobs else None)
    prompt = _last_user_message(body)
    _check_limits(backend, [prompt])
    reply = _Reply("chatcmpl", "chat.completion", body.model, params.n)
    if body.stream:
        return await _stream(backend, body, [prompt], params, reply)
    result = await until_disconnected(request, backend.predict(body.model, [prompt], params))
    _count(backend, result, "chat")
    response.headers.update(_headers(result.version, result.replica))
    return reply.chat(result)


# ---- requests ---------------------------------------------------------------------------------------
def _params(
    backend: BackendDep, body: _Sampling, max_tokens: int | None, names: dict[str, str], logprobs: int | None
) -> GenerationParams:
    """Refuse what cannot be honoured (by name), then check the rest against the server's limits."""
    for name, value in (body.model_extra or {}).items():
        if name not in NEUTRAL:
            raise Unsupported(f"unrecognized request argument: {name}", name)
        if name == "echo" and value is True:
            raise Unsupported(
                "echo is not supported: an encoder-decoder (T5) reads its prompt in the encoder and gives no "
                "log-probabilities of the prompt's tokens, so there is nothing to echo them with",
                name,
            )
        if not is_neutral(name, value):
            raise Unsupported(f"{name}={value!r} is not supported by kronserve", name)
    for name in (body.stream_options.model_extra or {}) if body.stream_options else ():
        raise Unsupported(f"unrecognized stream option: {name}", f"stream_options.{name}")
    if len(body.stops()) > 4:
        raise InvalidRequest("stop takes at most 4 strings", "stop")
    if body.ignore_eos:  # as vLLM: every sequence runs to max_tokens
        max_tokens = max_tokens if max_tokens is not None else min(32, backend.settings.max_new_tokens)
    return checked_params(
        backend.settings,
        max_tokens,
        min_new_tokens=max_tokens if body.ignore_eos else body.min_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        seed=body.seed,
        stop=body.stops(),
        include_stop=body.include_stop_str_in_output,
        logprobs=logprobs,
        n=body.n,
        names={"min_new_tokens": "min_tokens", **names},
    )


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """One prompt or a list, as text or token ids ([int] is one prompt of ids)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)


def _last_user_message(body: ChatRequest) -> str:
    users = [m for m in body.messages if m.role == "user"]
    if not users:
        raise InvalidRequest("messages has no user message: a T5 task answers the last user message", "messages")
    content = users[-1].content
    if isinstance(content, str):
        return content
    parts = content or []
    if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in parts):
        raise Unsupported("only text content parts are supported", "messages")
    return "".join(p["text"] for p in parts)


async def _stream(
    backend: BackendDep, body: _Sampling, prompts: list[Prompt], params: GenerationParams, reply: _Reply
) -> StreamingResponse:
    events = backend.predict_stream(body.model, prompts, params)
    started = await opened(events)
    options = body.stream_options
    usage = bool(options and options.include_usage)
    every_chunk = usage and bool(options and options.continuous_usage_stats)  # as vLLM: only with include_usage
    chat = isinstance(body, ChatRequest)
    endpoint, chunks = ("chat", reply.chat_chunks) if chat else ("completions", reply.completion_chunks)

    def encode(e: Event) -> list[bytes]:
        out = chunks(e, usage)
        if every_chunk and isinstance(e, Delta):
            out = [{**c, "usage": _counts(e.prompt_tokens, e.generated)} for c in out]
        if isinstance(e, Result):
            _count(backend, e, endpoint)
            if every_chunk:
                out = [c if "usage" in c else {**c, "usage": reply.usage(e.values)} for c in out]
            return [*(event(c) for c in out), event("[DONE]")]
        return [event(c) for c in out]

    def error(e: KronserveError) -> bytes:
        body = {"error": {"message": str(e), "type": _type(status_of(e)), "param": None, "code": e.code}}
        return event(body) + event("[DONE]")

    headers = _headers(started.version, started.replica)
    return StreamingResponse(sse(started, events, encode, error), media_type="text/event-stream", headers=headers)


# ---- answers ---------------------------------------------------------------------------------------
class _Reply:
    """One answer's identity (id, created, model) and its OpenAI shapes, whole or as chunks. `n` answers per
    prompt: choice i*n+j is prompt i's j-th; prompt tokens count once per prompt."""

    def __init__(self, prefix: str, kind: str, model: str, n: int = 1) -> None:
        self.id, self.kind, self.model, self.n = f"{prefix}-{uuid.uuid4().hex}", kind, model, n
        self.created = int(time.time())
        self._sent: dict[int, int] = {}  # a stream's characters sent per choice (its logprobs' text_offset)

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self, generations: list[Generation]) -> dict[str, int]:
        return _counts(sum(g.prompt_tokens for g in generations[:: self.n]), sum(g.tokens for g in generations))

    def _whole(self, result: Result, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            **self._head(self.kind),
            "choices": choices,
            "usage": self.usage(result.values),
            "kronserve_version": result.version,
        }

    def completion(self, result: Result) -> dict[str, Any]:
        return self._whole(
            result,
            [
                {
                    "index": i,
                    "text": g.text,
                    "finish_reason": g.finish_reason,
                    "logprobs": _completion_logprobs(g.logprobs),
                }
                for i, g in enumerate(result.values)
            ],
        )

    def chat(self, result: Result) -> dict[str, Any]:
        return self._whole(
            result,
            [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": g.text},
                    "finish_reason": g.finish_reason,
                    "logprobs": _chat_logprobs(g.logprobs),
                }
                for i, g in enumerate(result.values)
            ],
        )

    def completion_chunks(self, e: Event, usage: bool) -> list[dict[str, Any]]:
        head = self._head("text_completion")
        if isinstance(e, Delta):
            sent = self._sent.get(e.index, 0)
            self._sent[e.index] = sent + len(e.text)
            logprobs = _completion_logprobs(e.logprobs, sent)
            return [
                {**head, "choices": [{"index": e.index, "text": e.text, "finish_reason": None, "logprobs": logprobs}]}
            ]
        if isinstance(e, Result):
            ends = [
                {
                    **head,
                    "choices": [{"index": i, "text": "", "finish_reason": g.finish_reason, "logprobs": None}],
                    "kronserve_version": e.version,
                }
                for i, g in enumerate(e.values)
            ]
            return ends + ([{**head, "choices": [], "usage": self.usage(e.values)}] if usage else [])
        return []

    def chat_chunks(self, e: Event, usage: bool) -> list[dict[str, Any]]:
        head = self._head("chat.completion.chunk")
        if isinstance(e, Started):
            role = {"role": "assistant", "content": ""}
            return [{**head, "choices": [{"index": i, "delta": role, "finish_reason": None}]} for i in range(self.n)]
        if isinstance(e, Delta):
            choice = {"index": e.index, "delta": {"content": e.text}, "finish_reason": None}
            if e.logprobs is not None:
                choice["logprobs"] = _chat_logprobs(e.logprobs)
            return [{**head, "choices": [choice]}]
        if isinstance(e, Result):
            ends = [
                {
                    **head,
                    "choices": [{"index": i, "delta": {}, "finish_reason": g.finish_reason}],
                    "kronserve_version": e.version,
                }
                for i, g in enumerate(e.values)
            ]
            return ends + ([{**head, "choices": [], "usage": self.usage(e.values)}] if usage else [])
        return []


def _completion_logprobs(tokens: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's legacy shape: parallel lists; each `top_logprobs` entry maps text to log-probability for the chosen
    token and its alternatives (as vLLM); `text_offset` is where each token's text starts in the choice's text."""
    if tokens is None:
        return None
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{**dict(t.top), t.token: t.logprob} for t in tokens],
        "text_offset": list(
            itertools.accumulate((0 if t.special else len(t.token) for t in tokens[:-1]), initial=offset)
        ),
    }


def _chat_logprobs(tokens: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """The chat shape: one object per token with its UTF-8 `bytes` and its `top_logprobs`."""
    if tokens is None:
        return None
    content = [
        {**_chat_token(t.token, t.logprob), "top_logprobs": [_chat_token(a, v) for a, v in t.top]} for t in tokens
    ]
    return {"content": content, "refusal": None}


def _chat_token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def _counts(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _model(info: dict[str, Any]) -> dict[str, Any]:
    # `created` is the time of the answer, as vLLM's model cards have it: no store records when a version was made.
    return {
        "id": info["task"],
        "object": "model",
        "created": int(time.time()),
        "owned_by": "kronserve",
        "kronserve_version": info["version"],
        "method": info["method"],
    }


# How pydantic names the member of a union or the validator that failed in an error's location (`prompt.str`,
# `prompt.list[int].0`): not a field the client sent, so left out of `param`.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _is_type_tag(part: object) -> bool:
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or part.startswith("function-"))


def _type(status: int) -> str:
    return {401: "authentication_error", 404: "invalid_request_error", 503: "server_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )


def _error(
    request: Request, status: int, code: str, message: str, param: str | None, headers: dict | None = None
) -> JSONResponse:
    backend = getattr(request.app.state, "backend", None)
    if backend is not None:
        backend.metrics.failures.labels(endpoint_of(request), code).inc()
    body = {"error": {"message": message, "type": _type(status), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)
