"""Limits behave as the README says: a full catalogue (`max_adapters` registered tasks) refuses a new task with 503
`bank_full` and Retry-After, leaving no trace in the store, while existing tasks can still be updated; an input or
target over `max_input_tokens` is refused with 422, never truncated."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..e2e.conftest import Server, upload
from .conftest import TIMEOUT, Payload, error_code, store_check

TASKS, MAX_INPUT_TOKENS, MAX_INPUTS = 2, 16, 70  # MAX_INPUTS above the default 64 the schema once hard-coded


@pytest.fixture(scope="module")
def small(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "KRONSERVE_MAX_ADAPTERS": str(TASKS),
        "KRONSERVE_MAX_INPUT_TOKENS": str(MAX_INPUT_TOKENS),
        "KRONSERVE_MAX_INPUTS": str(MAX_INPUTS),
        "KRONSERVE_METRICS_MAX_TASKS": "1",
    }
    s = Server(tiny_dir, tmp_path_factory.mktemp("limits") / "store", **env).start()
    yield s
    s.stop()


def served(url: str, task: str) -> tuple[int, str]:
    r = httpx.get(f"{url}/v1/adapters/{task}", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()["version"], r.json()["sha256"]


def test_a_full_bank_refuses_new_tasks_but_updates_existing_ones(small: Server, payload: Payload) -> None:
    for task in ("a", "b"):  # TASKS tasks
        assert upload(small.url, task, payload(task, seed=1)).status_code == 201

    refused = upload(small.url, "c", payload("c", seed=1))
    assert refused.status_code == 503 and error_code(refused) == "bank_full", refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert not (small.store / "c").exists()  # a refused upload leaves no empty task directory

    for seed in (2, 3, 4):  # an update is never refused: it registers no new task
        data = payload("a", seed=seed)
        r = upload(small.url, "a", data)
        assert r.status_code == 201, r.text
        assert served(small.url, "a") == (seed, hashlib.sha256(data).hexdigest())
    assert upload(small.url, "c", payload("c", seed=1)).status_code == 503

    assert httpx.delete(f"{small.url}/v1/adapters/b", timeout=TIMEOUT).status_code == 204
    assert upload(small.url, "c", payload("c", seed=1)).status_code == 201  # b's place is free again
    code, report = store_check(small.store)
    assert code == 0 and sorted(report["ok"]) == ["a", "c"] and report["orphans"] == [], report


@pytest.mark.parametrize("path", ["predict", "score"])
def test_inputs_over_the_token_limit_are_refused_not_truncated(small: Server, payload: Payload, path: str) -> None:
    if httpx.get(f"{small.url}/v1/adapters/a", timeout=TIMEOUT).status_code == 404:
        assert upload(small.url, "a", payload("a", seed=1)).status_code == 201
    long = "x" * (4 * MAX_INPUT_TOKENS)  # the byte tokenizer: a token per byte
    body = {"task": "a", "inputs": ["short", long]}
    if path == "score":
        body["targets"] = ["t", "t"]
    r = httpx.post(f"{small.url}/v1/{path}", json=body, timeout=TIMEOUT)
    assert r.status_code == 422 and error_code(r) == "invalid_request", r.text
    assert f"the limit is {MAX_INPUT_TOKENS}" in r.json()["error"]["message"]
    if path == "score":
        body = {"task": "a", "inputs": ["short"], "targets": [long]}
        r = httpx.post(f"{small.url}/v1/score", json=body, timeout=TIMEOUT)
        assert r.status_code == 422 and error_code(r) == "invalid_request", r.text


def test_max_inputs_is_the_settings_limit(small: Server, payload: Payload) -> None:
    """KRONSERVE_MAX_INPUTS decides, in both directions: 70 inputs are scored, 71 refused by name."""
    if httpx.get(f"{small.url}/v1/adapters/a", timeout=TIMEOUT).status_code == 404:
        assert upload(small.url, "a", payload("a", seed=1)).status_code == 201
    body = {"task": "a", "inputs": [f"n {i}" for i in range(MAX_INPUTS)], "targets": ["t"] * MAX_INPUTS}
    r = httpx.post(f"{small.url}/v1/score", json=body, timeout=TIMEOUT)
    assert r.status_code == 200 and len(r.json()["scores"]) == MAX_INPUTS, r.text
    for path in ("score", "predict"):
        body = {"task": "a", "inputs": ["x"] * (MAX_INPUTS + 1), "targets": ["t"] * (MAX_INPUTS + 1)}
        if path == "predict":
            del body["targets"]
        r = httpx.post(f"{small.url}/v1/{path}", json=body, timeout=TIMEOUT)
        assert r.status_code == 422 and error_code(r) == "invalid_request", r.text
        assert f"{MAX_INPUTS + 1} inputs exceed the limit of {MAX_INPUTS}" in r.json()["error"]["message"]


def test_metrics_max_tasks_bounds_the_task_labels(small: Server, payload: Payload) -> None:
    """KRONSERVE_METRICS_MAX_TASKS=1: the first task answered keeps its label, every later one is `__other__`."""
    for task in ("a", "c"):
        if httpx.get(f"{small.url}/v1/adapters/{task}", timeout=TIMEOUT).status_code == 404:
            assert upload(small.url, task, payload(task, seed=1)).status_code == 201
    for task in ("a", "c"):
        r = httpx.post(f"{small.url}/v1/score", json={"task": task, "inputs": ["x"], "targets": ["y"]}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
    families = text_string_to_metric_families(httpx.get(f"{small.url}/metrics", timeout=TIMEOUT).text)
    (requests,) = [f for f in families if f.name == "kronserve_task_requests"]
    assert {s.labels["task"] for s in requests.samples} == {"a", "__other__"}
