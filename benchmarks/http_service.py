"""kronserve over real HTTP: mixed-task throughput, HTTP vs in-process, upload-to-first-answer latency.

One `kronserve serve` subprocess on 127.0.0.1 with a t5-small-shaped random backbone (ByT5 byte tokenizer),
32 Compacter adapters uploaded with PUT /v1/adapters/{task}. Three measurements:
  1. throughput (generated tokens/s) of a closed loop of C requests in flight (asyncio + httpx.AsyncClient),
     each one input of 64 tokens and exactly 16 new tokens greedy (max_new_tokens = min_new_tokens = 16),
     spread over 32 tasks vs all for one task; the two cases alternate over several rounds, medians reported;
  2. that 32-task HTTP throughput vs Engine.generate in this process on batches of the sizes the server
     formed in the same round (kronserve_batch_rows_sum/_count from /metrics before and after), with the
     same inputs, tasks, tokens and adapter files; measured while the server is idle, never both at once;
  3. upload-to-first-answer: from starting the PUT of a fresh Compacter adapter to the first successful
     predict answer for it (4 new tokens), one task at a time on an otherwise idle server; p50 and p90.
Prints a table and, last, `ratios tasks32/one_task=A http/in_process=B upload_to_first_answer_p50_ms=C`.

Environment of the server (printed in the header): KRONSERVE_BATCH_WAIT_MS (--batch-wait-ms),
KRONSERVE_MAX_BATCH_ROWS = C (one batch can take every request in flight), KRONSERVE_QUEUE_SIZE = 4·C,
KRONSERVE_DEVICE=cpu, KRONSERVE_LOG_LEVEL=warning, OMP_NUM_THREADS = MKL_NUM_THREADS = --server-threads.
This process runs torch with --threads threads, only while the server is idle.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from kronserve.backbone import load_backbone, write_tiny_backbone
from kronserve.engine import Engine
from kronserve.formats.native import AdapterFile, dumps
from kronserve.methods import init_tensors, preset

N_TASKS, IN_TOKENS, NEW_TOKENS, PROBE_TOKENS = 32, 64, 16, 4
METHOD, STD = "compacter", 0.05


# ---- inputs and adapters ----------------------------------------------------------------------------------
def make_inputs(n: int) -> list[str]:
    # ByT5 tokenizes bytes: 63 ASCII characters + EOS = 64 tokens per row.
    return [(f"row {i}: " + "the quick brown fox jumps over the lazy dog " * 2)[: IN_TOKENS - 1] for i in range(n)]


def adapter_bytes(engine: Engine, task: str, seed: int) -> bytes:
    spec = preset(METHOD)
    tensors = init_tensors(spec, engine.geometry, seed=seed, std=STD)
    return dumps(AdapterFile(task, spec, engine.backbone.fingerprint, tensors))


def split(rows: int, parts: int) -> list[int]:
    """`rows` in `parts` batches as equal as possible (the server's mean batch size, same batch count)."""
    parts = max(1, min(parts, rows))
    q, r = divmod(rows, parts)
    return [q + (i < r) for i in range(parts)]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


# ---- the server subprocess ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, backbone: Path, store: Path, log: Path, env: dict[str, str]) -> None:
        self.backbone, self.store, self.log, self.env = backbone, store, log, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 180) -> None:
        exe = shutil.which("kronserve")
        cmd = [exe] if exe else [sys.executable, "-c", "from kronserve.cli import main; main()"]
        cmd += ["serve", "--backbone", str(self.backbone), "--store", str(self.store), "--port", str(self.port)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout_s:g} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM (the server drains accepted work), then wait; SIGKILL only if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


async def scrape(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    """/metrics as {series (with labels): value}."""
    r = await client.get(f"{url}/metrics")
    r.raise_for_status()
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


# ---- measurement 1: closed-loop throughput over HTTP --------------------------------------------------------
@dataclass
class Run:
    wall: float
    tokens: int
    latencies: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # deltas over the run

    @property
    def tput(self) -> float:
        return self.tokens / self.wall

    def m(self, name: str) -> float:
        return self.metrics.get(name, 0.0)


async def http_run(client: httpx.AsyncClient, url: str, tasks: list[str], xs: list[str], concurrency: int) -> Run:
    """Send request i = (tasks[i], xs[i]) for every i, `concurrency` in flight at every moment."""
    before = await scrape(client, url)
    todo = iter(range(len(xs)))
    latencies: list[float] = []

    async def worker() -> None:
        for i in todo:  # a shared iterator: each worker takes the next request when its previous one answered
            body = {
                "task": tasks[i],
                "inputs": [xs[i]],
                "max_new_tokens": NEW_TOKENS,
                "min_new_tokens": NEW_TOKENS,
                "num_beams": 1,
            }
            t0 = time.perf_counter()
            r = await client.post(f"{url}/v1/predict", json=body)
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise RuntimeError(f"predict {i} for {tasks[i]!r}: {r.status_code} {r.text[:300]}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    after = await scrape(client, url)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return Run(wall, len(xs) * NEW_TOKENS, latencies, delta)


# ---- measurement 2: the same rows in this process ----------------------------------------------------------
def in_process_run(engine: Engine, tasks: list[str], xs: list[str], sizes: list[int]) -> Run:
    t0 = time.perf_counter()
    start = 0
    for n in sizes:
        engine.generate(tasks[start : start + n], xs[start : start + n], NEW_TOKENS, 1, NEW_TOKENS)
        start += n
    return Run(time.perf_counter() - t0, len(xs) * NEW_TOKENS)


# ---- measurement 3: upload to first answer -----------------------------------------------------------------
@dataclass
class Probe:
    put_ms: float
    predict_ms: float
    total_ms: float
    tries: int


async def upload_probe(client: httpx.AsyncClient, url: str, task: str, data: bytes, x: str) -> Probe:
    body = {"task": task, "inputs": [x], "max_new_tokens": PROBE_TOKENS, "min_new_tokens": PROBE_TOKENS}
    t0 = time.perf_counter()
    r = await client.put(f"{url}/v1/adapters/{task}", files={"file": ("adapter.safetensors", data)})
    t1 = time.perf_counter()
    if r.status_code != 201:
        raise RuntimeError(f"upload {task!r}: {r.status_code} {r.text[:300]}")
    for tries in range(1, 101):  # the first *successful* answer: retry while the task is not visible yet
        p = await client.post(f"{url}/v1/predict", json=body)
        if p.status_code == 200:
            t2 = time.perf_counter()
            return Probe((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t0) * 1e3, tries)
        if p.status_code != 404:
            raise RuntimeError(f"predict {task!r}: {p.status_code} {p.text[:300]}")
    raise RuntimeError(f"task {task!r} never answered after its upload")


# ---- the benchmark ----------------------------------------------------------------------------------------------
@dataclass
class Results:
    runs: dict[str, list[Run]] = field(default_factory=dict)
    sizes: list[list[int]] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)

    def add(self, name: str, run: Run) -> None:
        self.runs.setdefault(name, []).append(run)

    def median_tput(self, name: str) -> float:
        return statistics.median(r.tput for r in self.runs[name])


HTTP_MIXED, HTTP_ONE = f"HTTP, {N_TASKS} tasks", "HTTP, one task"
INPROC_SAME, INPROC_FULL = "in-process, server's batches", "in-process, full batches"


async def measure(args: argparse.Namespace, server: Server, engine: Engine, blobs: dict[str, bytes]) -> Results:
    url, c = server.url, args.concurrency
    xs = make_inputs(args.requests)
    task_ids = list(blobs)
    mixed = [task_ids[i % N_TASKS] for i in range(args.requests)]
    one = [task_ids[0]] * args.requests
    res = Results()
    limits = httpx.Limits(max_connections=c + 8, max_keepalive_connections=c + 8)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0)) as client:
        for task, data in blobs.items():
            r = await client.put(f"{url}/v1/adapters/{task}", files={"file": ("adapter.safetensors", data)})
            if r.status_code != 201:
                raise RuntimeError(f"upload {task!r}: {r.status_code} {r.text[:300]}")
        # warm-up: both cases over HTTP (uvicorn, the engine thread, the bank plan) and the in-process engine
        for tasks in (mixed, one):
            await http_run(client, url, tasks[:c], xs[:c], c)
        in_process_run(engine, mixed[:c], xs[:c], [c])
        for rnd in range(args.rounds):
            order = [(HTTP_MIXED, mixed), (HTTP_ONE, one)]
            for name, tasks in order if rnd % 2 == 0 else order[::-1]:  # alternate which case goes first
                res.add(name, await http_run(client, url, tasks, xs, c))
            batches = max(1, round(res.runs[HTTP_MIXED][-1].m("kronserve_batch_rows_count")))
            sizes = split(args.requests, batches)
            res.sizes.append(sizes)
            await asyncio.sleep(0.5)  # the server is idle now (every request answered); let its threads settle
            res.add(INPROC_SAME, in_process_run(engine, mixed, xs, sizes))
            full = split(args.requests, -(-args.requests // c))
            if full != sizes:
                res.add(INPROC_FULL, in_process_run(engine, mixed, xs, full))
            print(
                f"  round {rnd + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1].tput:.0f}" for k, v in res.runs.items())
            )
        for i in range(args.probes):
            task = f"fresh-{os.getpid()}-{i:02d}"
            data = adapter_bytes(engine, task, seed=1000 + i)
            await asyncio.sleep(0.3)  # otherwise idle server
            res.probes.append(await upload_probe(client, url, task, data, xs[i]))
    return res


def report(args: argparse.Namespace, res: Results, env: dict[str, str]) -> None:
    print()
    print(
        f"t5-small-shaped random backbone, float32 on CPU ({os.cpu_count()} cores), method {METHOD}, "
        f"{args.requests} requests per run, {args.concurrency} in flight, 1 input x {IN_TOKENS} tokens, "
        f"{NEW_TOKENS} new tokens greedy; median of {args.rounds} rounds"
    )
    print(
        "server env: " + " ".join(f"{k}={v}" for k, v in env.items()) + f"; this process torch threads {args.threads}"
    )
    head = f"{'case':<30} {'median s':>8} {'tokens/s':>9} {'min..max tok/s':>15} {'batches':>7} {'rows/b':>6}"
    print(head + f" {'tasks/b':>7} {'busy':>5} {'tok/eng-s':>9} {'queue ms':>8} {'lat p50':>7} {'lat p90':>7}")
    for name, runs in res.runs.items():
        tputs = [r.tput for r in runs]
        line = f"{name:<30} {statistics.median(r.wall for r in runs):>8.2f} {statistics.median(tputs):>9.1f}"
        line += f" {f'{min(tputs):.0f}..{max(tputs):.0f}':>15}"
        if runs[0].metrics:
            count = [r.m("kronserve_batch_rows_count") for r in runs]
            rows = sum(r.m("kronserve_batch_rows_sum") for r in runs) / sum(count)
            tasks_b = sum(r.m("kronserve_batch_tasks_sum") for r in runs) / sum(count)
            eng = [r.m('kronserve_engine_seconds_sum{kind="generate"}') for r in runs]
            busy = statistics.median(e / r.wall for e, r in zip(eng, runs, strict=True))
            tok_eng = statistics.median(r.tokens / e for e, r in zip(eng, runs, strict=True))
            qw = sum(r.m("kronserve_queue_wait_seconds_sum") for r in runs)
            qn = sum(r.m("kronserve_queue_wait_seconds_count") for r in runs)
            lat = [x for r in runs for x in r.latencies]
            line += f" {statistics.median(count):>7.0f} {rows:>6.1f} {tasks_b:>7.1f} {busy:>5.0%} {tok_eng:>9.1f}"
            line += f" {qw / qn * 1e3:>8.0f} {pct(lat, 50) * 1e3:>7.0f} {pct(lat, 90) * 1e3:>7.0f}"
        print(line)
    print(f"server's batch sizes per {HTTP_MIXED} run (rows/batch from /metrics):")
    for run, sizes in zip(res.runs[HTTP_MIXED], res.sizes, strict=True):
        n = run.m("kronserve_batch_rows_count")
        print(f"  {n:.0f} batches, mean {run.m('kronserve_batch_rows_sum') / n:.1f} rows -> in-process sizes {sizes}")
    p = res.probes
    tot = [x.total_ms for x in p]
    print(
        f"upload -> first answer, {len(p)} fresh {METHOD} tasks, {PROBE_TOKENS} new tokens: "
        f"p50 {pct(tot, 50):.0f} ms, p90 {pct(tot, 90):.0f} ms, max {max(tot):.0f} ms "
        f"(PUT p50 {pct([x.put_ms for x in p], 50):.0f} ms, predict p50 {pct([x.predict_ms for x in p], 50):.0f} ms, "
        f"predict retries {sum(x.tries - 1 for x in p)})"
    )
    mixed, one = res.median_tput(HTTP_MIXED), res.median_tput(HTTP_ONE)
    ratio_tasks, ratio_http = mixed / one, mixed / res.median_tput(INPROC_SAME)
    p50 = pct(tot, 50)
    verdict = {True: "met", False: "MISSED"}
    print(
        f"goals: tasks32/one_task >= 0.90 {verdict[ratio_tasks >= 0.90]}; http/in_process >= 0.85 "
        f"{verdict[ratio_http >= 0.85]}; upload_to_first_answer p50 <= 200 ms {verdict[p50 <= 200]}"
    )
    if INPROC_FULL in res.runs:
        print(f"(HTTP / in-process at full {args.concurrency}-row batches: {mixed / res.median_tput(INPROC_FULL):.3f})")
    print(
        f"ratios tasks32/one_task={ratio_tasks:.3f} http/in_process={ratio_http:.3f} "
        f"upload_to_first_answer_p50_ms={p50:.0f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds (under 3 minutes on 2 CPU cores)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of (32 tasks, one task, in-process); 6 / 3")
    ap.add_argument("--requests", type=int, default=192, help="requests per throughput run")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight (also the server's batch rows)")
    ap.add_argument("--probes", type=int, default=20, help="fresh tasks for upload-to-first-answer")
    ap.add_argument("--batch-wait-ms", type=float, default=20.0, help="KRONSERVE_BATCH_WAIT_MS of the server")
    ap.add_argument("--server-threads", type=int, default=os.cpu_count() or 1, help="torch threads of the server")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of this process")
    args = ap.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 6)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the server on SIGTERM too

    work = Path(tempfile.mkdtemp(prefix="kronserve-http-bench-"))
    env = {
        "KRONSERVE_BATCH_WAIT_MS": f"{args.batch_wait_ms:g}",
        "KRONSERVE_MAX_BATCH_ROWS": str(args.concurrency),
        "KRONSERVE_QUEUE_SIZE": str(4 * args.concurrency),
        "KRONSERVE_DEVICE": "cpu",
        "KRONSERVE_LOG_LEVEL": "warning",
        "OMP_NUM_THREADS": str(args.server_threads),
        "MKL_NUM_THREADS": str(args.server_threads),
    }
    server = Server(work / "backbone", work / "store", work / "server.log", env)
    failed = True
    try:
        t0 = time.perf_counter()
        write_tiny_backbone(server.backbone, "t5-small", seed=0)
        engine = Engine(load_backbone(str(server.backbone), device="cpu", dtype="float32"))
        blobs = {f"bench-t{i:02d}": adapter_bytes(engine, f"bench-t{i:02d}", seed=i) for i in range(N_TASKS)}
        for task, data in blobs.items():  # the very files the server gets
            engine.registry.upload(task, data)
        server.start()
        print(f"setup {time.perf_counter() - t0:.1f} s; server on {server.url}", flush=True)
        res = asyncio.run(measure(args, server, engine, blobs))
        failed = False
    finally:
        if failed:
            print(f"--- server log tail ---\n{server.log_tail()}", file=sys.stderr)
        rc = server.stop()
        print(f"server stopped with SIGTERM, exit code {rc}", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    report(args, res, env)


if __name__ == "__main__":
    main()
