"""Saved AdapterHub and PEFT directories uploaded as they are (one `file` part per file) to a real server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import Server

GOLDEN = Path(__file__).parent.parent / "fixtures" / "golden"
EXPECTED = json.loads((GOLDEN / "expected.json").read_text())["fixtures"]


def dir_parts(name: str) -> list[tuple[str, tuple[str, bytes]]]:
    return [("file", (p.name, p.read_bytes())) for p in sorted((GOLDEN / name).iterdir()) if p.is_file()]


@pytest.fixture(scope="module")
def golden_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(GOLDEN / "backbone", tmp_path_factory.mktemp("golden-store")).start()
    yield s
    s.stop()


@pytest.mark.parametrize(
    "name",
    ["compacter", "compacter_variant", "seq_bn", "par_bn", "lora_variant", "prefix_leave_out", "mam", "peft_prefix"],
)
def test_uploaded_directory_scores_like_the_library(golden_server: Server, name: str) -> None:
    task = name.replace("_", "-")
    r = httpx.put(f"{golden_server.url}/v1/adapters/{task}", files=dir_parts(name), timeout=30)
    assert r.status_code == 201, r.text
    cases = EXPECTED[name]["cases"]
    body = {"task": task, "inputs": [c["input"] for c in cases], "targets": [c["target"] for c in cases]}
    scores = httpx.post(f"{golden_server.url}/v1/score", json=body, timeout=30).json()["scores"]
    assert scores == pytest.approx([c["loglik"] for c in cases], abs=1e-3)
    stored = list((golden_server.store / task).glob("v*.safetensors"))
    assert len(stored) == 1 and stored[0].read_bytes()[8:9] == b"{"  # kept as a native file
    described = httpx.get(f"{golden_server.url}/v1/adapters/{task}", timeout=30).json()
    assert described["base_model"] == "backbone"  # what the library's save declared


def test_missing_rule_and_unsupported_option_are_refused(golden_server: Server) -> None:
    r = httpx.put(f"{golden_server.url}/v1/adapters/broken", files=dir_parts("compacter_missing_rule"), timeout=30)
    assert r.status_code == 422 and "phm rule is missing" in r.json()["error"]["message"]
    for name in ("seq_bn", "prefix"):  # a gated bottleneck; UniPELT's gated prefix
        parts = dir_parts(name)
        cfg = json.loads((GOLDEN / name / "adapter_config.json").read_text())
        cfg["config"]["use_gating"] = True
        parts = [p for p in parts if p[1][0] != "adapter_config.json"] + [
            ("file", ("adapter_config.json", json.dumps(cfg).encode()))
        ]
        r = httpx.put(f"{golden_server.url}/v1/adapters/gated", files=parts, timeout=30)
        assert r.status_code == 422 and "use_gating" in r.json()["error"]["message"]
    assert httpx.get(f"{golden_server.url}/v1/adapters/broken").status_code == 404
    assert not (golden_server.store / "broken").exists() and not (golden_server.store / "gated").exists()


def test_pickle_refused_when_the_operator_says_so(tmp_path: Path) -> None:
    s = Server(GOLDEN / "backbone", tmp_path / "store", KRONSERVE_ACCEPT_PICKLE="false").start()
    try:
        r = httpx.put(f"{s.url}/v1/adapters/c", files=dir_parts("compacter"), timeout=30)
        assert r.status_code == 415 and "kronserve import" in r.json()["error"]["message"]
        assert httpx.put(f"{s.url}/v1/adapters/c", files=dir_parts("lora"), timeout=30).status_code == 201
    finally:
        s.stop()
