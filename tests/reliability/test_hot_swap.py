"""Hot swap under load: 32 clients ask one task while it is re-uploaded four times. No request fails; every answer
names a version that was active while the request was in flight and equals what that version answers in a fresh
process; once a PUT has returned, no request sent afterwards gets an older version."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field

import httpx

from ..e2e.conftest import Server, upload
from .conftest import TIMEOUT, Payload, Reference, metric, predict_body, score_body

TASK = "hot"
CLIENTS = 32
SEEDS = (101, 102, 103, 104, 105)  # version i+1 is seed SEEDS[i]: v1 before the load, four re-uploads under it
ANSWERS_PER_VERSION = 20  # answers each version must give before the next upload (coverage, not speed)


@dataclass(frozen=True)
class Call:
    client: int
    kind: str  # "score" | "predict"
    sent: float
    received: float
    version: int
    values: list


@dataclass
class Load:
    """CLIENTS threads, each asking TASK in a closed loop (even ones score, odd ones predict) until stopped."""

    url: str
    calls: list[Call] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=2 * TIMEOUT)

    def wait_for_answers(self, version: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while sum(c.version == version for c in self.calls) < ANSWERS_PER_VERSION and not self.failures:
            assert time.monotonic() < deadline, f"version {version}: fewer than {ANSWERS_PER_VERSION} answers"
            time.sleep(0.02)

    def _client(self, i: int) -> None:
        kind = "score" if i % 2 == 0 else "predict"
        body = score_body(TASK) if kind == "score" else predict_body(TASK)
        with httpx.Client(timeout=TIMEOUT) as c:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    r = c.post(f"{self.url}/v1/{kind}", json=body)
                except httpx.HTTPError as e:
                    self.failures.append(f"client {i}: {type(e).__name__}: {e}")
                    continue
                if r.status_code != 200:
                    self.failures.append(f"client {i}: {r.status_code} {r.text}")
                    continue
                values = r.json()["scores" if kind == "score" else "outputs"]
                self.calls.append(Call(i, kind, sent, time.monotonic(), r.json()["version"], values))


def test_reupload_under_32_clients_never_fails_and_never_goes_back(
    server: Server, payload: Payload, reference: Reference
) -> None:
    files = [payload(TASK, seed=s) for s in SEEDS]
    expected = {v: reference.answer(data) for v, data in enumerate(files, 1)}
    for v in expected:  # versions are told apart by their scores, so a wrong-version answer cannot pass
        assert all(expected[v].distance(expected[w]) > 0.01 for w in expected if w != v)

    load = Load(server.url)
    put_sent: dict[int, float] = {}
    put_returned: dict[int, float] = {}
    try:
        for version, data in enumerate(files, 1):
            put_sent[version] = time.monotonic()
            r = upload(server.url, TASK, data)
            put_returned[version] = time.monotonic()
            assert r.status_code == 201 and r.json()["version"] == version, r.text
            if version == 1:
                load.start()
            load.wait_for_answers(version)
    finally:
        load.finish()

    assert load.failures == []
    assert {c.version for c in load.calls} == set(expected)
    for call in load.calls:
        v = call.version
        # Active while in flight: its PUT was sent before the answer came back, and no later PUT had returned
        # when the request was sent.
        assert put_sent[v] <= call.received, call
        newest_returned = max(w for w, at in put_returned.items() if at <= call.sent)
        assert v >= newest_returned, (call, put_returned)
        if call.kind == "score":
            assert expected[v].same_scores(call.values), (call, expected[v])
        else:
            assert call.values == expected[v].outputs, (call, expected[v])
    for i in range(CLIENTS):  # a client's requests are sequential: its versions never go down
        seen = [c.version for c in load.calls if c.client == i]
        assert seen == sorted(seen), (i, seen)
    info = httpx.get(f"{server.url}/v1/adapters/{TASK}", timeout=TIMEOUT).json()
    assert info["version"] == len(SEEDS) and info["sha256"] == hashlib.sha256(files[-1]).hexdigest()
    # Every replaced version's bank slot was freed once its last request ended.
    assert metric(server.url, "kronserve_adapters_resident") == 1
