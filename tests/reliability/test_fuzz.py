"""Schemathesis over the live OpenAPI schema: every operation, a bounded number of examples each, against a real
`kronserve serve` with an admin token and one uploaded adapter. No 5xx, every refusal in the documented error shape,
answers conform to the schema; afterwards the process is alive and ready, and what only the admin may change is as it
was (the fuzzer never holds the token)."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from kronserve.backbone import load_backbone
from kronserve.formats.native import dumps

from ..conftest import make_adapter
from ..e2e.conftest import Server, upload

TOKEN = "fuzz-admin-token"
TASK = "base"
MAX_EXAMPLES = 40  # per operation; the parameterless probes have one distinct request each
# Small limits keep the engine work per request cheap on CPU; larger values take the documented 422 path.
MAX_NEW_TOKENS, MAX_INPUTS, MAX_BEAMS, MAX_INPUT_TOKENS = 8, 4, 2, 64
LIMITS = {
    "KRONSERVE_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS),
    "KRONSERVE_MAX_INPUTS": str(MAX_INPUTS),
    "KRONSERVE_MAX_BEAMS": str(MAX_BEAMS),
    "KRONSERVE_MAX_INPUT_TOKENS": str(MAX_INPUT_TOKENS),
}
OPERATIONS = [
    "POST /v1/predict",
    "POST /v1/score",
    "PUT /v1/adapters/{task}",
    "GET /v1/adapters/{task}",
    "DELETE /v1/adapters/{task}",
    "GET /v1/adapters",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
]
# Near misses of the admin token: none of them may pass.
WRONG_AUTH = ["", "Bearer ", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", f"Basic {TOKEN}", f"Token {TOKEN}", TOKEN]
_PUT_BODY = {"body": b"\0" * 16, "media_type": "application/octet-stream"}
# Requests sent whatever the generator draws: the engine runs the uploaded task; every near miss of the token is
# tried on PUT and DELETE of that task (and must get 401).
EXPLICIT = {
    "POST /v1/predict": [{"body": {"task": TASK, "inputs": ["translate: hello"], "max_new_tokens": 4}}],
    "POST /v1/score": [{"body": {"task": TASK, "inputs": ["a", "b"], "targets": ["x", "y"]}}],
    "GET /v1/adapters/{task}": [{"path_parameters": {"task": TASK}}],
    "PUT /v1/adapters/{task}": [
        {"path_parameters": {"task": TASK}, "headers": {"Authorization": a}, **_PUT_BODY} for a in WRONG_AUTH
    ],
    "DELETE /v1/adapters/{task}": [
        {"path_parameters": {"task": TASK}, "headers": {"Authorization": a}} for a in WRONG_AUTH
    ],
}
# Operations whose fuzzing must have reached the uploaded task at least once with a 2xx.
MUST_SUCCEED_ON_TASK = {"POST /v1/predict", "POST /v1/score", "GET /v1/adapters/{task}"}
# The documented refusals (README, "Every error is JSON"): status -> codes.
CODES = {
    400: {"malformed_json", "bad_request"},
    401: {"unauthorized"},
    404: {"unknown_task", "not_found"},
    413: {"payload_too_large"},
    415: {"unsupported_format"},
    422: {"validation_error", "invalid_request", "invalid_adapter", "invalid_spec", "backbone_mismatch"},
    503: {"overloaded", "not_ready", "timeout", "bank_full"},
}
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.negative_data_rejection,
]
statuses: Counter[tuple[str, bool, int]] = Counter()  # (operation, named the uploaded task, status) -> requests


def store_files(store: Path) -> dict[str, str]:
    return {
        str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest() for p in store.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def fuzz_server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    store = tmp_path_factory.mktemp("fuzz-store")
    s = Server(tiny_dir, store, KRONSERVE_ADMIN_TOKEN=TOKEN, **LIMITS).start()
    data = dumps(make_adapter(load_backbone(str(tiny_dir), device="cpu"), TASK, "compacter", seed=7))
    r = upload(s.url, TASK, data, token=TOKEN)
    assert r.status_code == 201, r.text
    s.sha256 = hashlib.sha256(data).hexdigest()  # type: ignore[attr-defined]
    s.adapter, s.files = r.json(), store_files(store)  # type: ignore[attr-defined]
    assert s.adapter["sha256"] == s.sha256  # type: ignore[attr-defined]
    yield s
    s.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server) -> schemathesis.BaseSchema:
    # An explicit config (fixed seed), not one discovered from a schemathesis.toml.
    schema = schemathesis.openapi.from_url(
        f"{fuzz_server.url}/openapi.json", config=schemathesis.Config.from_dict({"seed": 0})
    )
    schema.config.update(base_url=fuzz_server.url)
    return schema


def _name_task(case: schemathesis.Case) -> schemathesis.Case:
    """A valid case, now naming the uploaded task (still valid: TASK matches the task-id pattern)."""
    if isinstance(case.body, dict) and "task" in case.body:
        case.body = {**case.body, "task": TASK}
    if "task" in (case.path_parameters or {}):
        case.path_parameters = {**case.path_parameters, "task": TASK}
    return case


def _within_limits(case: schemathesis.Case) -> schemathesis.Case:
    """A valid predict/score body for the uploaded task, cut to the server's limits so the engine runs it."""
    body = {**case.body, "task": TASK}
    body["inputs"] = inputs = body["inputs"][:MAX_INPUTS]
    if "targets" in body:
        body["targets"] = (body["targets"] * len(inputs))[: len(inputs)]
    else:
        body["max_new_tokens"] = max_new = min(body.get("max_new_tokens", MAX_NEW_TOKENS), MAX_NEW_TOKENS)
        body["min_new_tokens"] = min(body.get("min_new_tokens", 0), max_new)
        body["num_beams"] = min(body.get("num_beams", 1), MAX_BEAMS)
    case.body = body
    return case


def _with_auth(case: schemathesis.Case, value: str) -> schemathesis.Case:
    case.headers = {**(case.headers or {}), "Authorization": value}
    return case


def _names_task(case: schemathesis.Case) -> bool:
    in_body = isinstance(case.body, dict) and case.body.get("task") == TASK
    return in_body or (case.path_parameters or {}).get("task") == TASK


def strategy_for(operation: schemathesis.APIOperation) -> st.SearchStrategy[schemathesis.Case]:
    """Valid cases; valid cases naming the uploaded task (for predict/score also cut to the limits, for PUT/DELETE
    also with a wrong token); invalid cases."""
    positive = operation.as_strategy(GenerationMode.POSITIVE)
    if not operation.path_parameters and not operation.body:  # nothing to vary or to make invalid
        return positive
    on_task = positive.map(_name_task)
    strategies = [positive, on_task, operation.as_strategy(GenerationMode.NEGATIVE)]
    if operation.method.upper() == "POST":
        strategies.append(positive.map(_within_limits))
    if operation.method.upper() in ("PUT", "DELETE"):
        strategies.append(st.tuples(on_task, st.sampled_from(WRONG_AUTH)).map(lambda pair: _with_auth(*pair)))
    return st.one_of(strategies)


def error_code(response: httpx.Response | schemathesis.Response) -> str:
    """The code of a refusal in the documented shape `{"error": {"code": str, "message": str}}`."""
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert isinstance(body["error"], dict) and set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"], body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]["code"]


def check(case: schemathesis.Case) -> None:
    note(case.as_curl_command())
    response = case.call(timeout=60)
    statuses[(case.operation.label, _names_task(case), response.status_code)] += 1
    case.validate_response(response, checks=CHECKS)
    if response.status_code >= 300:
        assert response.status_code in CODES, f"{response.status_code}: {response.text}"
        code = error_code(response)
        assert code in CODES[response.status_code], f"{response.status_code}: {response.text}"
    if case.method.upper() in ("PUT", "DELETE"):  # no valid token: refused (or not routed at all)
        assert response.status_code in (401, 404), f"{response.status_code}: {response.text}"


@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzz_operation(api_schema: schemathesis.BaseSchema, label: str) -> None:
    method, path = label.split(" ")
    operation = api_schema[path][method]

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy_for(operation))
    def fuzz(case: schemathesis.Case) -> None:
        check(case)

    for explicit in EXPLICIT.get(label, []):
        fuzz = example(case=operation.Case(**explicit))(fuzz)
    fuzz()
    seen = {(on_task, status) for op, on_task, status in statuses if op == label}
    assert seen, "no request was sent"
    if label in MUST_SUCCEED_ON_TASK:
        assert any(on_task and status < 300 for on_task, status in seen), seen


def test_undocumented_method_is_405_in_error_shape(api_schema: schemathesis.BaseSchema, fuzz_server: Server) -> None:
    for path, operations in api_schema.raw_schema["paths"].items():
        r = httpx.request("PATCH", fuzz_server.url + path.replace("{task}", TASK), timeout=30)
        assert r.status_code == 405, (path, r.text)
        # Allow lists every method the path serves, as the schema documents them (not just one route's).
        assert set(r.headers["allow"].split(", ")) == {m.upper() for m in operations}, (path, r.headers["allow"])
        assert error_code(r) == "method_not_allowed", path


def test_default_max_new_tokens_is_capped_by_a_lower_limit(fuzz_server: Server) -> None:
    """The schema's default (32) is above this server's limit (8): a predict that leaves it unset is served at the
    limit instead of being refused for a value the client never sent."""
    body = {"task": TASK, "inputs": ["translate: hello", "x"]}
    r = httpx.post(f"{fuzz_server.url}/v1/predict", json=body, timeout=30)
    assert r.status_code == 200, r.text
    at_limit = httpx.post(f"{fuzz_server.url}/v1/predict", json={**body, "max_new_tokens": MAX_NEW_TOKENS}, timeout=30)
    assert r.json() == at_limit.json()
    over = httpx.post(f"{fuzz_server.url}/v1/predict", json={**body, "max_new_tokens": 32}, timeout=30)
    assert over.status_code == 422 and error_code(over) == "invalid_request", over.text  # an explicit 32 still is


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("predict", rb'{"task": "base", "inputs": ["\ud800"], "max_new_tokens": 2}'),
        ("score", rb'{"task": "base", "inputs": ["x"], "targets": ["\udfff"]}'),
    ],
    ids=["predict", "score"],
)
def test_lone_surrogate_in_text_is_refused(fuzz_server: Server, path: str, body: bytes) -> None:
    """Valid JSON (an escaped lone surrogate) but no valid Unicode text: a 4xx, never a 500. Hypothesis never draws
    surrogates, so the fuzzer cannot find this one by itself."""
    headers = {"content-type": "application/json"}
    r = httpx.post(f"{fuzz_server.url}/v1/{path}", content=body, headers=headers, timeout=30)
    assert r.status_code in (400, 422), f"{r.status_code}: {r.text}"
    assert error_code(r) in CODES[r.status_code]


@pytest.mark.parametrize("body", [b"\x80", b"[" * 100_000 + b"]" * 100_000], ids=["not-utf8", "too-deep"])
def test_unparseable_body_is_malformed_json(fuzz_server: Server, body: bytes) -> None:
    """README: unparseable JSON is 400 `malformed_json`, also a body that is not UTF-8 (the fuzzer sent b"\\x80") or
    nests too deep (FastAPI answers those itself)."""
    headers = {"content-type": "application/json"}
    r = httpx.post(f"{fuzz_server.url}/v1/predict", content=body, headers=headers, timeout=30)
    assert r.status_code == 400, r.text
    assert error_code(r) == "malformed_json", r.text


def test_server_survived_and_admin_state_unchanged(fuzz_server: Server) -> None:
    assert fuzz_server.proc is not None and fuzz_server.proc.poll() is None, fuzz_server.log.read_text()
    url = fuzz_server.url
    health = httpx.get(f"{url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = httpx.get(f"{url}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "adapters": 1}
    adapter = fuzz_server.adapter  # type: ignore[attr-defined]
    assert adapter["sha256"] == fuzz_server.sha256  # type: ignore[attr-defined]
    assert httpx.get(f"{url}/v1/adapters", timeout=30).json() == [adapter]
    assert httpx.get(f"{url}/v1/adapters/{TASK}", timeout=30).json() == adapter
    assert store_files(fuzz_server.store) == fuzz_server.files  # type: ignore[attr-defined]
    r = httpx.post(f"{url}/v1/score", json={"task": TASK, "inputs": ["x"], "targets": ["y"]}, timeout=30)
    assert r.status_code == 200 and r.json()["version"] == adapter["version"]
