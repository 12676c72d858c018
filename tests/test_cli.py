"""The `kronserve` console script, run as a user runs it."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kronserve import __version__
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
    assert info["base_model"] == str(bb)  # the backbone as it was typed, not only its digest
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


# ---- the console scripts as installed: conventions and one-line errors (issue 16) -------------------------------

BIN = Path(sys.executable).parent


def console(script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`script` as a user types it: the installed entry point, wide help so no option name is cut."""
    environ = {**os.environ, "TERMINAL_WIDTH": "300", **env}
    return subprocess.run([str(BIN / script), *args], capture_output=True, text=True, env=environ, timeout=120)


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_version_on_both_commands() -> None:
    assert console("kronserve", "--version").stdout.strip() == f"kronserve {__version__}"
    assert console("kronserve-client", "--version").stdout.strip() == f"kronserve-client {__version__}"


def test_the_command_line_imports_neither_torch_nor_transformers() -> None:
    """What made `kronserve --help` take 4 s: every command now imports the heavy libraries it needs itself."""
    code = "import sys, kronserve.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"
    assert console("kronserve", "--help").returncode == 0


def readme_settings() -> set[str]:
    """Every setting the README's configuration table names (`KRONSERVE_HOST` / `_PORT` counts both)."""
    table = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for row in table.splitlines():
        if row.startswith("| `KRONSERVE_"):
            first = row.split("|")[1]
            names |= {n.lower() for n in re.findall(r"KRONSERVE_([A-Z0-9_]+)", first)}
            names |= {n.lower() for n in re.findall(r"`_([A-Z0-9_]+)`", first)}
    return names


README = (Path(__file__).parents[1] / "README.md").read_text()


def test_serve_offers_every_readme_setting_with_its_env_var_and_default() -> None:
    from kronserve.cli import CLUSTER_ONLY, FLAGS

    narrow = console("kronserve", "serve", "--help", COLUMNS="80").stdout
    assert max(map(len, narrow.splitlines())) <= 80 and "…" not in narrow  # readable in an 80-column terminal
    shown = " ".join(narrow.split())  # wrapped lines joined: every name whole
    listed = readme_settings()
    assert {"log_level", "max_new_tokens", "redis_url", "host", "queue_size"} <= listed
    for name in listed - CLUSTER_ONLY:
        flag = FLAGS.get(name, (f"--{name.replace('_', '-')}",))[0]
        assert re.search(rf"{flag}\b", shown), flag
        assert f"[env KRONSERVE_{name.upper()}]" in shown, name
    assert "[default: (127.0.0.1)]" in shown and "[default: (256)]" in shown
    assert "--replicas" not in shown  # cluster-only settings stay on `kronserve cluster`
    assert "--replicas" in console("kronserve", "cluster", "--help").stdout


@pytest.mark.parametrize(
    ("args", "env", "cause"),
    [
        (["serve", "--backbone", "/no/such/backbone"], {}, "backbone directory '/no/such/backbone' does not exist"),
        (["serve", "--device", "gpu"], {}, "Invalid value for '--device'"),
        (["serve", "--dtype", "fp16"], {}, "Invalid value for '--dtype'"),
        (["serve"], {"KRONSERVE_DTYPE": "fp16"}, "invalid setting: dtype"),
        (["serve"], {"KRONSERVE_PORT": "http"}, "invalid setting: port"),
        (["adapter", "inspect", "missing.safetensors"], {}, "'missing.safetensors' does not exist"),
        (["import", "missing_dir", "out.safetensors", "--backbone", "x"], {}, "'missing_dir' does not exist"),
        (["nosuch"], {}, "No such command 'nosuch'"),
    ],
)
def test_a_start_that_cannot_succeed_is_one_line_and_non_zero(
    args: list[str], env: dict[str, str], cause: str, tmp_path: Path
) -> None:
    r = console("kronserve", *args, **env)
    assert r.returncode == 2 and cause in one_error_line(r)


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_cuda_without_cuda_is_refused_before_listening(tiny_dir: Path) -> None:
    r = console("kronserve", "serve", "--backbone", str(tiny_dir), "--device", "cuda", "--port", "0")
    assert r.returncode == 2 and "device 'cuda' was asked for but torch sees no CUDA device" in one_error_line(r)


def test_a_start_up_failure_after_listening_stops_the_server(tmp_path: Path) -> None:
    broken = tmp_path / "backbone"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")  # a directory, so it passes the checks made before listening
    r = console("kronserve", "serve", "--backbone", str(broken), "--store", str(tmp_path / "store"), "--port", "0")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: start-up failed: ")


def test_a_busy_port_and_a_store_that_is_a_file_are_one_line_before_anything_loads(tiny_dir: Path, tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        r = console("kronserve", "serve", "--backbone", str(tiny_dir), "--store", str(tmp_path / "s"), "--port", port)
    assert r.returncode == 2 and f"127.0.0.1:{port} is already in use" in one_error_line(r)
    assert "Errno" not in r.stderr
    (tmp_path / "store").write_text("a file where the store directory belongs")
    r = console("kronserve", "serve", "--backbone", str(tiny_dir), "--store", str(tmp_path / "store"), "--port", "0")
    assert r.returncode == 2 and "is a file; --store names a directory" in one_error_line(r)
    assert "FileExistsError" not in r.stderr


@pytest.mark.parametrize(
    ("env", "why"),
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        ({"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}, "127.0.0.1 did not answer"),  # port 9: closed
    ],
)
def test_adapter_init_on_an_unreachable_hub_fails_fast_in_one_line(
    env: dict[str, str], why: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    args = ["adapter", "init", "--backbone", "google-t5/t5-small", "--task", "t", str(tmp_path / "a.safetensors")]
    r = console("kronserve", *args, HF_HOME=str(tmp_path / "hf"), **env)
    assert r.returncode == 2 and why in one_error_line(r) and "not in the hub cache" in r.stderr
    assert time.monotonic() - started < 20  # loose: the hub client's own retries took 27 s
    assert not (tmp_path / "a.safetensors").exists()


def test_debug_shows_the_traceback() -> None:
    r = console("kronserve", "--debug", "adapter", "init", "--backbone", "/no/such", "--task", "t", "x.safetensors")
    assert r.returncode == 1 and "Traceback" in r.stderr and "does not exist" in r.stderr


def test_train_that_learns_nothing_is_not_uploaded(tiny_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    rows = [{"input": f"x{i}", "target": "yes" if i % 2 else "no"} for i in range(24)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["train", "--backbone", str(tiny_dir), "--data", str(data), "--task", "t", "--out", str(tmp_path / "t.st")]
    args += ["--max-steps", "1", "--lr", "1e-9", "--eval-fraction", "0.25", "--device", "cpu"]
    r = console("kronserve", *args, "--upload", "http://127.0.0.1:9")  # nothing listens: an upload would fail
    assert r.returncode == 1 and "not uploaded (--force uploads it anyway)" in r.stderr
    summary = json.loads(r.stdout)
    assert summary["steps"] == 1 and summary["epochs_run"] == 1 and summary["improved"] is False
    assert len(summary["history"]) == 1 and (tmp_path / "t.st").is_file()
    # --force uploads anyway: tests/test_train.py (in process) and tests/e2e/test_train_upload.py (to a real server).


@pytest.mark.parametrize(
    ("args", "cause"),
    [(["nosuch"], "No such command 'nosuch'"), (["upload", "t", "missing.safetensors"], "does not exist")],
)
def test_client_usage_errors_are_one_line(args: list[str], cause: str) -> None:
    r = console("kronserve-client", *args)
    assert r.returncode == 2 and cause in one_error_line(r)
