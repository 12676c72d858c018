"""NVIDIA's aiperf load generator against a real `kronserve serve`: several models (tasks), streaming, chat and
completions, a few dozen requests each; exits non-zero if aiperf fails or reports any failed request.

    python benchmarks/aiperf_smoke.py            # aiperf from PATH, else installed into .venv-aiperf (~1.5 GB)

aiperf is not a dev dependency: it pins other versions of transformers, huggingface_hub, prometheus-client and
pyzmq than kronserve's, and pulls pandas, scipy, matplotlib and plotly, so it lives in a venv of its own. It counts
tokens with the backbone's own tokenizer (`--tokenizer`, a local directory: no hub) and the server's counts
(`--use-server-token-count`); `ignore_eos` makes every completion exactly its requested length.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from _server import Server

from kronserve.backbone import load_backbone, write_tiny_backbone
from kronserve.formats.native import AdapterFile, dumps
from kronserve.methods import init_tensors, preset

MODELS = ("alpha", "beta", "gamma")
REPO = Path(__file__).resolve().parent.parent


def aiperf_command(given: str | None) -> str:
    found = given or shutil.which("aiperf")
    if found:
        return found
    venv = REPO / ".venv-aiperf"
    exe = venv / "bin" / "aiperf"
    if not exe.exists():
        print(f"installing aiperf into {venv} (its own environment: its pins differ from kronserve's)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "aiperf"], check=True)
    return str(exe)


def serve(work: Path) -> tuple[Server, Path]:
    backbone = write_tiny_backbone(work / "backbone", "tiny", seed=0)
    server = Server(backbone, work / "store", work / "server.log", {"KRONSERVE_LOG_LEVEL": "warning"})
    server.start()
    bb, spec = load_backbone(str(backbone), device="cpu"), preset("lora")
    for i, model in enumerate(MODELS):
        tensors = init_tensors(spec, bb.fingerprint.geometry, seed=i, std=0.5)
        data = dumps(AdapterFile(model, spec, bb.fingerprint, tensors))
        httpx.put(f"{server.url}/v1/adapters/{model}", files={"file": (model, data)}, timeout=60).raise_for_status()
    return server, backbone


def profile(aiperf: str, server: Server, backbone: Path, endpoint: str, out: Path) -> dict:
    cmd = [aiperf, "profile", "--model", ",".join(MODELS), "--url", server.url, "--endpoint-type", endpoint]
    cmd += ["--streaming", "--tokenizer", str(backbone), "--request-count", "36", "--concurrency", "6"]
    cmd += ["--synthetic-input-tokens-mean", "20", "--output-tokens-mean", "16", "--extra-inputs", "ignore_eos:true"]
    cmd += ["--use-server-token-count", "--output-artifact-dir", str(out), "--no-auto-plot"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"aiperf {endpoint} failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return json.loads((out / "profile_export_aiperf.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--aiperf", help="the aiperf executable (default: PATH, else .venv-aiperf)")
    aiperf = aiperf_command(parser.parse_args().aiperf)
    with tempfile.TemporaryDirectory(prefix="kronserve-aiperf-") as tmp:
        work = Path(tmp)
        server, backbone = serve(work)
        try:
            for endpoint in ("completions", "chat"):
                result = profile(aiperf, server, backbone, endpoint, work / endpoint)
                requests = result["request_count"]["avg"]
                errors = result["error_summary"]
                lengths = result["output_sequence_length"]
                print(
                    f"{endpoint:<12} requests {requests:.0f}  errors {len(errors)}  output tokens "
                    f"{lengths['min']:.0f}..{lengths['max']:.0f}  req/s {result['request_throughput']['avg']:.1f}"
                )
                if errors or requests != 36 or not lengths["min"] == lengths["max"] == 16:
                    raise SystemExit(f"aiperf {endpoint}: {errors or result['request_count']}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
