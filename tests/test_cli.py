"""The `kronserve` console script, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from kronserve.backbone import load_backbone
from kronserve.formats.native import load
from kronserve.methods import Geometry, preset


def kronserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from kronserve.cli import main; main()", *args], capture_output=True, text=True
    )


def test_backbone_adapter_init_and_inspect(tmp_path: Path) -> None:
    bb = tmp_path / "bb"
    assert kronserve("backbone", "tiny", str(bb), "--seed", "3").returncode == 0
    out = tmp_path / "a.safetensors"
    r = kronserve(
        "adapter", "init", "--method", "compacter", "--backbone", str(bb), "--task", "qa",
        "--reduction-factor", "16", "--rank", "2", "--std", "0.1", "--layer-norms", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    info = json.loads(kronserve("adapter", "inspect", str(out)).stdout)
    expect = preset("compacter", reduction_factor=16, rank=2, layer_norms=True).param_count(Geometry(128, 2, 2))
    assert info["params"] == expect and info["task"] == "qa" and info["spec"]["rank"] == 2
    backbone = load_backbone(str(bb), device="cpu")
    a = load(out, backbone.fingerprint)
    assert abs(a.tensors["encoder.0.mh.down.b"].std().item() - 0.1) < 0.06  # --std draws biases too
    assert torch.allclose(a.tensors["layer_norm.encoder.final"].mean(), torch.tensor(1.0), atol=0.1)


def test_bad_option_is_a_clean_error(tmp_path: Path, tiny_dir: Path) -> None:
    r = kronserve("adapter", "init", "--backbone", str(tiny_dir), "--task", "t", "--phm-dim", "3", str(tmp_path / "x"))
    assert r.returncode == 2
    assert "error: phm_dim 3 does not divide d_model 128" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_store_check_exits_1_on_orphans_and_repair_cleans(tmp_path: Path) -> None:
    from kronserve.store import LocalStore

    store = LocalStore(tmp_path)
    store.activate(store.write("t", b"served"))
    store.write("t", b"an upload that never finished")
    found = kronserve("store", "check", str(tmp_path))
    assert (
        found.returncode == 1
        and json.loads(found.stdout)["ok"] == ["t"]
        and len(json.loads(found.stdout)["orphans"]) == 1
    )
    repaired = kronserve("store", "check", str(tmp_path), "--repair")
    assert repaired.returncode == 0 and store.check().clean and store.read(store.active("t")) == b"served"
