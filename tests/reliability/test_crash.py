"""Crash safety: the engine process (which writes the store) is SIGKILLed at chosen moments of an upload; the upload
answers 503 `engine_restarting`, the server restarts its engine in place, and there, as in a fresh server, every task
is at its old or its new version (never torn), nothing half-written is served, and `kronserve store check --repair`
cleans up."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from kronserve.backbone import load_backbone
from kronserve.engine import Engine
from kronserve.formats.native import dumps, loads
from kronserve.store import LocalStore

from ..conftest import make_adapter
from ..e2e.conftest import Server, children, upload
from .conftest import TIMEOUT, error_code

# fault point -> version the task must be at after the restart
OUTCOME = {"version_temp_written": 1, "version_renamed": 1, "pointer_temp_written": 1, "pointer_renamed": 2}


def store_check(store: Path, *flags: str) -> tuple[int, dict]:
    cmd = [sys.executable, "-c", "from kronserve.cli import main; main()", "store", "check", str(store), *flags]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return run.returncode, json.loads(run.stdout)


@pytest.fixture(scope="module")
def versions(tiny_dir: Path) -> tuple[bytes, bytes, list[float]]:
    """Two versions of one task and each one's score, from an in-process engine (the independent answer)."""
    bb = load_backbone(str(tiny_dir), device="cpu")
    v1, v2 = (dumps(make_adapter(bb, "victim", "compacter", seed=s, std=0.3)) for s in (1, 2))
    engine = Engine(bb)
    scores = []
    for data in (v1, v2):
        engine.load(loads(data, bb.fingerprint))
        scores.append(engine.score(["victim"], ["crash input"], ["crash target"]).scores[0])
    return v1, v2, scores


def children_of_server(server: Server) -> list[int]:
    assert server.proc is not None
    return [g for child in children(server.proc.pid) for g in children(child)]


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + 60
    while httpx.get(f"{server.url}/readyz", timeout=TIMEOUT).status_code != 200:
        assert time.monotonic() < deadline, "the engine never came back"
        time.sleep(0.05)


def assert_at_outcome(server: Server, point: str, scores: list[float]) -> None:
    info = httpx.get(f"{server.url}/v1/adapters/victim").json()
    assert info["version"] == OUTCOME[point]
    body = {"task": "victim", "inputs": ["crash input"], "targets": ["crash target"]}
    score = httpx.post(f"{server.url}/v1/score", json=body, timeout=30).json()
    assert score["version"] == OUTCOME[point]
    assert score["scores"][0] == pytest.approx(scores[OUTCOME[point] - 1], abs=1e-4)


@pytest.mark.parametrize("point", list(OUTCOME))
def test_sigkill_during_upload_leaves_old_or_new_version(tiny_dir: Path, tmp_path: Path, versions, point: str) -> None:
    v1, v2, scores = versions
    store = tmp_path / "store"
    seed = LocalStore(store)
    seed.activate(seed.write("victim", v1))
    crashing = Server(tiny_dir, store, KRONSERVE_FAULT_POINT=point).start()
    engine = crashing.engine_pid
    try:
        answer = upload(crashing.url, "victim", v2)
        assert answer.status_code == 503 and error_code(answer) == "engine_restarting", answer.text
        assert int(answer.headers["retry-after"]) >= 1
        assert engine not in children_of_server(crashing)

        report = LocalStore(store).check()  # what `kronserve store check` prints (its exit code is tested below)
        assert not report.clean and report.ok == ["victim"] and report.problems == [] and report.orphans
        wait_ready(crashing)
        assert_at_outcome(crashing, point, scores)  # the same server, its engine restarted
    finally:
        assert crashing.stop() == 0

    restarted = Server(tiny_dir, store).start()
    try:
        assert_at_outcome(restarted, point, scores)
    finally:
        restarted.stop()

    code, repaired = store_check(store, "--repair")
    assert code == 0 and repaired["removed"] == report.orphans
    after = LocalStore(store).check()
    assert after.clean and after.ok == ["victim"] and after.orphans == []
