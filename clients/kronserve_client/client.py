"""Sync and async clients for the kronserve REST API.

Both clients share one description of every endpoint (`_Call`: what to send, how to read the reply); each class only
supplies the transport step, so the two cannot drift apart in what they send or how they parse.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeAlias, TypeVar
from urllib.parse import quote, urlencode

import httpx

from .errors import (
    InvalidResponse,
    KronserveClientError,
    StreamError,
    error_from_response,
    error_from_transport,
    is_retryable,
)
from .models import AdapterInfo, PredictResult, ScoreResult, StreamDelta

__all__ = ["DEFAULT_TIMEOUT", "DEFAULT_URL", "AsyncKronserveClient", "FileSpec", "KronserveClient", "Sampling"]

DEFAULT_TIMEOUT = 60.0
DEFAULT_URL = "http://127.0.0.1:8000"
MAX_RETRY_WAIT = 30.0  # a longer Retry-After is cut to this: a client should not sleep for minutes unasked
_USER_AGENT = "kronserve-client/0.1"

FileSpec: TypeAlias = str | os.PathLike[str] | tuple[str, bytes]
"""One adapter file to upload: a path on disk, or (filename, content) for bytes already in memory."""

T = TypeVar("T")
_MultipartFiles: TypeAlias = list[tuple[str, tuple[str, bytes, str]]]


@dataclass(frozen=True, slots=True)
class _Call(Generic[T]):
    """One request and the reading of its reply, independent of whether it is sent sync or async."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    files: _MultipartFiles | None = None
    accept: frozenset[int] = frozenset()  # non-2xx statuses that are an answer (handed to `parse`), not an error

    def finish(self, response: httpx.Response) -> T:
        if not (response.is_success or response.status_code in self.accept):
            raise error_from_response(response)
        try:
            return self.parse(response)
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidResponse(
                response.status_code, "invalid_response", f"{self.method} {self.path}: unexpected reply body: {exc}"
            ) from exc


def _task_path(task: str) -> str:
    # A task id is one path segment; quote everything so a stray '/' or '?' cannot reach another route.
    return "/v1/adapters/" + quote(task, safe="")


def _texts(values: Sequence[str], what: str) -> list[str]:
    # A lone str is a Sequence[str] too; sending it would silently predict on each of its characters.
    if isinstance(values, str):
        raise TypeError(f"{what} must be a sequence of strings, not a single str")
    return list(values)


def _read_file(spec: FileSpec) -> tuple[str, tuple[str, bytes, str]]:
    if isinstance(spec, tuple):
        name, content = spec
    else:
        path = Path(spec)
        name, content = path.name, path.read_bytes()
    return "file", (name, content, "application/octet-stream")


def _body(response: httpx.Response) -> Any:
    return response.json()


@dataclass(frozen=True, slots=True)
class Sampling:
    """How outputs are decoded beyond greedy: `temperature` 0 is greedy (beam search with num_beams > 1); above 0
    sampling with `top_k` (0: off) then `top_p`, reproducible for a `seed`; `stop`: end before any of these."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def _predict_body(
    task: str,
    inputs: Sequence[str],
    max_new_tokens: int | None,
    num_beams: int,
    min_new_tokens: int,
    sampling: Sampling | None,
    stream: bool = False,
) -> dict[str, object]:
    """Unset, `max_new_tokens` is left to the server (32, or its limit if lower); defaults are not sent."""
    body: dict[str, object] = {"task": task, "inputs": _texts(inputs, "inputs"), "num_beams": num_beams}
    if max_new_tokens is not None:
        body["max_new_tokens"] = max_new_tokens
    if min_new_tokens:
        body["min_new_tokens"] = min_new_tokens
    defaults = Sampling()
    for name in Sampling.__slots__:
        value = getattr(sampling or defaults, name)
        if value != getattr(defaults, name):
            body[name] = list(value) if name == "stop" else value
    if stream:
        body["stream"] = True
    return body


def _predict(body: dict[str, object]) -> _Call[PredictResult]:
    return _Call("POST", "/v1/predict", lambda r: PredictResult.from_json(_body(r)), json=body)


@dataclass
class _Events:
    """Server-sent events of `/v1/predict` with `stream`, line by line: deltas, then the whole answer."""

    event: str | None = None

    def feed(self, line: str) -> StreamDelta | PredictResult | None:
        if line.startswith("event:"):
            self.event = line[6:].strip()
            return None
        if not line.startswith("data:"):
            return None
        event, self.event = self.event, None
        data = json.loads(line[5:])
        if event == "error":
            error = data.get("error", {}) if isinstance(data, dict) else {}
            raise StreamError(200, str(error.get("code", "internal")), str(error.get("message", "stream failed")))
        return PredictResult.from_json(data) if event == "done" else StreamDelta.from_json(data)


def _score(task: str, inputs: Sequence[str], targets: Sequence[str]) -> _Call[ScoreResult]:
    body = {"task": task, "inputs": _texts(inputs, "inputs"), "targets": _texts(targets, "targets")}
    return _Call("POST", "/v1/score", lambda r: ScoreResult.from_json(_body(r)), json=body)


def _upload(task: str, files: Sequence[FileSpec]) -> _Call[AdapterInfo]:
    if isinstance(files, str | os.PathLike):
        raise TypeError("files must be a sequence of paths or (filename, bytes) tuples, not a single path")
    if not files:
        raise ValueError("upload needs at least one file")
    parts = [_read_file(f) for f in files]
    return _Call("PUT", _task_path(task), lambda r: AdapterInfo.from_json(_body(r)), files=parts)


def _parse_adapter_list(response: httpx.Response) -> list[AdapterInfo]:
    body = _body(response)
    if not isinstance(body, list):
        raise TypeError(f"expected a JSON list, got {type(body).__name__}")
    return [AdapterInfo.from_json(item) for item in body]


PAGE_SIZE = 1000  # adapters per GET /v1/adapters page the client asks for


@dataclass(frozen=True)
class _Page:
    adapters: list[AdapterInfo]
    next_after: str | None  # the server's cursor (X-Next-After) while more pages follow


def _query(**params: Any) -> str:
    given = {k: ("true" if v is True else v) for k, v in params.items() if v is not None and v is not False}
    return f"?{urlencode(given)}" if given else ""


def _list_page(after: str | None, limit: int, residency: bool) -> _Call[_Page]:
    path = "/v1/adapters" + _query(after=after, limit=limit, residency=residency)
    return _Call("GET", path, lambda r: _Page(_parse_adapter_list(r), r.headers.get("x-next-after")))


def _get_adapter(task: str, residency: bool = False) -> _Call[AdapterInfo]:
    return _Call("GET", _task_path(task) + _query(residency=residency), lambda r: AdapterInfo.from_json(_body(r)))


def _pin(task: str, pinned: bool) -> _Call[AdapterInfo]:
    return _Call("PUT" if pinned else "DELETE", _task_path(task) + "/pin", lambda r: AdapterInfo.from_json(_body(r)))


def _delete_adapter(task: str) -> _Call[None]:
    return _Call("DELETE", _task_path(task), lambda r: None)


def _probe(path: str) -> _Call[bool]:
    # 503 is the probe's "no" (e.g. still loading the backbone); anything else non-2xx is a real error.
    return _Call("GET", path, lambda r: r.is_success, accept=frozenset({503}))


def _metrics() -> _Call[str]:
    return _Call("GET", "/metrics", lambda r: r.text)


def _client_options(base_url: str | None, token: str | None, timeout: float) -> dict[str, Any]:
    """`base_url` None: $KRONSERVE_URL, else the local default; `token` None: $KRONSERVE_TOKEN ("" sends none)."""
    token = os.environ.get("KRONSERVE_TOKEN") if token is None else token
    headers = {"User-Agent": _USER_AGENT, "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    base_url = base_url or os.environ.get("KRONSERVE_URL") or DEFAULT_URL
    return {"base_url": base_url, "headers": headers, "timeout": httpx.Timeout(timeout)}


def _retry_wait(error: KronserveClientError, attempt: int, retries: int) -> float | None:
    """Seconds to wait before retry `attempt + 1`, or None to raise `error`: only a shed (429/503) or never-sent
    request is retried, after the server's Retry-After when it gave one, else an exponential backoff with jitter."""
    if attempt >= retries or not is_retryable(error):
        return None
    if error.retry_after is not None:
        return min(error.retry_after, MAX_RETRY_WAIT)
    return min(0.5 * 2**attempt, MAX_RETRY_WAIT) * random.uniform(0.5, 1.0)


class KronserveClient:
    """Blocking client; one instance keeps a connection pool, so reuse it and close it (or use `with`).

    `base_url` defaults to $KRONSERVE_URL (else http://127.0.0.1:8000) and `token` to $KRONSERVE_TOKEN; the token
    is sent as a bearer token on every request; the server needs it for upload and delete. Every failure raises a
    `KronserveClientError` subclass: a non-success reply by its status, no reply at all `Unreachable`.
    `retries` (default 0: off) retries a request the server shed (429/503) or that never left this machine, after
    the server's Retry-After (at most 30 s) or an exponential backoff.
    """

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        retries: int = 0,
    ) -> None:
        self._http = httpx.Client(transport=transport, **_client_options(base_url, token, timeout))
        self.retries = retries

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    def _run(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            try:
                return call.finish(self._send(call))
            except KronserveClientError as e:
                wait = _retry_wait(e, attempt, self.retries)
                if wait is None:
                    raise
            time.sleep(wait)
            attempt += 1

    def _send(self, call: _Call[Any]) -> httpx.Response:
        try:
            return self._http.request(call.method, call.path, json=call.json, files=call.files)
        except httpx.TransportError as e:
            raise error_from_transport(e, self.base_url) from e

    def predict(
        self,
        task: str,
        inputs: Sequence[str],
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        min_new_tokens: int = 0,
        sampling: Sampling | None = None,
    ) -> PredictResult:
        """Generate one output per input with the task's current adapter (the server allows 1..64 inputs)."""
        return self._run(_predict(_predict_body(task, inputs, max_new_tokens, num_beams, min_new_tokens, sampling)))

    def predict_stream(
        self,
        task: str,
        inputs: Sequence[str],
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        min_new_tokens: int = 0,
        sampling: Sampling | None = None,
    ) -> Iterator[StreamDelta | PredictResult]:
        """`StreamDelta`s as tokens are decoded, then the `PredictResult` (each output is its deltas' sum).

        An error before the stream begins raises as `predict` does (no retry once text has flowed); one after it
        raises `StreamError`. Leaving the loop early closes the connection: the server stops generating.
        """
        body = _predict_body(task, inputs, max_new_tokens, num_beams, min_new_tokens, sampling, stream=True)
        try:
            with self._http.stream("POST", "/v1/predict", json=body) as response:
                if not response.is_success:
                    response.read()
                    raise error_from_response(response)
                events = _Events()
                for line in response.iter_lines():
                    item = events.feed(line)
                    if item is not None:
                        yield item
        except httpx.TransportError as e:
            raise error_from_transport(e, self.base_url) from e

    def score(self, task: str, inputs: Sequence[str], targets: Sequence[str]) -> ScoreResult:
        """Score each target given its input (paired by position, so both must have the same length)."""
        return self._run(_score(task, inputs, targets))

    def upload(self, task: str, files: Sequence[FileSpec]) -> AdapterInfo:
        """Install the adapter in `files` as the task's next version; it serves as soon as this returns.

        Path files are read fully into memory before sending: adapters are small, and this keeps retries simple.
        """
        return self._run(_upload(task, files))

    def list_adapters(self, residency: bool = False, page_size: int = PAGE_SIZE) -> list[AdapterInfo]:
        """Every adapter the server currently serves, in task order (all pages; see `iter_adapters`)."""
        return list(self.iter_adapters(residency, page_size))

    def iter_adapters(self, residency: bool = False, page_size: int = PAGE_SIZE) -> Iterator[AdapterInfo]:
        """Every adapter, one page (`page_size`) fetched at a time: a catalogue of 100,000 tasks never sits in one
        reply. With `residency`, each says where its weights are now (tier, pinned, bytes)."""
        after: str | None = None
        while True:
            page = self._run(_list_page(after, page_size, residency))
            yield from page.adapters
            if page.next_after is None:
                return
            after = page.next_after

    def get_adapter(self, task: str, residency: bool = False) -> AdapterInfo:
        """The task's current adapter; raises NotFound when the task has none."""
        return self._run(_get_adapter(task, residency))

    def pin_adapter(self, task: str, pinned: bool = True) -> AdapterInfo:
        """Keep the task on the server's device, never evicted (False: back to LRU); needs the admin token."""
        return self._run(_pin(task, pinned))

    def delete_adapter(self, task: str) -> None:
        """Stop serving the task; raises NotFound when the task has no adapter."""
        self._run(_delete_adapter(task))

    def healthz(self) -> bool:
        """Liveness: False when the server answers 503; connection failures raise `Unreachable`, not False."""
        return self._run(_probe("/healthz"))

    def readyz(self) -> bool:
        """Readiness (can it serve requests now): False on 503; connection failures raise."""
        return self._run(_probe("/readyz"))

    def metrics(self) -> str:
        """The Prometheus exposition text, unparsed."""
        return self._run(_metrics())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncKronserveClient:
    """Asyncio twin of `KronserveClient`: same methods, same contracts, awaited.

    `upload` reads path files synchronously while building the request; adapter files are small enough for that.
    """

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        retries: int = 0,
    ) -> None:
        self._http = httpx.AsyncClient(transport=transport, **_client_options(base_url, token, timeout))
        self.retries = retries

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    async def _run(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            try:
                return call.finish(await self._send(call))
            except KronserveClientError as e:
                wait = _retry_wait(e, attempt, self.retries)
                if wait is None:
                    raise
            await asyncio.sleep(wait)
            attempt += 1

    async def _send(self, call: _Call[Any]) -> httpx.Response:
        try:
            return await self._http.request(call.method, call.path, json=call.json, files=call.files)
        except httpx.TransportError as e:
            raise error_from_transport(e, self.base_url) from e

    async def predict(
        self,
        task: str,
        inputs: Sequence[str],
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        min_new_tokens: int = 0,
        sampling: Sampling | None = None,
    ) -> PredictResult:
        """See `KronserveClient.predict`."""
        body = _predict_body(task, inputs, max_new_tokens, num_beams, min_new_tokens, sampling)
        return await self._run(_predict(body))

    async def predict_stream(
        self,
        task: str,
        inputs: Sequence[str],
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        min_new_tokens: int = 0,
        sampling: Sampling | None = None,
    ) -> AsyncIterator[StreamDelta | PredictResult]:
        """See `KronserveClient.predict_stream`."""
        body = _predict_body(task, inputs, max_new_tokens, num_beams, min_new_tokens, sampling, stream=True)
        try:
            async with self._http.stream("POST", "/v1/predict", json=body) as response:
                if not response.is_success:
                    await response.aread()
                    raise error_from_response(response)
                events = _Events()
                async for line in response.aiter_lines():
                    item = events.feed(line)
                    if item is not None:
                        yield item
        except httpx.TransportError as e:
            raise error_from_transport(e, self.base_url) from e

    async def score(self, task: str, inputs: Sequence[str], targets: Sequence[str]) -> ScoreResult:
        """See `KronserveClient.score`."""
        return await self._run(_score(task, inputs, targets))

    async def upload(self, task: str, files: Sequence[FileSpec]) -> AdapterInfo:
        """See `KronserveClient.upload`."""
        return await self._run(_upload(task, files))

    async def list_adapters(self, residency: bool = False, page_size: int = PAGE_SIZE) -> list[AdapterInfo]:
        """See `KronserveClient.list_adapters`."""
        return [a async for a in self.iter_adapters(residency, page_size)]

    async def iter_adapters(self, residency: bool = False, page_size: int = PAGE_SIZE) -> AsyncIterator[AdapterInfo]:
        """See `KronserveClient.iter_adapters`."""
        after: str | None = None
        while True:
            page = await self._run(_list_page(after, page_size, residency))
            for adapter in page.adapters:
                yield adapter
            if page.next_after is None:
                return
            after = page.next_after

    async def get_adapter(self, task: str, residency: bool = False) -> AdapterInfo:
        """See `KronserveClient.get_adapter`."""
        return await self._run(_get_adapter(task, residency))

    async def pin_adapter(self, task: str, pinned: bool = True) -> AdapterInfo:
        """See `KronserveClient.pin_adapter`."""
        return await self._run(_pin(task, pinned))

    async def delete_adapter(self, task: str) -> None:
        """See `KronserveClient.delete_adapter`."""
        await self._run(_delete_adapter(task))

    async def healthz(self) -> bool:
        """See `KronserveClient.healthz`."""
        return await self._run(_probe("/healthz"))

    async def readyz(self) -> bool:
        """See `KronserveClient.readyz`."""
        return await self._run(_probe("/readyz"))

    async def metrics(self) -> str:
        """See `KronserveClient.metrics`."""
        return await self._run(_metrics())

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
