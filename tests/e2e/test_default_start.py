"""The README's first command: no backbone named, no hub reachable -> demo backbone + demo adapter answer."""

from __future__ import annotations

from pathlib import Path

import httpx

from .conftest import Server


def test_serve_without_a_backbone_answers_the_readme_curl(tmp_path: Path) -> None:
    store = tmp_path / "adapters_store"
    server = Server(None, store, HF_HUB_OFFLINE="1", KRONSERVE_CACHE_DIR=str(tmp_path / "cache")).start()
    try:
        body = {"task": "demo", "inputs": ["translate English to German: Hello, world"]}
        r = httpx.post(f"{server.url}/v1/predict", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["task"] == "demo" and r.json()["version"] == 1 and len(r.json()["outputs"]) == 1
        assert (store / "demo" / "ACTIVE").is_file()
        assert (tmp_path / "cache" / "demo-backbone-t5-small-seed0" / "config.json").is_file()
        info = httpx.get(f"{server.url}/v1/adapters/demo").json()
        assert info["method"] == "compacter++"
    finally:
        assert server.stop() == 0
    again = Server(None, store, HF_HUB_OFFLINE="1", KRONSERVE_CACHE_DIR=str(tmp_path / "cache")).start()
    try:  # the demo adapter is loaded from the store, not added twice
        assert httpx.get(f"{again.url}/v1/adapters/demo").json()["version"] == 1
    finally:
        again.stop()
