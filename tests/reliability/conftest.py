"""Shared by the reliability tests: adapter files, a reference server that says what each file must answer, and
small readers of the store, the error shape, the metrics and the server's memory."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kronserve.backbone import load_backbone
from kronserve.formats.native import dumps

from ..conftest import make_adapter
from ..e2e.conftest import Server, upload

TIMEOUT = 60  # seconds for one HTTP call: generous, a loaded 2-core box is 2-3x slower than an idle one
# The probe every reliability test asks: scores tell adapter versions apart (floats), predict checks generation.
PROBE_INPUTS = ["reliability probe: hello world", "a second, longer input for the probe"]
PROBE_TARGETS = ["the first target", "second"]
PREDICT_TOKENS = 8
SCORE_TOL = 1e-4

Payload = Callable[..., bytes]


@dataclass(frozen=True)
class Answer:
    """What one adapter file answers to the probe."""

    scores: list[float]
    outputs: list[str]

    def same_scores(self, scores: list[float]) -> bool:
        return len(scores) == len(self.scores) and all(
            abs(a - b) <= SCORE_TOL for a, b in zip(scores, self.scores, strict=True)
        )

    def matches(self, other: Answer) -> bool:
        """Same scores (within SCORE_TOL: another process, maybe another batch shape) and the same outputs."""
        return self.same_scores(other.scores) and self.outputs == other.outputs

    def distance(self, other: Answer) -> float:
        return max(abs(a - b) for a, b in zip(self.scores, other.scores, strict=True))


def score_body(task: str) -> dict:
    return {"task": task, "inputs": PROBE_INPUTS, "targets": PROBE_TARGETS}


def predict_body(task: str) -> dict:
    return {"task": task, "inputs": PROBE_INPUTS, "max_new_tokens": PREDICT_TOKENS}


def ask(url: str, task: str) -> tuple[int, Answer]:
    """The probe's answer from `task` (score and predict) and the version that gave both."""
    s = httpx.post(f"{url}/v1/score", json=score_body(task), timeout=TIMEOUT)
    p = httpx.post(f"{url}/v1/predict", json=predict_body(task), timeout=TIMEOUT)
    assert s.status_code == 200 and p.status_code == 200, (s.text, p.text)
    assert s.json()["version"] == p.json()["version"]
    return s.json()["version"], Answer(s.json()["scores"], p.json()["outputs"])


class Reference:
    """Expected answers of adapter files, computed by a separate `kronserve serve` on its own store: each file is
    uploaded there once, under a task of its own, and asked the probe alone."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._tasks: dict[str, str] = {}  # sha256 of a file -> its task on the reference server
        self._answers: dict[str, Answer] = {}

    def task_of(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if sha not in self._tasks:
            task = f"ref-{len(self._tasks)}"
            r = upload(self.server.url, task, data)
            assert r.status_code == 201, r.text
            self._tasks[sha] = task
        return self._tasks[sha]

    def answer(self, data: bytes) -> Answer:
        task = self.task_of(data)
        if task not in self._answers:
            self._answers[task] = ask(self.server.url, task)[1]
        return self._answers[task]

    def post(self, data: bytes, path: str, body: dict) -> dict:
        """Any predict/score body (its task replaced), answered by `data` alone on the reference server."""
        r = httpx.post(f"{self.server.url}/v1/{path}", json={**body, "task": self.task_of(data)}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="package")
def reference(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    s = Server(tiny_dir, tmp_path_factory.mktemp("reference") / "store").start()
    yield Reference(s)
    s.stop()


def _payload_for(backbone_dir: Path) -> Payload:
    bb = load_backbone(str(backbone_dir), device="cpu")

    def make(task: str, method: str = "compacter", seed: int = 0, std: float = 0.3, **overrides) -> bytes:
        return dumps(make_adapter(bb, task, method, seed=seed, std=std, **overrides))

    return make


@pytest.fixture(scope="package")
def payload(tiny_dir: Path) -> Payload:
    """Native adapter files for the tiny backbone; std 0.3 makes each seed answer clearly differently."""
    return _payload_for(tiny_dir)


@pytest.fixture
def server(tiny_dir: Path, tmp_path: Path) -> Iterator[Server]:
    """A fresh server on an empty store, for a test whose counts or state must start from nothing."""
    s = Server(tiny_dir, tmp_path / "store").start()
    yield s
    s.stop()


def error_code(r: httpx.Response) -> str:
    """The code of a refusal in the documented shape `{"error": {"code": str, "message": str}}`."""
    body = r.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"} and body["error"]["message"], body
    return body["error"]["code"]


def tree(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """Everything under `root` without following links: path -> file hash, "dir", or "link -> target"."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = f"link -> {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            elif p in skip:
                out[rel] = "file"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def metric_samples(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of `/metrics`: (sample name, labels) -> value."""
    text = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(url: str, name: str, **labels: str) -> float:
    return metric_samples(url).get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="package")
def other_payload(other_tiny_dir: Path) -> Payload:
    """Native adapter files made for another backbone of the same shape (a server on tiny_dir must refuse them)."""
    return _payload_for(other_tiny_dir)


def store_check(store: Path) -> tuple[int, dict]:
    """`kronserve store check STORE`, run as a user would: its exit status and its JSON report."""
    cmd = [sys.executable, "-c", "from kronserve.cli import main; main()", "store", "check", str(store)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return run.returncode, json.loads(run.stdout)
