"""kronserve_client against httpx.MockTransport: what it sends, how it reads replies and errors, sync, async and CLI."""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import email.utils
import json
import pickle
import time
import tomllib
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import kronserve_client
from kronserve_client import (
    AdapterInfo,
    AsyncKronserveClient,
    BadRequest,
    Conflict,
    InvalidInput,
    InvalidResponse,
    KronserveClient,
    KronserveClientError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PredictResult,
    ScoreResult,
    Unauthorized,
    UnexpectedStatus,
    Unreachable,
    UnsupportedMediaType,
    cli,
)
from kronserve_client.errors import parse_retry_after

BASE = "http://kronserve.test"
ADAPTER = {"task": "qa", "version": 3, "method": "compacter", "params": 1234, "sha256": "ab" * 32}

Handler = Callable[[httpx.Request], httpx.Response]


class Server:
    """A scripted server: records every request and answers with `handler`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    def client(self, token: str | None = None, base_url: str = BASE) -> KronserveClient:
        return KronserveClient(base_url, token=token, transport=self.transport)

    def async_client(self, token: str | None = None) -> AsyncKronserveClient:
        return AsyncKronserveClient(BASE, token=token, transport=self.transport)


def reply(status: int = 200, body: Any = None, headers: dict[str, str] | None = None) -> Server:
    return Server(lambda _: httpx.Response(status, json=body, headers=headers))


def error_reply(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Server:
    return reply(status, {"error": {"code": code, "message": message}}, headers)


def multipart_parts(request: httpx.Request) -> list[tuple[str | None, str | None, bytes]]:
    """(form name, filename, content) of each part, decoded by the stdlib rather than by httpx itself."""
    raw = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode() + request.content
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    assert message.is_multipart()
    return [
        (part.get_param("name", header="content-disposition"), part.get_filename(), part.get_payload(decode=True))
        for part in message.iter_parts()
    ]


# --- request shapes and reply parsing (sync) ---


def test_predict_sends_json_body_and_parses_reply() -> None:
    server = reply(200, {"task": "qa", "version": 2, "outputs": ["x", "y"]})
    with server.client() as client:
        result = client.predict("qa", ["a", "b"], max_new_tokens=8, num_beams=4)
    assert result == PredictResult(task="qa", version=2, outputs=["x", "y"])
    req = server.last
    assert (req.method, req.url.path) == ("POST", "/v1/predict")
    assert req.headers["content-type"] == "application/json"
    assert json.loads(req.content) == {"task": "qa", "inputs": ["a", "b"], "max_new_tokens": 8, "num_beams": 4}


def test_predict_defaults_and_tuple_inputs() -> None:
    server = reply(200, {"task": "qa", "version": 1, "outputs": ["x"]})
    with server.client() as client:
        client.predict("qa", ("a",))
    assert json.loads(server.last.content) == {"task": "qa", "inputs": ["a"], "num_beams": 1}  # the server's default


def test_a_single_string_is_refused_not_split_into_characters() -> None:
    server = reply(200, {})
    with server.client() as client:
        with pytest.raises(TypeError):
            client.predict("qa", "hello")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            client.score("qa", ["a"], "b")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            client.upload("qa", "adapter.safetensors")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="at least one file"):
            client.upload("qa", [])
    assert server.requests == []


def test_score_sends_pairs_and_reads_scores_as_floats() -> None:
    server = reply(200, {"task": "qa", "version": 5, "scores": [-1.5, 0]})
    with server.client() as client:
        result = client.score("qa", ["in1", "in2"], ["t1", "t2"])
    assert result == ScoreResult(task="qa", version=5, scores=[-1.5, 0.0])
    assert all(isinstance(s, float) for s in result.scores)
    assert (server.last.method, server.last.url.path) == ("POST", "/v1/score")
    assert json.loads(server.last.content) == {"task": "qa", "inputs": ["in1", "in2"], "targets": ["t1", "t2"]}


@pytest.mark.parametrize("token", [None, "", "s3cret"])
def test_bearer_header_only_when_a_token_is_given(token: str | None) -> None:
    server = reply(200, [])
    with server.client(token=token) as client:
        client.list_adapters()
    if token:
        assert server.last.headers["authorization"] == f"Bearer {token}"
    else:
        assert "authorization" not in server.last.headers


def test_upload_sends_every_file_as_a_part_named_file(tmp_path: Path) -> None:
    path = tmp_path / "qa.safetensors"
    path.write_bytes(b"\x00\x01weights")
    server = reply(201, {**ADAPTER, "created_at": "2024-01-01", "slot": 7})
    with server.client(token="tok") as client:
        info = client.upload("qa", [path, str(path), ("config.json", b'{"a": 1}')])
    req = server.last
    assert (req.method, req.url.path) == ("PUT", "/v1/adapters/qa")
    assert req.headers["authorization"] == "Bearer tok"
    assert req.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert multipart_parts(req) == [
        ("file", "qa.safetensors", b"\x00\x01weights"),
        ("file", "qa.safetensors", b"\x00\x01weights"),
        ("file", "config.json", b'{"a": 1}'),
    ]
    assert info == AdapterInfo(
        task="qa", version=3, method="compacter", params=1234, sha256="ab" * 32,
        extra={"created_at": "2024-01-01", "slot": 7},
    )  # fmt: skip
    assert info.to_json() == {**ADAPTER, "created_at": "2024-01-01", "slot": 7}


def test_list_get_delete_adapters() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        match request.method, request.url.path:
            case "GET", "/v1/adapters":
                return httpx.Response(200, json=[ADAPTER, {**ADAPTER, "task": "nli", "version": 1}])
            case "GET", "/v1/adapters/qa":
                return httpx.Response(200, json=ADAPTER)
            case "DELETE", "/v1/adapters/qa":
                return httpx.Response(204)
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no route"}})

    server = Server(handler)
    with server.client(token="tok") as client:
        adapters = client.list_adapters()
        assert [(a.task, a.version) for a in adapters] == [("qa", 3), ("nli", 1)]
        assert adapters[0].extra == {}
        assert client.get_adapter("qa") == AdapterInfo.from_json(ADAPTER)
        assert client.delete_adapter("qa") is None
    assert server.last.headers["authorization"] == "Bearer tok"


def test_listing_follows_every_page_and_pins_go_to_the_pin_route() -> None:
    tasks = [f"t{i:02d}" for i in range(7)]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/adapters":
            return httpx.Response(200, json={**ADAPTER, "residency": {"tier": "device", "pinned": True, "bytes": 1}})
        after, limit = request.url.params.get("after"), int(request.url.params["limit"])
        rest = [t for t in tasks if after is None or t > after]
        headers = {"x-next-after": rest[limit - 1]} if len(rest) > limit else {}
        return httpx.Response(200, json=[{**ADAPTER, "task": t} for t in rest[:limit]], headers=headers)

    server = Server(handler)
    with server.client() as client:
        assert [a.task for a in client.list_adapters(page_size=3)] == tasks
        assert [r.url.params.get("after") for r in server.requests] == [None, "t02", "t05"]
        assert client.pin_adapter("qa").extra["residency"]["pinned"] is True
        assert (server.last.method, server.last.url.path) == ("PUT", "/v1/adapters/qa/pin")
        client.pin_adapter("qa", False)
        assert server.last.method == "DELETE"
        client.get_adapter("qa", residency=True)
        assert server.last.url.params["residency"] == "true"

    async def run() -> list[str]:
        async with server.async_client() as client:
            return [a.task async for a in client.iter_adapters(page_size=2)]

    assert asyncio.run(run()) == tasks


def test_task_is_one_quoted_path_segment() -> None:
    server = reply(200, ADAPTER)
    with server.client() as client:
        client.get_adapter("a/b?c")
    assert server.last.url.raw_path == b"/v1/adapters/a%2Fb%3Fc"


def test_base_url_with_a_path_prefix_is_kept() -> None:
    server = reply(200, [])
    with server.client(base_url=f"{BASE}/kron") as client:
        client.list_adapters()
    assert server.last.url.copy_with(query=None) == httpx.URL(f"{BASE}/kron/v1/adapters")


@pytest.mark.parametrize(("status", "expected"), [(200, True), (503, False)])
def test_probes_read_503_as_false(status: int, expected: bool) -> None:
    server = reply(status, {"status": "x"} if status == 200 else {"error": {"code": "not_ready", "message": "loading"}})
    with server.client() as client:
        assert client.healthz() is expected
        assert client.readyz() is expected
    assert [r.url.path for r in server.requests] == ["/healthz", "/readyz"]


def test_probe_raises_on_other_errors() -> None:
    with error_reply(500, "internal", "boom").client() as client, pytest.raises(UnexpectedStatus):
        client.readyz()


def test_metrics_returns_prometheus_text() -> None:
    text = "# HELP kronserve_requests_total Requests.\nkronserve_requests_total 3.0\n"
    server = Server(lambda _: httpx.Response(200, text=text, headers={"content-type": "text/plain; version=0.0.4"}))
    with server.client() as client:
        assert client.metrics() == text
    assert server.last.url.path == "/metrics"


def test_context_manager_closes_the_connection_pool() -> None:
    client = reply(200, []).client()
    with client as entered:
        assert entered is client
    with pytest.raises(RuntimeError):
        client.list_adapters()


# --- errors ---


@pytest.mark.parametrize(
    ("status", "cls", "headers", "retry_after"),
    [
        (400, BadRequest, None, None),
        (401, Unauthorized, None, None),
        (404, NotFound, None, None),
        (413, PayloadTooLarge, None, None),
        (415, UnsupportedMediaType, None, None),
        (422, InvalidInput, None, None),
        (429, Overloaded, {"Retry-After": "2"}, 2.0),
        (503, Overloaded, {"Retry-After": "0.5"}, 0.5),
        (503, Overloaded, None, None),
        (500, UnexpectedStatus, None, None),
        (409, Conflict, None, None),
    ],
)
def test_each_status_maps_to_its_exception(
    status: int, cls: type[KronserveClientError], headers: dict[str, str] | None, retry_after: float | None
) -> None:
    server = error_reply(status, "some_code", "what went wrong", headers)
    with server.client() as client, pytest.raises(cls) as info:
        client.predict("qa", ["a"])
    err = info.value
    assert type(err) is cls and isinstance(err, KronserveClientError)
    assert (err.status, err.code, err.message, err.retry_after) == (status, "some_code", "what went wrong", retry_after)
    assert str(err) == f"{status} some_code: what went wrong"


@pytest.mark.parametrize(
    ("response", "code", "message"),
    [
        (httpx.Response(502, text="<html><body>Bad gateway</body></html>"), "http_502", "<html><body>Bad gateway"),
        (httpx.Response(503), "http_503", "Service Unavailable"),
        (httpx.Response(404, json={"detail": "Not Found"}), "http_404", "Not Found"),
        (httpx.Response(400, json=["odd"]), "http_400", "['odd']"),
        (httpx.Response(422, json={"error": {"message": "no code"}}), "http_422", "no code"),
        (httpx.Response(400, content=b"\xff\xfe\x00garbage"), "http_400", ""),
    ],
)
def test_non_json_or_odd_error_bodies_still_map(response: httpx.Response, code: str, message: str) -> None:
    with Server(lambda _: response).client() as client, pytest.raises(KronserveClientError) as info:
        client.list_adapters()
    assert info.value.status == response.status_code
    assert info.value.code == code
    assert info.value.message.startswith(message)


def test_long_text_error_body_is_truncated() -> None:
    server = Server(lambda _: httpx.Response(500, text="x" * 5000))
    with server.client() as client, pytest.raises(UnexpectedStatus) as info:
        client.metrics()
    assert len(info.value.message) < 400


def test_retry_after_as_http_date_and_garbage() -> None:
    now = time.time()
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    assert parse_retry_after("") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("-5") == 0.0
    server = error_reply(429, "rate_limited", "slow down", {"Retry-After": "tomorrow"})
    with server.client() as client, pytest.raises(Overloaded) as info:
        client.predict("qa", ["a"])
    assert info.value.retry_after is None


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="not json"),
        httpx.Response(200, json={"task": "qa"}),
        httpx.Response(200, json={"task": "qa", "version": 1, "outputs": "x"}),
        httpx.Response(200, json=[1, 2]),
    ],
)
def test_success_with_wrong_shape_is_invalid_response(response: httpx.Response) -> None:
    with Server(lambda _: response).client() as client, pytest.raises(InvalidResponse) as info:
        client.predict("qa", ["a"])
    assert info.value.status == 200 and info.value.code == "invalid_response"


def test_adapter_list_must_be_a_list() -> None:
    with reply(200, ADAPTER).client() as client, pytest.raises(InvalidResponse):
        client.list_adapters()


def test_errors_pickle_with_their_fields() -> None:
    err = Overloaded(503, "overloaded", "queue full", 1.5)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is Overloaded
    assert (back.status, back.code, back.message, back.retry_after) == (503, "overloaded", "queue full", 1.5)


@pytest.mark.parametrize(
    ("error", "code"),
    [(httpx.ConnectError("refused"), "unreachable"), (httpx.ReadTimeout("slow"), "timeout")],
)
def test_no_reply_is_a_client_error_with_its_cause(error: httpx.TransportError, code: str) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise error

    server = Server(fail)
    with server.client() as client, pytest.raises(Unreachable) as info:
        client.healthz()
    assert isinstance(info.value, KronserveClientError) and info.value.__cause__ is error
    assert (info.value.status, info.value.code) == (0, code)
    assert info.value.message == f"cannot reach {BASE}: {error}"


def flaky(failures: list[httpx.Response | Exception]) -> Server:
    """Answers each of `failures` in turn, then 200 with a predict reply."""

    def handle(request: httpx.Request) -> httpx.Response:
        if failures:
            failure = failures.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return failure
        return httpx.Response(200, json={"task": "qa", "version": 1, "outputs": ["x"]})

    return Server(handle)


def shed(retry_after: str | None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(503, json={"error": {"code": "overloaded", "message": "full"}}, headers=headers)


def test_retries_are_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    server = flaky([shed("1")])
    with server.client() as client, pytest.raises(Overloaded):
        client.predict("qa", ["a"])
    assert len(server.requests) == 1


def test_retries_wait_as_retry_after_says_then_succeed(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(kronserve_client.client.time, "sleep", waits.append)
    too_long = httpx.Response(429, headers={"Retry-After": "600"})
    server = flaky([shed("2"), too_long, httpx.ConnectError("down"), shed(None)])
    with KronserveClient(BASE, transport=server.transport, retries=4) as client:
        assert client.predict("qa", ["a"]).outputs == ["x"]
    assert len(server.requests) == 5
    assert waits[:2] == [2.0, 30.0]  # the server's hint, capped at 30 s
    assert 1.0 <= waits[2] <= 2.0 and 2.0 <= waits[3] <= 4.0  # no hint: 0.5 s · 2^attempt, jittered down to half


def test_retries_give_up_and_never_resend_what_may_have_landed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kronserve_client.client.time, "sleep", lambda _: None)
    server = flaky([shed("0"), shed("0"), shed("0")])
    with KronserveClient(BASE, transport=server.transport, retries=2) as client, pytest.raises(Overloaded):
        client.predict("qa", ["a"])
    assert len(server.requests) == 3
    for failure in (httpx.ReadTimeout("slow"), httpx.Response(422, json={})):
        server = flaky([failure])
        client = KronserveClient(BASE, transport=server.transport, retries=5)
        with client, pytest.raises(KronserveClientError):
            client.predict("qa", ["a"])
        assert len(server.requests) == 1


def test_async_client_retries_too(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(kronserve_client.client.asyncio, "sleep", sleep)
    server = flaky([shed("3")])

    async def run() -> PredictResult:
        async with AsyncKronserveClient(BASE, transport=server.transport, retries=1) as client:
            return await client.predict("qa", ["a"])

    assert asyncio.run(run()).outputs == ["x"] and waits == [3.0]


def test_url_and_token_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KRONSERVE_URL", "http://from-env:9")
    monkeypatch.setenv("KRONSERVE_TOKEN", "envtok")
    server = reply(200, [])
    with KronserveClient(transport=server.transport) as client:
        client.list_adapters()
    assert server.last.url.copy_with(query=None) == httpx.URL("http://from-env:9/v1/adapters")
    assert server.last.headers["authorization"] == "Bearer envtok"
    with KronserveClient("http://given:1", token="", transport=server.transport) as client:
        client.list_adapters()  # an explicit URL wins; "" sends no token
    assert server.last.url.host == "given" and "authorization" not in server.last.headers


def test_adapter_spec_is_typed_and_round_trips() -> None:
    spec = {"method": "compacter", "placement": "houlsby", "sites": ["mh", "ffn"], "rank": 1, "phm_dim": 4}
    info = AdapterInfo.from_json({**ADAPTER, "spec": spec})
    assert info.spec == spec and "spec" not in info.extra
    assert info.to_json() == {**ADAPTER, "spec": spec}
    assert AdapterInfo.from_json(ADAPTER).spec is None
    hints = typing.get_type_hints(kronserve_client.AdapterSpec)
    assert hints["rank"] == int | None and hints["sites"] == list[typing.Literal["mh", "cross", "ffn"]]


def test_package_is_marked_typed() -> None:
    assert (Path(kronserve_client.__file__).parent / "py.typed").is_file()
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["kronserve_client"]


def test_public_names_are_exported() -> None:
    for name in kronserve_client.__all__:
        assert hasattr(kronserve_client, name), name


# --- async client ---


def test_async_client_matches_the_sync_one(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"w")

    def handler(request: httpx.Request) -> httpx.Response:
        match request.method, request.url.path:
            case "POST", "/v1/predict":
                return httpx.Response(200, json={"task": "qa", "version": 1, "outputs": ["o"]})
            case "POST", "/v1/score":
                return httpx.Response(200, json={"task": "qa", "version": 1, "scores": [0.25]})
            case "PUT", "/v1/adapters/qa":
                return httpx.Response(201, json={**ADAPTER, "note": "new"})
            case "GET", "/v1/adapters":
                return httpx.Response(200, json=[ADAPTER])
            case "GET", "/v1/adapters/qa":
                return httpx.Response(200, json=ADAPTER)
            case "DELETE", "/v1/adapters/qa":
                return httpx.Response(204)
            case "GET", "/healthz":
                return httpx.Response(200, json={"status": "ok"})
            case "GET", "/readyz":
                return httpx.Response(503, json={"error": {"code": "not_ready", "message": "loading"}})
            case "GET", "/metrics":
                return httpx.Response(200, text="m 1\n")
        return httpx.Response(404, json={"error": {"code": "not_found", "message": request.url.path}})

    server = Server(handler)

    async def scenario() -> None:
        async with server.async_client(token="tok") as client:
            assert await client.predict("qa", ["i"], max_new_tokens=4) == PredictResult("qa", 1, ["o"])
            assert await client.score("qa", ["i"], ["t"]) == ScoreResult("qa", 1, [0.25])
            info = await client.upload("qa", [path, ("b.json", b"{}")])
            assert info.extra == {"note": "new"}
            assert await client.list_adapters() == [AdapterInfo.from_json(ADAPTER)]
            assert await client.get_adapter("qa") == AdapterInfo.from_json(ADAPTER)
            assert await client.delete_adapter("qa") is None
            assert await client.healthz() is True
            assert await client.readyz() is False
            assert await client.metrics() == "m 1\n"
            with pytest.raises(NotFound) as err:
                await client.get_adapter("missing")
            assert err.value.message == "/v1/adapters/missing"

    asyncio.run(scenario())
    assert json.loads(server.requests[0].content) == {
        "task": "qa",
        "inputs": ["i"],
        "max_new_tokens": 4,
        "num_beams": 1,
    }
    assert multipart_parts(server.requests[2]) == [("file", "a.safetensors", b"w"), ("file", "b.json", b"{}")]
    assert all(r.headers["authorization"] == "Bearer tok" for r in server.requests)


def test_async_errors_carry_retry_after_and_no_token_means_no_header() -> None:
    server = error_reply(429, "rate_limited", "slow down", {"Retry-After": "3"})

    async def scenario() -> Overloaded:
        async with server.async_client() as client:
            with pytest.raises(Overloaded) as info:
                await client.score("qa", ["a"], ["b"])
            return info.value

    err = asyncio.run(scenario())
    assert (err.status, err.code, err.message, err.retry_after) == (429, "rate_limited", "slow down", 3.0)
    assert "authorization" not in server.last.headers


# --- CLI ---


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[Any, list[tuple[str, str | None]]]]:
    """Invoke the CLI against a scripted server; returns the result and the (url, token) each client was made with."""

    def run(server: Server, *args: str, env: dict[str, str] | None = None) -> tuple[Any, list[tuple[str, str | None]]]:
        made: list[tuple[str, str | None]] = []

        def factory(url: str, token: str | None, retries: int = 0) -> KronserveClient:
            made.append((url, token))
            return KronserveClient(url, token=token or "", transport=server.transport, retries=retries)

        monkeypatch.setattr(cli, "make_client", factory)
        environment = {"KRONSERVE_URL": None, "KRONSERVE_TOKEN": None, **(env or {})}
        return CliRunner().invoke(cli.app, list(args), env=environment), made

    return run


def test_cli_predict(run_cli: Callable[..., Any]) -> None:
    server = reply(200, {"task": "qa", "version": 1, "outputs": ["x", "y"]})
    result, made = run_cli(server, "predict", "qa", "a", "b", "--max-new-tokens", "5", "--num-beams", "2")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"task": "qa", "version": 1, "outputs": ["x", "y"]}
    assert made == [(cli.DEFAULT_URL, None)]
    assert json.loads(server.last.content) == {"task": "qa", "inputs": ["a", "b"], "max_new_tokens": 5, "num_beams": 2}
    result, _ = run_cli(server, "predict", "qa", "a", "--min-new-tokens", "3")
    assert result.exit_code == 0 and json.loads(server.last.content)["min_new_tokens"] == 3
    assert "authorization" not in server.last.headers


def test_cli_score_with_repeated_options(run_cli: Callable[..., Any]) -> None:
    server = reply(200, {"task": "qa", "version": 1, "scores": [-0.5, -1.0]})
    result, _ = run_cli(
        server, "--url", "http://other:9", "score", "qa", "-i", "a", "--input", "b", "-t", "x", "-t", "y"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["scores"] == [-0.5, -1.0]
    assert json.loads(server.last.content) == {"task": "qa", "inputs": ["a", "b"], "targets": ["x", "y"]}
    assert server.last.url == httpx.URL("http://other:9/v1/score")


def test_cli_upload_with_token_from_env(run_cli: Callable[..., Any], tmp_path: Path) -> None:
    files = [tmp_path / "a.safetensors", tmp_path / "b.json"]
    for f in files:
        f.write_bytes(f.name.encode())
    server = reply(201, {**ADAPTER, "extra_key": 1})
    env = {"KRONSERVE_TOKEN": "envtok", "KRONSERVE_URL": "http://env:1"}
    result, made = run_cli(server, "upload", "qa", *map(str, files), env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {**ADAPTER, "extra_key": 1}
    assert made == [("http://env:1", "envtok")]
    assert server.last.headers["authorization"] == "Bearer envtok"
    assert multipart_parts(server.last) == [("file", "a.safetensors", b"a.safetensors"), ("file", "b.json", b"b.json")]


def test_cli_upload_refuses_missing_files(run_cli: Callable[..., Any], tmp_path: Path) -> None:
    server = reply(201, ADAPTER)
    result, _ = run_cli(server, "upload", "qa", str(tmp_path / "nope.safetensors"))
    assert result.exit_code != 0
    assert server.requests == []


def test_cli_list_and_delete(run_cli: Callable[..., Any]) -> None:
    result, _ = run_cli(reply(200, [ADAPTER, {**ADAPTER, "task": "nli"}]), "list", "--json")
    assert result.exit_code == 0, result.output
    assert [a["task"] for a in json.loads(result.stdout)] == ["qa", "nli"]
    compact, _ = run_cli(reply(200, [ADAPTER, {**ADAPTER, "task": "nli"}]), "list")
    lines = compact.stdout.splitlines()  # one line per adapter by default
    assert len(lines) == 2 and lines[1].startswith(f"nli  v{ADAPTER['version']}  {ADAPTER['method']}  ")

    server = Server(lambda _: httpx.Response(204))
    result, _ = run_cli(server, "--token", "flagtok", "delete", "qa")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"task": "qa", "deleted": True}
    assert (server.last.method, server.last.url.path) == ("DELETE", "/v1/adapters/qa")
    assert server.last.headers["authorization"] == "Bearer flagtok"


@pytest.mark.parametrize(
    ("server", "line"),
    [
        (error_reply(401, "unauthorized", "bad token"), "error: 401 unauthorized: bad token"),
        (error_reply(404, "unknown_task", "no adapter for 'qa'"), "error: 404 unknown_task: no adapter for 'qa'"),
        (Server(lambda _: httpx.Response(502, text="bad gateway")), "error: 502 http_502: bad gateway"),
    ],
)
def test_cli_errors_go_to_stderr_with_exit_1(run_cli: Callable[..., Any], server: Server, line: str) -> None:
    result, _ = run_cli(server, "delete", "qa")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.strip() == line


def test_cli_unreachable_server(run_cli: Callable[..., Any]) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    result, _ = run_cli(Server(refuse), "list")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: cannot reach {cli.DEFAULT_URL}: connection refused")
