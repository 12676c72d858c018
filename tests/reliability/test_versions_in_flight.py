"""Requests caught by a delete or a re-upload: the store removes the old version's file at once, yet a request that
leased that version is answered by it (or 404 once the task is gone), never 503 `store_error`, and the task never
shows as unavailable. The host tier is too small to hold any adapter, so every request reads its version's weights
after leasing it: the race is hit on every call, not by luck."""

from __future__ import annotations

import itertools
import threading

import httpx

from ..e2e.conftest import Server, upload
from .conftest import TIMEOUT, Payload, Reference, error_code, metric, metric_samples, score_body

TASKS = ("churn-a", "churn-b")
SEEDS = (41, 42)
CLIENTS = 4
SCORES_PER_CLIENT = 40


class Race:
    """Score clients on TASKS while one writer re-uploads and deletes them; what each side saw."""

    def __init__(self, url: str, files: dict[tuple[str, int], bytes]) -> None:
        self.url, self.files = url, files
        self.answers: list[tuple[str, int, dict]] = []  # (task, status, body) of every score
        self.problems: list[str] = []  # the writer's (an assert in a thread would not fail the test)
        self.done = threading.Event()

    def run(self) -> None:
        writer = threading.Thread(target=self.churn)
        clients = [threading.Thread(target=self.client, args=(k,)) for k in range(CLIENTS)]
        for t in (writer, *clients):
            t.start()
        for c in clients:
            c.join(timeout=10 * TIMEOUT)
        self.done.set()
        writer.join(timeout=TIMEOUT)

    def client(self, offset: int) -> None:
        with httpx.Client(timeout=TIMEOUT) as http:
            for i in range(SCORES_PER_CLIENT):
                task = TASKS[(i + offset) % len(TASKS)]
                r = http.post(f"{self.url}/v1/score", json=score_body(task))
                self.answers.append((task, r.status_code, r.json()))

    def churn(self) -> None:
        with httpx.Client(timeout=TIMEOUT) as http:
            for i in itertools.takewhile(lambda _: not self.done.is_set(), itertools.count()):
                task, seed = TASKS[i % len(TASKS)], SEEDS[(i // len(TASKS)) % len(SEEDS)]
                if i % 3 == 2:
                    r, ok = http.delete(f"{self.url}/v1/adapters/{task}"), (204, 404)
                else:
                    r, ok = (
                        http.put(f"{self.url}/v1/adapters/{task}", files={"file": ("a", self.files[task, seed])}),
                        (201,),
                    )
                if r.status_code not in ok:
                    self.problems.append(f"{r.request.method} {task}: {r.status_code} {r.text}")
                if metric(self.url, "kronserve_adapters_unavailable"):
                    self.problems.append(f"unavailable: {http.get(f'{self.url}/readyz').text}")


def test_requests_racing_deletes_and_reuploads_answer_on_their_version(
    tiny_dir, tmp_path, payload: Payload, reference: Reference
) -> None:
    files = {(t, s): payload(t, seed=s) for t in TASKS for s in SEEDS}
    expected = {t: [reference.answer(files[t, s]) for s in SEEDS] for t in TASKS}
    server = Server(tiny_dir, tmp_path / "store", KRONSERVE_HOST_ADAPTER_MB="0.001").start()
    try:
        for t in TASKS:
            assert upload(server.url, t, files[t, SEEDS[0]]).status_code == 201
        race = Race(server.url, files)
        race.run()

        assert race.problems == []
        assert len(race.answers) == CLIENTS * SCORES_PER_CLIENT
        refused = [a for a in race.answers if a[1] != 200 and (a[1], _code(a[2])) != (404, "unknown_task")]
        assert refused == [], refused[:5]
        for task, status, body in race.answers:
            if status == 200:  # answered by one of the versions the task had, whole
                assert any(a.same_scores(body["scores"]) for a in expected[task]), body
        assert sum(a[1] == 200 for a in race.answers) > len(race.answers) // 2  # the race ran, not just 404s
        failures = {k: v for k, v in metric_samples(server.url).items() if "load_failures" in k[0] and v}
        assert failures == {}  # no version read from the store failed: none was missing when read
        r = httpx.post(f"{server.url}/v1/score", json=score_body("no-such-task"), timeout=TIMEOUT)
        assert r.status_code == 404 and error_code(r) == "unknown_task"
    finally:
        server.stop()


def _code(body: dict) -> str | None:
    return body.get("error", {}).get("code") if isinstance(body, dict) else None
