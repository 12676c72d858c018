"""DELETE while requests are in flight: each request accepted before it is answered by the version it started with
(never by the bare backbone, never a 5xx); each request sent after DELETE returned gets 404 `unknown_task`; the
deleted version's bank slot is freed once its last request ends; another task is served throughout."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from ..e2e.conftest import Server, upload
from .conftest import TIMEOUT, Answer, Payload, Reference, ask, error_code, metric, score_body

TASK, OTHER = "doomed", "bystander"
# Slow generations: running (holding their version) long before and long after the DELETE.
SLOW = {"inputs": ["slow input"] * 16, "max_new_tokens": 320, "min_new_tokens": 320}
SLOW_REQUESTS = 4
QUEUED_SCORES = 8
LOOPING_CLIENTS = 4


@dataclass(frozen=True)
class Call:
    kind: str  # "slow" | "score"
    sent: float
    received: float
    status: int
    body: dict


def test_delete_under_traffic(server: Server, payload: Payload, reference: Reference) -> None:
    doomed, other = payload(TASK, seed=31), payload(OTHER, seed=32)
    want, want_other = reference.answer(doomed), reference.answer(other)
    want_slow = reference.post(doomed, "predict", SLOW)["outputs"]
    bare = reference.answer(payload("bare", std=0.0))  # a zero adapter answers as the bare backbone
    assert want.distance(bare) > 0.01  # so an answer from the bare backbone cannot pass for the adapter's
    for task, data in ((TASK, doomed), (OTHER, other)):
        assert upload(server.url, task, data).status_code == 201

    calls: list[Call] = []
    deleted = threading.Event()

    def call(kind: str, path: str, body: dict) -> None:
        sent = time.monotonic()
        r = httpx.post(f"{server.url}/v1/{path}", json={**body, "task": TASK}, timeout=TIMEOUT)
        calls.append(Call(kind, sent, time.monotonic(), r.status_code, r.json()))

    def looping() -> None:  # keeps asking through the DELETE, until three requests sent after it are answered
        after = 0
        while after < 3:
            after += deleted.is_set()
            call("score", "score", score_body(TASK))

    started = metric(server.url, "kronserve_queue_wait_seconds_count")
    slow = [threading.Thread(target=call, args=("slow", "predict", SLOW)) for _ in range(SLOW_REQUESTS)]
    for t in slow:
        t.start()
    _wait(lambda: metric(server.url, "kronserve_queue_wait_seconds_count") > started, "the slow batch to start")
    queued = [threading.Thread(target=call, args=("score", "score", score_body(TASK))) for _ in range(QUEUED_SCORES)]
    queued += [threading.Thread(target=looping) for _ in range(LOOPING_CLIENTS)]
    for t in queued:
        t.start()
    scored = lambda: metric(server.url, "kronserve_engine_seconds_count", kind="score")  # noqa: E731
    _wait(lambda: scored() >= 1, "scores to run between the slow generations' steps")

    r = httpx.delete(f"{server.url}/v1/adapters/{TASK}", timeout=TIMEOUT)
    deleted_at = time.monotonic()
    deleted.set()
    assert r.status_code == 204, r.text
    late = [httpx.post(f"{server.url}/v1/score", json=score_body(TASK), timeout=TIMEOUT) for _ in range(3)]
    assert ask(server.url, OTHER)[1].matches(want_other)  # the other task is served while the deleted one drains
    for t in slow + queued:
        t.join(timeout=2 * TIMEOUT)

    for r in late:
        assert r.status_code == 404 and error_code(r) == "unknown_task", r.text
    assert len(calls) >= SLOW_REQUESTS + QUEUED_SCORES + 3 * LOOPING_CLIENTS
    for c in calls:
        _check_call(c, deleted_at, want, want_slow)
    # Requests in flight across the DELETE were answered, by the deleted version: the slow generations ran through it.
    assert sum(c.kind == "slow" and c.status == 200 and c.received > deleted_at for c in calls) == SLOW_REQUESTS, calls

    assert httpx.get(f"{server.url}/v1/adapters/{TASK}", timeout=TIMEOUT).status_code == 404
    assert [e["task"] for e in httpx.get(f"{server.url}/v1/adapters", timeout=TIMEOUT).json()] == [OTHER]
    assert not (server.store / TASK).exists()
    assert metric(server.url, "kronserve_adapters_active") == 1
    assert metric(server.url, "kronserve_adapters_resident") == 1  # the deleted version's slot is free again


def _check_call(c: Call, deleted_at: float, want: Answer, want_slow: list[str]) -> None:
    """Sent after DELETE returned: 404. Sent before: 404 if admitted after it, else the deleted version's answer."""
    if c.sent > deleted_at or c.status != 200:
        assert c.status == 404 and c.body["error"]["code"] == "unknown_task", c
    elif c.kind == "slow":
        assert c.body["version"] == 1 and c.body["outputs"] == want_slow, c
    else:
        assert c.body["version"] == 1 and want.same_scores(c.body["scores"]), c


def _wait(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
