"""Overload: with the queue bounded at N, a burst of 10·N requests while the engine is busy gets the excess refused at
once (503 `overloaded` + Retry-After), long before the accepted ones are answered; every accepted request is answered
correctly, and the server's memory stays bounded over several bursts."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ..e2e.conftest import Server, upload
from .conftest import TIMEOUT, Answer, Payload, Reference, error_code, metric, score_body

TASK = "busy"
QUEUE = 8
BURST = 10 * QUEUE
BURSTS = 3
# One request that keeps the engine busy for a while (about a second on an idle 2-core box).
BLOCKER = {"task": TASK, "inputs": ["keep the engine busy"] * 64, "max_new_tokens": 160, "min_new_tokens": 160}
RSS_GROWTH_LIMIT = 100 * 2**20


@dataclass(frozen=True)
class Call:
    sent: float
    received: float
    response: httpx.Response

    @property
    def latency(self) -> float:
        return self.received - self.sent


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tiny_dir, tmp_path_factory.mktemp("overload") / "store", KRONSERVE_QUEUE_SIZE=str(QUEUE)).start()
    yield s
    s.stop()


async def burst(url: str) -> list[Call]:
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as c:

        async def one() -> Call:
            sent = time.monotonic()
            r = await c.post(f"{url}/v1/score", json=score_body(TASK))
            return Call(sent, time.monotonic(), r)

        return await asyncio.gather(*(one() for _ in range(BURST)))


def busy_burst(s: Server) -> tuple[list[Call], Call]:
    """Start the blocker, wait until its batch runs, then fire the burst; returns the burst and the blocker's call."""
    blocked: list[Call] = []

    def block() -> None:
        sent = time.monotonic()
        answer = httpx.post(f"{s.url}/v1/predict", json=BLOCKER, timeout=TIMEOUT)
        blocked.append(Call(sent, time.monotonic(), answer))

    started = metric(s.url, "kronserve_queue_wait_seconds_count")
    blocker = threading.Thread(target=block)
    blocker.start()
    deadline = time.monotonic() + TIMEOUT
    while metric(s.url, "kronserve_queue_wait_seconds_count") <= started:
        assert time.monotonic() < deadline, "the blocker never started"
        time.sleep(0.01)
    calls = asyncio.run(burst(s.url))
    blocker.join(timeout=2 * TIMEOUT)
    return calls, blocked[0]


def check_burst(calls: list[Call], blocker: Call, want: Answer) -> tuple[float, float, int]:
    """Every burst: at least N accepted and answered correctly, the rest refused as documented and at once.
    Returns (median refused latency, median accepted latency, refused)."""
    accepted = [c for c in calls if c.response.status_code == 200]
    refused = [c for c in calls if c.response.status_code != 200]
    assert len(accepted) >= QUEUE and refused, (len(accepted), len(refused))
    for c in accepted:
        assert c.response.json()["version"] == 1 and want.same_scores(c.response.json()["scores"])
    for c in refused:
        assert c.response.status_code == 503 and error_code(c.response) == "overloaded", c.response.text
        assert int(c.response.headers["retry-after"]) >= 1
    # Refused at once, not after waiting for the engine: every refusal came back while the blocker still ran (relative
    # ordering only, no absolute speed). Accepted score requests run between the blocker's steps, so with the engine
    # in its own process some are answered while the API process is still reading the rest of the burst.
    assert max(c.received for c in refused) < blocker.received
    latency = statistics.median
    return latency(c.latency for c in refused), latency(c.latency for c in accepted), len(refused)


def test_burst_over_the_queue_is_refused_fast_and_memory_stays_bounded(
    server: Server, payload: Payload, reference: Reference
) -> None:
    data = payload(TASK, seed=51)
    assert upload(server.url, TASK, data).status_code == 201
    want, want_blocker = reference.answer(data), reference.post(data, "predict", BLOCKER)["outputs"]
    assert server.proc is not None
    rss = [server.rss_bytes()]  # at start, after a warm-up burst, after the other bursts
    figures = []
    for i in range(1 + BURSTS):
        calls, blocker = busy_burst(server)
        answer = blocker.response
        assert answer.status_code == 200 and answer.json()["outputs"] == want_blocker, answer.text
        figures.append(check_burst(calls, blocker, want))
        if i == 0 or i == BURSTS:
            rss.append(server.rss_bytes())
    print(f"overload: (median refused s, median accepted s, refused) per burst: {figures}")
    print("overload: server RSS MiB at start, after 1 burst, after all:", [round(r / 2**20, 1) for r in rss])

    # First-use allocations (thread pools, buffers) come with the first burst; later bursts add nothing lasting.
    assert rss[2] - rss[1] < RSS_GROWTH_LIMIT and rss[2] - rss[0] < RSS_GROWTH_LIMIT, rss
    refused = metric(server.url, "kronserve_request_failures_total", endpoint="/v1/score", code="overloaded")
    assert refused == sum(f[2] for f in figures)
    assert metric(server.url, "kronserve_queue_depth") == 0
    assert httpx.get(f"{server.url}/readyz", timeout=TIMEOUT).status_code == 200
