"""A real server on 127.0.0.1, a real store, real HTTP: `kronserve serve` (a store directory), or `kronserve cluster`
(a local Ray head, two replicas; the shared one keeps adapters in S3) for the tests that must hold for both."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from kronserve.backbone import load_backbone
from kronserve.formats.native import dumps

from ..conftest import make_adapter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Live child processes of `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


MODES = ["single", "cluster"]
# Tests whose answer depends on the tokenizer also run on a SentencePiece T5 backbone (tests/sentencepiece.py): once
# in one process (SINGLE), ByT5 and SentencePiece (TOKENIZERS), or every mode and SentencePiece (EVERYWHERE).
SINGLE = pytest.mark.parametrize("server", ["single"], indirect=True)
TOKENIZERS = pytest.mark.parametrize("server", ["single", "sentencepiece"], indirect=True)
EVERYWHERE = pytest.mark.parametrize("server", [*MODES, "sentencepiece"], indirect=True)


class Server:
    def __init__(
        self, backbone: Path | None, store: Path, mode: str = "single", store_url: str | None = None, **env: str
    ) -> None:
        """`store_url` (e.g. s3://bucket/prefix) replaces the directory as the store; logs still go beside it."""
        self.backbone, self.store, self.mode, self.store_url, self.env = backbone, store, mode, store_url, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = store.parent / f"server-{self.port}.log"

    def start(self) -> Server:
        env = {**os.environ, "KRONSERVE_BATCH_WAIT_MS": "20", "RAY_USAGE_STATS_ENABLED": "0", **self.env}
        command = {"single": ["serve"], "cluster": ["cluster", "--replicas", "2"]}[self.mode]
        cmd = [sys.executable, "-c", "from kronserve.cli import main; main()", *command]
        cmd += ["--store", self.store_url or str(self.store), "--port", str(self.port)]
        cmd += ["--backbone", str(self.backbone)] if self.backbone else []
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT, cwd=self.store.parent
        )
        deadline = time.monotonic() + (60 if self.mode == "single" else 180)
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(self.log.read_text())

    @property
    def engine_pid(self) -> int:
        """The engine process (`kronserve serve` forks it from its forkserver: the server's grandchild)."""
        assert self.proc is not None
        (pid,) = (g for child in children(self.proc.pid) for g in children(child))
        return pid

    def rss_bytes(self) -> int:
        """Resident memory of the server and its engine process together (Linux)."""
        total = 0
        for pid in (self.proc.pid if self.proc else 0, self.engine_pid):
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]
        return total

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30 if self.mode == "single" else 90)


@pytest.fixture(scope="session", params=MODES)
def server(request: pytest.FixtureRequest) -> Server:
    """The same tests, one process or a cluster: the API contract is one. Tests use their own task ids, so one
    server per mode serves the whole session (tests/conftest.py's `single_server` and `cluster_server`)."""
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture(scope="module")
def adapter_bytes(tiny_dir: Path):
    bb = load_backbone(str(tiny_dir), device="cpu")

    def make(task: str, method: str = "compacter", seed: int = 0, **overrides) -> bytes:
        return dumps(make_adapter(bb, task, method, seed=seed, std=0.3, **overrides))

    return make


def upload(url: str, task: str, data: bytes, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.put(f"{url}/v1/adapters/{task}", files={"file": ("a.safetensors", data)}, headers=headers, timeout=30)


CHATTY = "chatty"  # a LoRA strong enough that the tiny backbone writes varied, multi-byte text


@pytest.fixture(scope="module")
def chatty(server: Server) -> Server:
    """`server` serving CHATTY (the OpenAI tests' model)."""
    data = dumps(make_adapter(load_backbone(str(server.backbone), device="cpu"), CHATTY, "lora", seed=6, std=2.0))
    assert upload(server.url, CHATTY, data).status_code == 201
    return server


def prompt_tokens(server: Server, texts: list[str]) -> int:
    """What the server's tokenizer makes of `texts` (EOS included): the prompt tokens its usage counts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(server.backbone))
    return sum(len(ids) for ids in tokenizer(texts)["input_ids"])


@pytest.fixture
def client(chatty: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{chatty.url}/v1", api_key="unused", max_retries=0)
