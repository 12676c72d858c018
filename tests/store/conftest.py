"""A real S3-compatible server (moto's server mode) on 127.0.0.1, and one fresh bucket per test."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

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
    """Start the server once per session with dummy credentials in the environment; stop it at the end."""
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


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(s3_client: Any) -> str:
    name = f"kron-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name
