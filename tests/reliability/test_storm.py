"""Storm: three tasks, each with one mutator (a seeded random run of PUT/DELETE) and readers asking all of them.
Only documented statuses appear; every answer comes from an acknowledged upload; at the end the server is live and
ready and the list, the answers and the files on disk all agree with each task's last acknowledged operation."""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from ..e2e.conftest import Server
from .conftest import (
    TIMEOUT,
    Answer,
    Payload,
    Reference,
    ask,
    error_code,
    metric,
    predict_body,
    score_body,
    store_check,
)

TASKS = ("storm-a", "storm-b", "storm-c")
SEEDS = (0, 1, 2)  # the uploads each task's mutator chooses from
OPS = 20  # per mutator; the last is forced (storm-a ends deleted, the others uploaded) so both ends are checked
READERS = 6
# What a client may see during the storm (README error table): status -> allowed error codes (None: a success).
ALLOWED = {
    "score": {200: None, 404: {"unknown_task"}, 503: {"overloaded", "timeout"}},
    "predict": {200: None, 404: {"unknown_task"}, 503: {"overloaded", "timeout"}},
    "get": {200: None, 404: {"unknown_task"}},
    "list": {200: None},
    "put": {201: None},
    "delete": {204: None, 404: {"unknown_task"}},
}


@dataclass(frozen=True)
class Ack:
    """One acknowledged mutation: an upload of SEEDS[seed] (its 201 answer) or a delete (204, or 404: absent)."""

    op: str
    seed: int | None
    info: dict | None


@dataclass(frozen=True)
class Seen:
    task: str
    kind: str
    status: int
    code: str | None
    retry_after: str | None
    body: object


@dataclass
class Storm:
    url: str
    acks: dict[str, list[Ack]] = field(default_factory=lambda: {t: [] for t in TASKS})
    seen: list[Seen] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def mutate(self, task: str, files: list[bytes]) -> None:
        rng = random.Random(f"storm/{task}")
        ops = [rng.choice(["put", "put", "delete"]) for _ in range(OPS - 1)]
        ops.append("delete" if task == TASKS[0] else "put")
        present, version = False, 0
        with httpx.Client(timeout=TIMEOUT) as c:
            for op in ops:
                time.sleep(rng.uniform(0, 0.05))
                if op == "put":
                    seed = rng.randrange(len(SEEDS))
                    r = c.put(f"{self.url}/v1/adapters/{task}", files={"file": ("a.safetensors", files[seed])})
                    self._check("put", task, r)
                    if r.status_code == 201:
                        info = r.json()
                        if present and info["version"] <= version:
                            self.problems.append(f"{task}: re-upload got version {info['version']} after {version}")
                        present, version = True, info["version"]
                        self.acks[task].append(Ack("put", seed, info))
                else:
                    r = c.delete(f"{self.url}/v1/adapters/{task}")
                    self._check("delete", task, r)
                    if r.status_code != (204 if present else 404):
                        self.problems.append(f"{task}: delete while present={present} got {r.status_code}")
                    present = False
                    self.acks[task].append(Ack("delete", None, None))

    def read(self, i: int) -> None:
        rng = random.Random(f"reader/{i}")
        with httpx.Client(timeout=TIMEOUT) as c:
            while not self.done.is_set():
                task, kind = rng.choice(TASKS), rng.choice(["score", "predict", "score", "predict", "get", "list"])
                if kind == "score":
                    r = c.post(f"{self.url}/v1/score", json=score_body(task))
                elif kind == "predict":
                    r = c.post(f"{self.url}/v1/predict", json=predict_body(task))
                elif kind == "get":
                    r = c.get(f"{self.url}/v1/adapters/{task}")
                else:
                    r = c.get(f"{self.url}/v1/adapters")
                self._check(kind, task, r)

    def _check(self, kind: str, task: str, r: httpx.Response) -> None:
        allowed = ALLOWED[kind]
        code = error_code(r) if r.status_code >= 400 else None
        if r.status_code not in allowed or (code is not None and code not in allowed[r.status_code]):
            self.problems.append(f"{kind} {task}: {r.status_code} {r.text}")
        if r.status_code == 503 and not r.headers.get("retry-after"):
            self.problems.append(f"{kind} {task}: 503 without Retry-After")
        body = r.json() if r.content else None
        self.seen.append(Seen(task, kind, r.status_code, code, r.headers.get("retry-after"), body))


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tiny_dir, tmp_path_factory.mktemp("storm") / "store").start()
    yield s
    s.stop()


def test_storm_of_uploads_and_deletes_under_reads(server: Server, payload: Payload, reference: Reference) -> None:
    files = {t: [payload(t, seed=100 * i + s) for s in SEEDS] for i, t in enumerate(TASKS)}
    expected = {t: [reference.answer(d) for d in files[t]] for t in TASKS}
    storm = Storm(server.url)
    mutators = [threading.Thread(target=storm.mutate, args=(t, files[t])) for t in TASKS]
    readers = [threading.Thread(target=storm.read, args=(i,)) for i in range(READERS)]
    for t in readers + mutators:
        t.start()
    for t in mutators:
        t.join(timeout=10 * TIMEOUT)
    storm.done.set()
    for t in readers:
        t.join(timeout=2 * TIMEOUT)

    assert storm.problems == []
    statuses = Counter((s.kind, s.status) for s in storm.seen)
    assert statuses[("score", 200)] and statuses[("score", 404)] and statuses[("predict", 200)], statuses
    for s in storm.seen:  # every answer came from an acknowledged upload of its task
        if s.status == 200 and s.kind in ("score", "predict"):
            assert _from_an_upload(s, storm.acks[s.task], expected[s.task]), s
        elif s.status == 200 and s.kind == "get":
            assert s.body in [a.info for a in storm.acks[s.task] if a.op == "put"], s
        elif s.kind == "list":
            for entry in s.body:
                assert entry in [a.info for a in storm.acks[entry["task"]] if a.op == "put"], entry

    final = {t: storm.acks[t][-1] for t in TASKS}
    present = sorted(t for t in TASKS if final[t].op == "put")
    assert present == list(TASKS[1:])
    assert httpx.get(f"{server.url}/healthz", timeout=TIMEOUT).status_code == 200
    ready = httpx.get(f"{server.url}/readyz", timeout=TIMEOUT)
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "adapters": len(present)}
    assert httpx.get(f"{server.url}/v1/adapters", timeout=TIMEOUT).json() == [final[t].info for t in present]
    for t in TASKS:
        _check_final(server, t, final[t], files[t], expected[t])
    assert sorted(p.name for p in server.store.iterdir()) == ["EPOCH", *present]
    code, report = store_check(server.store)
    assert code == 0 and report["ok"] == present and report["problems"] == [] and report["orphans"] == []
    assert metric(server.url, "kronserve_adapters_active") == len(present)
    assert metric(server.url, "kronserve_adapters_resident") == len(present)


def _from_an_upload(s: Seen, acks: list[Ack], expected: list[Answer]) -> bool:
    """Whether some acknowledged upload of the task has the answer's version and gives its values."""
    assert isinstance(s.body, dict)
    for a in acks:
        if a.op != "put" or a.info is None or a.info["version"] != s.body["version"]:
            continue
        want = expected[a.seed]
        if want.same_scores(s.body["scores"]) if s.kind == "score" else s.body["outputs"] == want.outputs:
            return True
    return False


def _check_final(server: Server, task: str, last: Ack, files: list[bytes], expected: list[Answer]) -> None:
    """The task as its last acknowledged operation left it: over HTTP and on disk."""
    d = server.store / task
    if last.op == "delete":
        r = httpx.post(f"{server.url}/v1/score", json=score_body(task), timeout=TIMEOUT)
        assert r.status_code == 404 and error_code(r) == "unknown_task"
        assert httpx.get(f"{server.url}/v1/adapters/{task}", timeout=TIMEOUT).status_code == 404
        assert not d.exists()
        return
    info = last.info
    assert info is not None and last.seed is not None
    assert info["sha256"] == hashlib.sha256(files[last.seed]).hexdigest()
    assert httpx.get(f"{server.url}/v1/adapters/{task}", timeout=TIMEOUT).json() == info
    version, answer = ask(server.url, task)
    assert version == info["version"] and answer.matches(expected[last.seed])
    version_file = f"v{info['version']:06d}-{info['sha256'][:16]}.safetensors"
    assert sorted(p.name for p in d.iterdir()) == ["ACTIVE", version_file]
    assert hashlib.sha256((d / version_file).read_bytes()).hexdigest() == info["sha256"]
    pointer = json.loads((d / "ACTIVE").read_text())
    assert pointer == {"version": info["version"], "sha256": info["sha256"], "file": version_file}
