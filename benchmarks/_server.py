"""The server subprocess every HTTP benchmark drives: `kronserve serve` or `kronserve cluster` on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(
        self, backbone: Path, store: Path, log: Path, env: dict[str, str], command: tuple[str, ...] = ("serve",)
    ) -> None:
        """Inherited KRONSERVE_* settings (an admin token, a queue size...) would change what is measured: dropped."""
        self.backbone, self.store, self.log, self.env, self.command = backbone, store, log, env, command
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 300) -> None:
        exe = shutil.which("kronserve")
        cmd = [exe] if exe else [sys.executable, "-c", "from kronserve.cli import main; main()"]
        cmd += [*self.command, "--backbone", str(self.backbone), "--store", str(self.store)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("KRONSERVE_")}
        env |= {"RAY_USAGE_STATS_ENABLED": "0"} | self.env
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout_s:g} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM (the server drains accepted work), then wait; SIGKILL only if it hangs."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def engine_pid(self) -> int:
        """The engine process: the server's grandchild (forked from its forkserver)."""
        (engine,) = (g for child in _children(self.pid) for g in _children(child))
        return engine

    def rss_mb(self) -> float:
        """VmRSS of the server process in MB (MiB)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


async def scrape(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    """/metrics as {series (with labels): value}."""
    r = await client.get(f"{url}/metrics")
    r.raise_for_status()
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _children(parent: int) -> list[int]:
    """Live child processes of `parent`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found
