"""API v1 routes: thin. Validate, hand to the backend (one process or the cluster gateway), shape the answer."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Path, Query, Request, Response, Security
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ..config import TASK_ID_PATTERN
from ..errors import BadRequest, ClientClosed, InvalidRequest, KronserveError, PayloadTooLarge, Unauthorized
from ..messages import Delta, GenerationParams, Result
from .backend import Backend
from .generation import Event, checked_params, event, logprobs_out, opened, sse
from .schemas import AdapterInfo, ErrorResponse, PredictRequest, PredictResponse, ScoreRequest, ScoreResponse

# When each documented refusal happens; every operation lists the ones it can give, and only those.
_WHEN = {
    400: "malformed_json: the body is not JSON; bad_request: no `file` part, or not multipart",
    401: "unauthorized: an admin token is set and the request lacks it (Authorization: Bearer <token>)",
    404: "unknown_task: no adapter for the task (never a silent bare-backbone answer); not_found: no such route",
    409: "store_conflict: the store holds something at the task's place it will not touch; S3: retry",
    413: "payload_too_large: the body is over max_upload_bytes",
    415: "unsupported_format: the file is not an adapter format (a pickle, a zip, text...)",
    422: "validation_error / invalid_request: schema or limits; invalid_adapter, invalid_spec, backbone_mismatch",
    503: "overloaded, not_ready, timeout, bank_full, store_error, replica_unavailable, engine_restarting: "
    "retry after Retry-After",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, object]]:
    return {s: {"model": ErrorResponse, "description": _WHEN[s]} for s in statuses}


DEFAULT_PAGE, MAX_PAGE = 1000, 10000  # adapters per page of GET /v1/adapters
NEXT_HEADER = "x-next-after"
RESIDENCY_HELP = "also say where the weights are now (tier, pinned, bytes): live state, left out by default"
TaskPath = Annotated[str, Path(pattern=TASK_ID_PATTERN, description="task id", examples=["sst2"])]
# The admin token, as a security scheme: /docs gets an Authorize button. Checked by require_admin (constant time).
admin_bearer = HTTPBearer(
    auto_error=False, scheme_name="adminToken", description="KRONSERVE_ADMIN_TOKEN, when the server sets one"
)

router = APIRouter()


async def get_backend(request: Request) -> Backend:
    """Async on purpose: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request."""
    return request.app.state.backend


BackendDep = Annotated[Backend, Depends(get_backend)]
REPLICA_HEADER = "x-kronserve-replica"
VERSION_HEADER = "x-kronserve-version"


async def require_admin(
    backend: BackendDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(admin_bearer)]
) -> None:
    """With an admin token configured, PUT and DELETE need `Authorization: Bearer <token>` (constant-time)."""
    token = backend.settings.admin_token
    if token is None:
        return
    given = credentials.credentials.strip().encode() if credentials is not None else b""
    if credentials is None or not hmac.compare_digest(given, token.get_secret_value().encode()):
        raise Unauthorized("missing or wrong admin token (Authorization: Bearer …)")


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    responses={
        **_errors(400, 404, 413, 422, 503),
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with `stream`"},
    },
)
async def predict(
    body: PredictRequest, backend: BackendDep, request: Request, response: Response
) -> PredictResponse | StreamingResponse:
    _check_limits(backend, body.inputs)
    # Unset, it is min(32, the server's limit): a lower limit must not refuse the default.
    max_new = body.max_new_tokens if "max_new_tokens" in body.model_fields_set else None
    params = checked_params(
        backend.settings,
        max_new,
        body.min_new_tokens,
        body.num_beams,
        body.temperature,
        body.top_p,
        body.top_k,
        body.seed,
        tuple(body.stop),
        logprobs=body.logprobs,
        n=body.n,
    )
    if body.stream:
        return await _predict_stream(backend, body, params)
    result = await until_disconnected(request, backend.predict(body.task, body.inputs, params))
    _answered(backend, response, result, "predict")
    logprobs = None if body.logprobs is None else [logprobs_out(g.logprobs or []) for g in result.values]
    return PredictResponse(
        task=result.task, version=result.version, outputs=[g.text for g in result.values], logprobs=logprobs
    )


async def _predict_stream(backend: Backend, body: PredictRequest, params: GenerationParams) -> StreamingResponse:
    """One `{"index", "text"}` event per decoded piece of text, then `event: done` with the whole answer; an
    error after the stream began is an `event: error` with the usual error body."""
    events = backend.predict_stream(body.task, body.inputs, params)
    started = await opened(events)

    def encode(e: Event) -> list[bytes]:
        if isinstance(e, Delta):
            delta: dict[str, object] = {"index": e.index, "text": e.text}
            if e.logprobs is not None:
                delta["logprobs"] = logprobs_out(e.logprobs)
            return [event(delta)]
        if isinstance(e, Result):
            _count(backend, e, "predict")
            done = {"task": e.task, "version": e.version, "outputs": [g.text for g in e.values]}
            return [event(done, "done")]
        return []

    def error(e: KronserveError) -> bytes:
        return event({"error": {"code": e.code, "message": str(e)}}, "error")

    headers = _headers(started.version, started.replica)
    return StreamingResponse(sse(started, events, encode, error), media_type="text/event-stream", headers=headers)


@router.post("/v1/score", response_model=ScoreResponse, responses=_errors(400, 404, 413, 422, 503))
async def score(body: ScoreRequest, backend: BackendDep, request: Request, response: Response) -> ScoreResponse:
    _check_limits(backend, body.inputs)
    if len(body.targets) != len(body.inputs):
        raise InvalidRequest(f"targets has {len(body.targets)} entries but inputs has {len(body.inputs)}")
    result = await until_disconnected(request, backend.score(body.task, body.inputs, body.targets))
    _answered(backend, response, result, "score")
    return ScoreResponse(task=result.task, version=result.version, scores=result.values)


@router.put(
    "/v1/adapters/{task}",
    status_code=201,
    response_model=AdapterInfo,
    response_model_exclude_unset=True,  # `residency` only when asked
    responses=_errors(400, 401, 404, 409, 413, 415, 422, 503),
    dependencies=[Depends(require_admin)],
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                },
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            }
        }
    },
)
async def upload_adapter(
    task: TaskPath,
    request: Request,
    backend: BackendDep,
    response: Response,
    pin: Annotated[
        bool, Query(description="also keep the task on the device, never evicted (see PUT .../pin)")
    ] = False,
) -> AdapterInfo:
    """Upload a new version of `task`: a native file, or a saved AdapterHub directory's files, as `file` parts.

    A pinned task's new version (or one sent with `pin=true`) must fit the device budget beside the other pinned
    adapters: else 409 `pin_refused` and nothing changes (the task keeps its version and its pin)."""
    await backend.readiness()  # refuse (503) before reading a large body we could not serve
    body = await _read_limited(request, backend.settings.max_upload_bytes)
    parts = await _file_parts(request, body)
    return _info(await backend.upload(task, parts, pin), response)


@router.get(
    "/v1/adapters",
    response_model=list[AdapterInfo],
    response_model_exclude_unset=True,  # `residency` only when asked
    responses=_errors(422, 503),
)
async def list_adapters(
    backend: BackendDep,
    response: Response,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="adapters per page")] = DEFAULT_PAGE,
    after: Annotated[str | None, Query(description="the last task of the previous page (its Link: rel=next)")] = None,
    residency: Annotated[bool, Query(description=RESIDENCY_HELP)] = False,
) -> list[AdapterInfo]:
    """Registered tasks in task order, one page at a time: while there are more, the `Link` header names the next
    page (`rel="next"`) and `X-Next-After` its cursor."""
    infos, cursor = await backend.adapters(after, limit, residency)
    if cursor is not None:
        url = request.url.include_query_params(after=cursor, limit=limit)
        response.headers["link"] = f'<{url}>; rel="next"'
        response.headers[NEXT_HEADER] = cursor
    return [_info(info) for info in infos]


@router.put(
    "/v1/adapters/{task}/pin",
    response_model=AdapterInfo,
    response_model_exclude_unset=True,  # `residency` only when asked
    responses=_errors(401, 404, 409, 422, 503),
    dependencies=[Depends(require_admin)],
)
async def pin_adapter(task: TaskPath, backend: BackendDep, response: Response) -> AdapterInfo:
    """Keep `task` on the device, never evicted (this process, until restart; KRONSERVE_PINNED_TASKS lasts).
    409 `pin_refused` when the pinned adapters would need more than the device budget."""
    return _info(await backend.pin_task(task, True), response)


@router.delete(
    "/v1/adapters/{task}/pin",
    response_model=AdapterInfo,
    response_model_exclude_unset=True,  # `residency` only when asked
    responses=_errors(401, 404, 422, 503),
    dependencies=[Depends(require_admin)],
)
async def unpin_adapter(task: TaskPath, backend: BackendDep, response: Response) -> AdapterInfo:
    """Return `task` to the device tier's LRU (it stays resident until evicted)."""
    return _info(await backend.pin_task(task, False), response)


@router.get(
    "/v1/adapters/{task}",
    response_model=AdapterInfo,
    response_model_exclude_unset=True,  # `residency` only when asked
    responses=_errors(404, 422, 503),
)
async def get_adapter(
    task: TaskPath,
    backend: BackendDep,
    response: Response,
    residency: Annotated[bool, Query(description=RESIDENCY_HELP)] = False,
) -> AdapterInfo:
    return _info(await backend.adapter(task, residency=residency), response)


@router.delete(
    "/v1/adapters/{task}",
    status_code=204,
    responses=_errors(401, 404, 409, 422, 503),
    dependencies=[Depends(require_admin)],
)
async def delete_adapter(task: TaskPath, backend: BackendDep) -> Response:
    await backend.delete(task)
    return Response(status_code=204)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses=_errors(503))
async def readyz(backend: BackendDep) -> JSONResponse:
    return JSONResponse(await backend.readiness())


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(backend: BackendDep) -> Response:
    return Response(await backend.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")


T = TypeVar("T")
DISCONNECT_POLL_S = 0.5  # a poll costs event-loop time per request in flight; a leaver is noticed within this


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client goes away first: its rows leave the engine at the next step
    and its lease is freed then, instead of decoding an answer nobody reads."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientClosed("the client closed the connection before its answer was ready")
    finally:
        if not task.done():
            task.cancel()


def _answered(backend: Backend, response: Response, result: Result, endpoint: str) -> None:
    response.headers.update(_headers(result.version, result.replica))
    _count(backend, result, endpoint)


def _headers(version: int, replica: str | None) -> dict[str, str]:
    headers = {VERSION_HEADER: str(version)}
    if replica is not None:
        headers[REPLICA_HEADER] = replica
    return headers


def _count(backend: Backend, result: Result, endpoint: str) -> None:
    backend.metrics.task_requests.labels(backend.metrics.task_label(result.task), endpoint).inc()


def _info(info: dict[str, object], response: Response | None = None) -> AdapterInfo:
    replica = info.pop("replica", None)
    if response is not None and replica is not None:
        response.headers[REPLICA_HEADER] = str(replica)
    return AdapterInfo(**info)


def _check_limits(backend: Backend, inputs: list[str]) -> None:
    if len(inputs) > backend.settings.max_inputs:
        raise InvalidRequest(f"{len(inputs)} inputs exceed the limit of {backend.settings.max_inputs}")


async def _read_limited(request: Request, limit: int) -> bytes:
    """Read the body, refusing (413) as soon as it passes `limit` bytes: never the whole of a huge body."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the {limit}-byte upload limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the {limit}-byte upload limit")
    return bytes(body)


async def _file_parts(request: Request, body: bytes) -> dict[str, bytes]:
    """The uploaded files by name: multipart parts named `file`, or a raw octet-stream body (one native file)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/octet-stream"):
        return {"adapter.safetensors": body}
    if not content_type.startswith("multipart/form-data"):
        raise BadRequest("send the adapter as multipart/form-data with a part named 'file'")

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=16, max_fields=16).parse()
    except MultiPartException as e:
        raise BadRequest(f"malformed multipart body: {e.message}") from e
    parts = [p for p in form.getlist("file") if isinstance(p, UploadFile)]
    if not parts:
        raise BadRequest("no part named 'file' in the upload")
    files: dict[str, bytes] = {}
    for part in parts:
        name = (part.filename or "adapter.safetensors").rsplit("/", 1)[-1]
        if name in files:
            raise BadRequest(f"two 'file' parts are named {name!r}")
        files[name] = await part.read()
    return files
