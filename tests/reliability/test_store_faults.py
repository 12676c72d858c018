"""The store fails for real at each step of an upload or a delete: the answer says which state the store is in.

Faults are the operating system's own, so they hold for root (the tests and CI run as root, which ignores
permission bits): `chattr +i` makes the store's root, a task's directory, its ACTIVE pointer or the EPOCH file
immutable (every write, rename or removal there fails with EPERM), and a file-size limit set on the running
server (RLIMIT_FSIZE, the errors of a full disk) makes writing the version's temp file fail. For each case the
answer is 503 `store_error` (old state) or success (new state); the running server and, after a restart, a fresh
one serve exactly that state, and `kronserve store check` finds the store clean.
"""

from __future__ import annotations

import hashlib
import resource
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx
import pytest

from kronserve.store import LocalStore

from ..e2e.conftest import Server, upload
from .conftest import TIMEOUT, Payload, error_code, metric, store_check

VERSION_FILE_MIN = 4096  # the fault's file-size limit is below any adapter file and above a pointer or EPOCH
FSIZE_LIMIT = 1024

# (operation, step) -> the state the store must be in afterwards. A new task's directory and pointer do not exist
# before its upload makes them, so for it "task directory" and "pointer" are the root case; a delete writes no temp
# file beyond EPOCH's (small enough to be written), so its "temp file" case succeeds.
CASES: dict[tuple[str, str], str] = {
    ("new task", "root"): "old",
    ("new task", "temp file"): "old",
    ("new task", "epoch"): "new",
    ("new version", "root"): "new",  # the version and the pointer live in the task's directory; EPOCH is a hint
    ("new version", "task directory"): "old",
    ("new version", "temp file"): "old",
    ("new version", "pointer"): "old",
    ("new version", "epoch"): "new",
    ("delete", "root"): "old",
    ("delete", "task directory"): "old",
    ("delete", "temp file"): "new",
    ("delete", "pointer"): "old",
    ("delete", "epoch"): "new",
}


@contextmanager
def immutable(path: Path) -> Iterator[None]:
    subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True, capture_output=True)


@contextmanager
def file_size_limit(pid: int, limit: int) -> Iterator[None]:
    """Lower the process's soft RLIMIT_FSIZE (no privilege needed) and restore it (up to the untouched hard one)."""
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))


def fault(step: str, store: Path, task: str, pid: int) -> AbstractContextManager[None]:
    faults: dict[str, Callable[[], AbstractContextManager[None]]] = {
        "root": lambda: immutable(store),
        "task directory": lambda: immutable(store / task),
        "temp file": lambda: file_size_limit(pid, FSIZE_LIMIT),
        "pointer": lambda: immutable(store / task / "ACTIVE"),
        "epoch": lambda: immutable(store / "EPOCH"),
    }
    return faults[step]()


@pytest.fixture(scope="module")
def can_fault(tmp_path_factory: pytest.TempPathFactory) -> None:
    probe = tmp_path_factory.mktemp("chattr") / "probe"
    probe.write_bytes(b"x")
    try:
        with immutable(probe):
            pass
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"chattr +i does not work here ({e}): needs root on ext4/xfs/btrfs")


def served(url: str, task: str) -> tuple[int, str] | None:
    """(version, sha256) the server answers for `task` (GET and a score agree), or None for 404."""
    r = httpx.get(f"{url}/v1/adapters/{task}", timeout=TIMEOUT)
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    body = {"task": task, "inputs": ["fault probe"], "targets": ["x"]}
    score = httpx.post(f"{url}/v1/score", json=body, timeout=TIMEOUT)
    assert score.status_code == 200 and score.json()["version"] == r.json()["version"], score.text
    return r.json()["version"], r.json()["sha256"]


def test_a_store_failing_at_any_step_leaves_the_old_or_the_new_state(
    can_fault: None, tiny_dir: Path, tmp_path: Path, payload: Payload
) -> None:
    store = tmp_path / "store"
    s = Server(tiny_dir, store).start()
    outcomes = []
    try:
        bystander = payload("bystander", seed=3)  # must come through every fault untouched; makes EPOCH exist
        assert upload(s.url, "bystander", bystander).status_code == 201
        expected: dict[str, tuple[int, str] | None] = {"bystander": (1, hashlib.sha256(bystander).hexdigest())}
        for (operation, step), state in CASES.items():
            task = f"{operation}-{step}".replace(" ", "-")
            v1, v2 = payload(task, seed=1), payload(task, seed=2)
            assert len(v2) > VERSION_FILE_MIN
            old: tuple[int, str] | None = None
            if operation != "new task":
                assert upload(s.url, task, v1).status_code == 201
                old = (1, hashlib.sha256(v1).hexdigest())
            new = {"new task": (1, hashlib.sha256(v2).hexdigest()), "new version": (2, hashlib.sha256(v2).hexdigest())}
            assert s.proc is not None
            with fault(step, store, task, s.engine_pid):
                if operation == "delete":
                    r = httpx.delete(f"{s.url}/v1/adapters/{task}", timeout=TIMEOUT)
                else:
                    r = upload(s.url, task, v2)
            outcomes.append((operation, step, r.status_code))
            if state == "old":
                assert r.status_code == 503 and error_code(r) == "store_error", (operation, step, r.text)
                assert r.headers["retry-after"] == "5"
            else:
                assert r.status_code == (204 if operation == "delete" else 201), (operation, step, r.text)
            expected[task] = old if state == "old" else new.get(operation)
            assert served(s.url, task) == expected[task], (operation, step)  # the running server agrees
        refused_puts = sum(1 for (op, _), st in CASES.items() if op != "delete" and st == "old")
        assert metric(s.url, "kronserve_adapter_load_failures_total", source="upload", code="store_error") == (
            refused_puts
        )
    finally:
        s.stop()
    log = s.log.read_text()
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]

    restarted = Server(tiny_dir, store).start()
    try:
        assert {task: served(restarted.url, task) for task in expected} == expected, outcomes
    finally:
        restarted.stop()
    code, report = store_check(store)
    assert code == 0 and report["problems"] == [] and report["orphans"] == [], report
    assert sorted(report["ok"]) == sorted(t for t, v in expected.items() if v is not None)


def test_a_stored_file_that_cannot_be_read_makes_its_task_503_and_shows_in_readyz(
    tiny_dir: Path, tmp_path: Path, payload: Payload
) -> None:
    store = tmp_path / "store"
    seed = LocalStore(store)
    for task in ("good", "broken"):
        seed.activate(seed.write(task, payload(task, seed=1)))
    damaged = next((store / "broken").glob("v*.safetensors"))
    damaged.write_bytes(damaged.read_bytes()[:100])  # cut short, as by a failing disk: its sha256 no longer matches

    s = Server(tiny_dir, store).start()
    try:
        ready = httpx.get(f"{s.url}/readyz", timeout=TIMEOUT)
        assert ready.status_code == 200 and ready.json()["adapters"] == 1, ready.text
        unavailable = ready.json()["unavailable"]
        assert list(unavailable) == ["broken"] and "store_error" in unavailable["broken"]
        assert metric(s.url, "kronserve_adapters_unavailable") == 1
        assert metric(s.url, "kronserve_adapter_load_failures_total", source="store", code="store_error") == 1
        asks = [
            ("GET", "/v1/adapters/broken", None),
            ("POST", "/v1/predict", {"task": "broken", "inputs": ["x"]}),
            ("POST", "/v1/score", {"task": "broken", "inputs": ["x"], "targets": ["y"]}),
        ]
        for method, path, body in asks:
            r = httpx.request(method, f"{s.url}{path}", json=body, timeout=TIMEOUT)
            assert r.status_code == 503 and error_code(r) == "store_error", (path, r.text)
            assert r.headers["retry-after"] == "5" and "cannot be loaded" in r.json()["error"]["message"]
        assert served(s.url, "good") is not None

        assert httpx.delete(f"{s.url}/v1/adapters/broken", timeout=TIMEOUT).status_code == 204  # still deletable
        assert served(s.url, "broken") is None
        assert httpx.get(f"{s.url}/readyz", timeout=TIMEOUT).json() == {"status": "ready", "adapters": 1}
        assert metric(s.url, "kronserve_adapters_unavailable") == 0
    finally:
        s.stop()
    code, report = store_check(store)
    assert code == 0 and report["ok"] == ["good"] and report["orphans"] == [], report
