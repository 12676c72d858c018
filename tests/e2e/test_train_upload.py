"""A trained adapter, pushed to a running server, answers as the trainer's own held-out eval did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from kronserve.train import read_examples, split_examples

from ..test_train import majority_task, write_jsonl
from .conftest import Server


def test_kronserve_train_upload_then_predict_over_http(server: Server, tiny_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "majority.jsonl", majority_task(120))
    out = tmp_path / "majority.safetensors"
    cmd = [sys.executable, "-c", "from kronserve.cli import main; main()", "train", "--backbone", str(tiny_dir)]
    cmd += ["--data", str(data), "--task", "majority", "--out", str(out), "--method", "pfeiffer", "--epochs", "3"]
    # --force: 3 quick epochs need not beat the untrained adapter's held-out accuracy; the upload path is the point.
    cmd += ["--eval-fraction", "0.25", "--device", "cpu", "--upload", server.url, "--force"]
    # One OpenMP thread, as tests/test_train.py: on a busy 2-core box two threads' barriers made training 3-6x slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    summary, uploaded = (json.loads(line) for line in run.stdout.strip().splitlines()[-2:])
    assert summary["task"] == "majority" and summary["epochs_run"] >= 1
    assert uploaded["version"] >= 1
    info = httpx.get(f"{server.url}/v1/adapters/majority").json()
    assert info["method"] == "pfeiffer" and info["version"] == uploaded["version"]
    # The server's answers on the held-out rows give back the accuracy the trainer reported.
    _, held_out = split_examples(read_examples(data), 0.25, 0)
    body = {"task": "majority", "inputs": [e.input for e in held_out], "max_new_tokens": 4}
    outputs = httpx.post(f"{server.url}/v1/predict", json=body, timeout=60).json()["outputs"]
    accuracy = sum(o == e.target for o, e in zip(outputs, held_out, strict=True)) / len(held_out)
    assert accuracy == summary["best_eval_accuracy"]
