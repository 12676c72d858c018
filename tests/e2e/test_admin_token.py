"""Compose passes `KRONSERVE_ADMIN_TOKEN=` when the variable is unset: that must be a server one can upload to."""

from __future__ import annotations

from pathlib import Path

from .conftest import Server, upload


def test_an_empty_admin_token_is_no_token_and_says_so(tiny_dir: Path, tmp_path: Path, adapter_bytes) -> None:
    server = Server(tiny_dir, tmp_path / "store", KRONSERVE_ADMIN_TOKEN="").start()
    try:
        r = upload(server.url, "open-task", adapter_bytes("open-task", "pfeiffer"))
        assert r.status_code == 201, r.text
    finally:
        assert server.stop() == 0
    log = server.log.read_text()
    assert "WARNING" in log and "no admin token" in log
