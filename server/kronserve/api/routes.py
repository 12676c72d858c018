"""API v1 routes: thin. Validate, hand to the scheduler or registry, shape the answer."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ..config import TASK_ID_PATTERN
from ..errors import BadRequest, InvalidRequest, KronserveError, NotReady, PayloadTooLarge, Unauthorized
from ..formats.importers import to_adapter
from ..formats.native import dumps, is_native
from ..registry import Entry
from ..scheduler import BatchKey, Result, Scheduler
from ..service import Service
from .schemas import AdapterInfo, ErrorResponse, PredictRequest, PredictResponse, ScoreRequest, ScoreResponse

_ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 422, 503)}
_ADMIN_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 415, 422, 503)}
TaskPath = Annotated[str, Path(pattern=TASK_ID_PATTERN, description="task id")]

router = APIRouter()


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def require_admin(request: Request, service: ServiceDep) -> None:
    """With an admin token configured, PUT and DELETE need `Authorization: Bearer <token>` (constant-time)."""
    token = service.settings.admin_token
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        raise Unauthorized("missing or wrong admin token (Authorization: Bearer …)")


@router.post("/v1/predict", response_model=PredictResponse, responses=_ERRORS)
async def predict(body: PredictRequest, service: ServiceDep) -> PredictResponse:
    scheduler = service.scheduler
    _check_limits(service, body.inputs)
    limit = service.settings.max_new_tokens
    # Unset, it is the schema's default, capped by the server's limit (a lower limit must not refuse the default).
    max_new = body.max_new_tokens if "max_new_tokens" in body.model_fields_set else min(body.max_new_tokens, limit)
    if max_new > limit:
        raise InvalidRequest(f"max_new_tokens {max_new} exceeds {limit}")
    if body.min_new_tokens > max_new:
        raise InvalidRequest(f"min_new_tokens {body.min_new_tokens} exceeds max_new_tokens {max_new}")
    if body.num_beams > service.settings.max_beams:
        raise InvalidRequest(f"num_beams {body.num_beams} exceeds {service.settings.max_beams}")
    key = BatchKey("generate", max_new, body.num_beams, body.min_new_tokens)
    tokens = service.engine.count_tokens(body.inputs)
    result = await _submit(service, scheduler, key, body.task, body.inputs, None, tokens)
    _count_task(service, body.task, "predict")
    return PredictResponse(task=result.task, version=result.version, outputs=result.values)


@router.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS)
async def score(body: ScoreRequest, service: ServiceDep) -> ScoreResponse:
    scheduler = service.scheduler
    _check_limits(service, body.inputs)
    if len(body.targets) != len(body.inputs):
        raise InvalidRequest(f"targets has {len(body.targets)} entries but inputs has {len(body.inputs)}")
    tokens = service.engine.count_tokens(body.inputs) + service.engine.count_tokens(body.targets, "target")
    result = await _submit(service, scheduler, BatchKey("score"), body.task, body.inputs, body.targets, tokens)
    _count_task(service, body.task, "score")
    return ScoreResponse(task=result.task, version=result.version, scores=result.values)


@router.put(
    "/v1/adapters/{task}",
    status_code=201,
    response_model=AdapterInfo,
    responses=_ADMIN_ERRORS,
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
async def upload_adapter(task: TaskPath, request: Request, service: ServiceDep) -> AdapterInfo:
    """Upload a new version of `task`: a native file, or a saved AdapterHub directory's files, as `file` parts."""
    service.engine  # noqa: B018 - raises NotReady while the backbone loads
    body = await _read_limited(request, service.settings.max_upload_bytes)
    parts = await _file_parts(request, body)
    entry = await asyncio.to_thread(_upload, service, task, parts)
    return AdapterInfo(**entry.describe())


def _upload(service: Service, task: str, parts: dict[str, bytes]) -> Entry:
    """A native file is stored as sent; another format is converted to native first (its hash is the native file's)."""
    registry = service.engine.registry
    if len(parts) == 1 and is_native(data := next(iter(parts.values()))):
        return registry.upload(task, data)
    try:
        adapter = to_adapter(parts, task, registry.fingerprint, service.settings.accept_pickle)
    except KronserveError as e:
        registry.metrics.adapter_load_failures.labels("upload", e.code).inc()
        raise
    return registry.upload(task, dumps(adapter))


@router.get("/v1/adapters", response_model=list[AdapterInfo])
async def list_adapters(service: ServiceDep) -> list[AdapterInfo]:
    return [AdapterInfo(**e.describe()) for e in service.engine.registry.entries()]


@router.get("/v1/adapters/{task}", response_model=AdapterInfo, responses=_ERRORS)
async def get_adapter(task: TaskPath, service: ServiceDep) -> AdapterInfo:
    return AdapterInfo(**service.engine.registry.get(task).describe())


@router.delete("/v1/adapters/{task}", status_code=204, responses=_ADMIN_ERRORS, dependencies=[Depends(require_admin)])
async def delete_adapter(task: TaskPath, service: ServiceDep) -> Response:
    await asyncio.to_thread(service.engine.registry.delete, task)
    return Response(status_code=204)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(service: ServiceDep) -> JSONResponse:
    if not service.ready:
        why = service.startup_error or ("draining" if service.draining else "loading the backbone and the store")
        raise NotReady(f"not ready: {why}", retry_after=5)
    return JSONResponse({"status": "ready", "adapters": len(service.engine.registry.entries())})


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def _submit(
    service: Service,
    scheduler: Scheduler,
    key: BatchKey,
    task: str,
    inputs: list[str],
    targets: list[str] | None,
    tokens: int,
) -> Result:
    """Lease the task's active version at admission (404 if none) and hold it until the answer is back."""
    registry = service.engine.registry
    (entry,) = registry.acquire([task])
    try:
        return await scheduler.submit(key, entry, inputs, targets, tokens)
    finally:
        registry.release([entry])


def _check_limits(service: Service, inputs: list[str]) -> None:
    if len(inputs) > service.settings.max_inputs:
        raise InvalidRequest(f"{len(inputs)} inputs exceed the limit of {service.settings.max_inputs}")


def _count_task(service: Service, task: str, endpoint: str) -> None:
    service.metrics.task_requests.labels(service.metrics.task_label(task), endpoint).inc()


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
