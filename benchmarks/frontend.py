"""Short requests through HTTP against the same engine driven in-process: what the front end costs.

The Compacter paper's own use is classification: one input, a couple of output tokens. Over a tiny-shaped
random T5 (ByT5 byte tokenizer) with 8 Compacter tasks, every request asks one input and exactly 2 new
tokens, 64 at a time:
  - in-process: the `Service` (engine thread and event loop in this process) driven by 64 coroutines;
  - HTTP: `kronserve serve` (the engine in its own process) loaded by `wrk` with 64 connections (a light
    client: an `httpx` load generator saturates its own core first), rotating over the 8 tasks;
  - HTTP with `KRONSERVE_API_WORKERS=2`;
  - HTTP with `KRONSERVE_ENGINE_PROCESS=false` (one process, the engine a thread: what it was before).
Each is measured alone, one after the other. Last line:
`frontend http/in_process=A workers2/in_process=B one_process/in_process=C` (goal: A ≥ 0.9).
Needs `wrk` on the PATH (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import torch
from _server import Server

from kronserve.backbone import load_backbone, write_tiny_backbone
from kronserve.config import Settings
from kronserve.formats.native import AdapterFile, dumps
from kronserve.messages import GenerationParams
from kronserve.methods import init_tensors, preset
from kronserve.service import Service

TASKS, CONNECTIONS, NEW = 8, 64, 2
TEXT = "the movie was a delight from start to finish"
LUA = """
local i = 0
request = function()
  i = i + 1
  local body = string.format('{"task":"task%d","inputs":["%s"],"max_new_tokens":2,"min_new_tokens":2}', i % 8, "TEXT")
  return wrk.format("POST", "/v1/predict", {["Content-Type"] = "application/json"}, body)
end
""".replace("TEXT", TEXT)


def adapters(backbone_dir: Path) -> dict[str, bytes]:
    bb = load_backbone(str(backbone_dir), device="cpu")
    spec = preset("compacter")
    out = {}
    for i in range(TASKS):
        tensors = init_tensors(spec, bb.fingerprint.geometry, seed=i, std=0.05)
        out[f"task{i}"] = dumps(AdapterFile(f"task{i}", spec, bb.fingerprint, tensors))
    return out


def settings_env(threads: int) -> dict[str, str]:
    return {
        "KRONSERVE_DEVICE": "cpu",
        "KRONSERVE_LOG_LEVEL": "warning",
        "KRONSERVE_QUEUE_SIZE": "1024",
        "OMP_NUM_THREADS": str(threads),
    }


def in_process(backbone_dir: Path, store: Path, blobs: dict[str, bytes], seconds: float, threads: int) -> float:
    """Requests/s of the in-process `Service` under 64 coroutines."""
    torch.set_num_threads(threads)
    settings = Settings(backbone=str(backbone_dir), store=str(store), device="cpu", queue_size=1024)
    params = GenerationParams(max_new_tokens=NEW, min_new_tokens=NEW)

    async def run() -> float:
        service = Service(settings)
        await service.start()
        for task, data in blobs.items():
            await service.upload(task, {"file": data})
        await service.predict("task0", [TEXT], params)
        done = 0
        stop = time.perf_counter() + seconds

        async def worker(c: int) -> None:
            nonlocal done
            i = c
            while time.perf_counter() < stop:
                await service.predict(f"task{i % TASKS}", [TEXT], params)
                done += 1
                i += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in range(CONNECTIONS)))
        rate = done / (time.perf_counter() - started)
        await service.stop()
        return rate

    return asyncio.run(run())


def over_http(backbone_dir: Path, work: Path, name: str, blobs: dict[str, bytes], env: dict[str, str], args) -> float:
    server = Server(backbone_dir, work / f"store-{name}", work / f"{name}.log", env)
    server.start()
    try:
        with httpx.Client(timeout=60) as client:
            for task, data in blobs.items():
                client.put(f"{server.url}/v1/adapters/{task}", files={"file": data}).raise_for_status()
        script = work / "post.lua"
        script.write_text(LUA)
        warm = ["wrk", "-t1", f"-c{CONNECTIONS}", "-d2s", "-s", str(script), server.url]
        subprocess.run(warm, check=True, capture_output=True)
        cmd = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{args.seconds}s", "--timeout", "30s", "-s", str(script)]
        out = subprocess.run([*cmd, server.url], check=True, capture_output=True, text=True).stdout
    finally:
        server.stop()
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{name}: {errors.group(1)} failed requests:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=15, help="length of each measured run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the engine (both ways)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk (apt-get install wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        backbone_dir = write_tiny_backbone(work / "backbone", "tiny", seed=0)
        blobs = adapters(backbone_dir)
        env = settings_env(args.threads)
        print(f"# shape=tiny cores={os.cpu_count()} torch={torch.__version__} seconds={args.seconds} tasks={TASKS}")
        rates = {
            "in_process": in_process(backbone_dir, work / "store-in", blobs, args.seconds, args.threads),
            "http": over_http(backbone_dir, work, "http", blobs, env, args),
            "workers2": over_http(backbone_dir, work, "w2", blobs, env | {"KRONSERVE_API_WORKERS": "2"}, args),
            "one_process": over_http(
                backbone_dir, work, "one", blobs, env | {"KRONSERVE_ENGINE_PROCESS": "false"}, args
            ),
        }
    for name, rate in rates.items():
        print(f"{name:14}{rate:10.1f} req/s")
    base = rates["in_process"]
    print(
        f"frontend http/in_process={rates['http'] / base:.2f} workers2/in_process={rates['workers2'] / base:.2f} "
        f"one_process/in_process={rates['one_process'] / base:.2f}"
    )


if __name__ == "__main__":
    main()
