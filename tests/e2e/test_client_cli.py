"""`kronserve-client`, the installed console script, against a real server: health, upload-dir, get, predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..test_cli import console
from .conftest import Server


@pytest.mark.parametrize("server", ["single"], indirect=True)
def test_upload_dir_get_health_and_min_new_tokens(server: Server, adapter_bytes, tmp_path: Path) -> None:
    def client(*args: str):
        return console("kronserve-client", "--url", server.url, *args)

    health = client("health")
    assert health.returncode == 0 and json.loads(health.stdout) == {"live": True, "ready": True}
    folder = tmp_path / "adapters"
    folder.mkdir()
    for i, task in enumerate(["dir-a", "dir-b", "dir-c"]):
        (folder / f"{task}.safetensors").write_bytes(adapter_bytes(task, "pfeiffer", seed=i))
    (folder / "notes.txt").write_text("not an adapter: skipped by the pattern")
    uploaded = client("upload-dir", str(folder))
    assert uploaded.returncode == 0, uploaded.stderr
    results = json.loads(uploaded.stdout)
    assert [r["task"] for r in results] == ["dir-a", "dir-b", "dir-c"] and all(r["version"] >= 1 for r in results)
    got = json.loads(client("get", "dir-b").stdout)
    assert got["task"] == "dir-b" and got["method"] == "pfeiffer" and got["spec"]["method"] == "pfeiffer"
    out = client("predict", "dir-a", "some input", "--max-new-tokens", "6", "--min-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["version"] == results[0]["version"]
    (folder / "Bad Name.safetensors").write_bytes(b"x")  # an invalid task id: that file fails, the others land
    partial = client("upload-dir", str(folder))
    assert partial.returncode == 1
    assert "error" in next(r for r in json.loads(partial.stdout) if r["task"] == "Bad Name")
    missing = client("get", "no-such-task")
    assert missing.returncode == 1 and missing.stderr.strip().startswith("error: 404 unknown_task")
    down = console("kronserve-client", "--url", "http://127.0.0.1:9", "health")
    assert down.returncode == 1 and down.stderr.strip().startswith("error: cannot reach http://127.0.0.1:9")
