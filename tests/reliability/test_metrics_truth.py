"""Metrics tell the truth: on a fresh server, a scripted mix of good and bad requests, then `/metrics` must hold
exactly the script's own counts: requests by endpoint and status, failures by code, adapter loads and load failures,
per-task requests, batches and rows, and the active/resident adapter gauges."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import httpx

from ..e2e.conftest import Server
from .conftest import TIMEOUT, Payload, error_code, metric_samples

PREDICT, SCORE, ADAPTER, ADAPTERS = "/v1/predict", "/v1/score", "/v1/adapters/{task}", "/v1/adapters"


@dataclass
class Script:
    """Sends requests one at a time, checks each one's status and code, and counts what the metrics must say."""

    url: str
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (endpoint, status)
    failures: Counter[tuple[str, str]] = field(default_factory=Counter)  # (endpoint, code)
    loads: int = 0
    load_failures: Counter[str] = field(default_factory=Counter)  # code
    task_requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (task, "predict" | "score")
    batches: Counter[str] = field(default_factory=Counter)  # engine kind -> batches (one per request: sequential)
    rows: int = 0

    def send(self, method: str, path: str, endpoint: str, status: int, code: str | None = None, **kw) -> None:
        r = httpx.request(method, f"{self.url}{path}", timeout=TIMEOUT, **kw)
        assert r.status_code == status, (method, path, r.text)
        if code is not None:
            assert error_code(r) == code, r.text
            self.failures[(endpoint, code)] += 1
        self.requests[(endpoint, str(status))] += 1

    def put(self, task: str, status: int, code: str | None = None, loaded: bool = True, **kw) -> None:
        """`loaded`: the file reached validation, so the upload counts as a load or a load failure."""
        self.send("PUT", f"/v1/adapters/{task}", ADAPTER, status, code, **kw)
        if loaded and status == 201:
            self.loads += 1
        elif loaded:
            self.load_failures[code] += 1

    def ask(self, kind: str, task: str, n: int, status: int = 200, code: str | None = None) -> None:
        body = {"task": task, "inputs": [f"input {i}" for i in range(n)]}
        body |= {"targets": ["t"] * n} if kind == "score" else {"max_new_tokens": 4}
        self.send("POST", f"/v1/{kind}", f"/v1/{kind}", status, code, json=body)
        if status == 200:
            self.task_requests[(task, kind)] += 1
            self.batches["score" if kind == "score" else "generate"] += 1
            self.rows += n


def run_script(s: Script, payload: Payload, other_payload: Payload) -> None:
    def file(data: bytes) -> dict:
        return {"files": {"file": ("a.safetensors", data)}}

    good = payload("m-one", seed=61)
    s.put("m-one", 201, **file(good))
    s.put("m-two", 201, **file(payload("m-two", seed=62)))
    s.put("m-one", 201, **file(payload("m-one", seed=63)))  # version 2: version 1's slot is freed
    s.put("m-one", 422, "invalid_adapter", **file(good[:-100]))
    s.put("m-one", 422, "invalid_adapter", **file(b""))
    s.put("m-one", 422, "backbone_mismatch", **file(other_payload("m-one", seed=61)))
    s.put("m-one", 415, "unsupported_format", **file(b"\x80\x04garbage" * 50))
    s.put("m-one", 400, "bad_request", loaded=False, files={"other": ("x", b"abc")})
    s.put("UPPER", 422, "validation_error", loaded=False, **file(good))
    for task, n in (("m-one", 1), ("m-one", 1), ("m-one", 3), ("m-two", 1), ("m-two", 2)):
        s.ask("predict", task, n)
    for task, n in (("m-one", 2), ("m-one", 1), ("m-two", 2), ("m-two", 4)):
        s.ask("score", task, n)
    for kind in ("predict", "predict", "predict", "score"):
        s.ask(kind, "nope", 1, 404, "unknown_task")
    s.send("POST", PREDICT, PREDICT, 422, "validation_error", json={"task": "m-one", "inputs": []})
    s.send("POST", PREDICT, PREDICT, 422, "validation_error", json={"task": "m-one", "inputs": ["x"], "max": 1})
    s.send("POST", SCORE, SCORE, 422, "validation_error", json={"task": "m-one", "inputs": ["x"]})
    s.send("POST", SCORE, SCORE, 422, "invalid_request", json={"task": "m-one", "inputs": ["x"], "targets": ["a", "b"]})
    s.send("POST", PREDICT, PREDICT, 422, "invalid_request", json={"task": "m-one", "inputs": ["x"], "num_beams": 99})
    json_type = {"content-type": "application/json"}
    s.send("POST", PREDICT, PREDICT, 400, "malformed_json", content=b'{"task": ', headers=json_type)
    s.send("DELETE", "/v1/adapters/m-two", ADAPTER, 204)
    s.send("DELETE", "/v1/adapters/m-two", ADAPTER, 404, "unknown_task")
    s.ask("score", "m-two", 1, 404, "unknown_task")
    s.send("GET", "/v1/adapters", ADAPTERS, 200)
    s.send("GET", "/v1/adapters/m-one", ADAPTER, 200)
    s.send("GET", "/v1/adapters/m-two", ADAPTER, 404, "unknown_task")
    s.send("PATCH", "/v1/adapters/m-one", ADAPTER, 405, "method_not_allowed")
    s.send("GET", "/no/such/path", "unmatched", 404, "not_found")
    s.send("GET", "/healthz", "/healthz", 200)


def family(samples: dict, name: str, drop: tuple[str, str] | None = None) -> Counter:
    """One metric's samples as a Counter keyed by its label values (sorted by label name), zeros left out."""
    out: Counter = Counter()
    for (sample, labels), value in samples.items():
        if sample == name and value and (drop is None or drop not in labels):
            out[tuple(v for _, v in sorted(labels))] = value
    return out


def test_metrics_equal_the_scripts_own_counts(server: Server, payload: Payload, other_payload: Payload) -> None:
    script = Script(server.url)
    run_script(script, payload, other_payload)
    m = metric_samples(server.url)  # the scrape itself is counted only after it is answered

    # Server.start polled /readyz until its first 200; earlier polls (if any) were 503 not_ready.
    not_ready = m.get(("kronserve_requests_total", frozenset({("endpoint", "/readyz"), ("status", "503")})), 0)
    readyz = Counter({("/readyz", "200"): 1} | ({("/readyz", "503"): not_ready} if not_ready else {}))
    assert family(m, "kronserve_requests_total") == script.requests + readyz
    readyz_failures = Counter({("not_ready", "/readyz"): not_ready} if not_ready else {})
    assert family(m, "kronserve_request_failures_total") == (
        Counter({(code, endpoint): n for (endpoint, code), n in script.failures.items()}) + readyz_failures
    )
    latency_counts = Counter()
    for (endpoint, _), n in (script.requests + readyz).items():
        latency_counts[(endpoint,)] += n
    assert family(m, "kronserve_request_latency_seconds_count") == latency_counts

    assert family(m, "kronserve_adapter_loads_total") == Counter({("upload",): script.loads})
    assert family(m, "kronserve_adapter_load_failures_total") == Counter(
        {(code, "upload"): n for code, n in script.load_failures.items()}
    )
    assert m[("kronserve_adapter_load_seconds_count", frozenset())] == script.loads
    assert family(m, "kronserve_task_requests_total") == Counter(
        {(kind, task): n for (task, kind), n in script.task_requests.items()}
    )
    assert m[("kronserve_adapters_active", frozenset())] == 1  # m-one; m-two was deleted
    assert m[("kronserve_adapters_resident", frozenset())] == 1  # replaced and deleted versions' slots are free

    batches = sum(script.batches.values())
    assert family(m, "kronserve_engine_seconds_count") == Counter({(k,): n for k, n in script.batches.items()})
    assert m[("kronserve_queue_wait_seconds_count", frozenset())] == batches
    assert m[("kronserve_batch_rows_count", frozenset())] == batches
    assert m[("kronserve_batch_rows_sum", frozenset())] == script.rows
    assert m[("kronserve_batch_tasks_sum", frozenset())] == batches  # one task per batch
    assert m[("kronserve_queue_depth", frozenset())] == 0

    again = metric_samples(server.url)  # now the first scrape is counted, and nothing else moved
    assert family(again, "kronserve_requests_total") == family(m, "kronserve_requests_total") + Counter(
        {("/metrics", "200"): 1}
    )
