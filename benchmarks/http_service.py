"""kronserve over real HTTP: mixed-task throughput, HTTP vs in-process, upload-to-first-answer latency.

One `kronserve serve` subprocess on 127.0.0.1 with a t5-small-shaped random backbone (ByT5 byte tokenizer),
32 Compacter adapters uploaded with PUT /v1/adapters/{task}. Three measurements:
  1. throughput (generated tokens/s) of a closed loop of C requests in flight (asyncio + httpx.AsyncClient),
     each one input of 64 tokens and exactly 16 new tokens greedy (max_new_tokens = min_new_tokens = 16),
     spread over 32 tasks vs all for one task; the two cases alternate over several rounds, medians reported;
  2. that 32-task HTTP throughput vs Engine.generate in this process on the batches the server formed in the
     same round: the batch count comes from kronserve_batch_rows_sum/_count in /metrics before and after, the
     rows of each batch from the bursts in which the answers came back (used when the burst count equals the
     batch count, else an even split); same inputs, tasks, tokens, adapter files and torch threads; measured
     while the server is idle, never both at once. Also, for reference, in-process at full batches;
  3. upload-to-first-answer: from starting the PUT of a fresh Compacter adapter to the first successful
     predict answer for it (4 new tokens), one task at a time on an otherwise idle server; p50 and p90.
Prints a table and, last, `ratios tasks32/one_task=A http/in_process=B upload_to_first_answer_p50_ms=C`.

Environment of the server (printed in the header): KRONSERVE_BATCH_WAIT_MS (--batch-wait-ms, default 5 as
the server's own), KRONSERVE_MAX_BATCH_ROWS (--max-batch-rows, default 64 = C, so one batch can take every
request in flight), KRONSERVE_QUEUE_SIZE = 4·C, KRONSERVE_DEVICE=cpu, KRONSERVE_LOG_LEVEL=warning,
OMP_NUM_THREADS = MKL_NUM_THREADS = --server-threads (default: all cores). This process runs torch with
--threads threads (default: all cores), only while the server is idle; its HTTP client shares the cores with
the server during the HTTP runs, and the "cpu" columns show how much it took.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from _server import Server, scrape
from transformers.utils import logging as hf_logging

from kronserve.backbone import load_backbone, write_tiny_backbone
from kronserve.engine import Engine
from kronserve.formats.native import AdapterFile, dumps
from kronserve.methods import init_tensors, preset

N_TASKS, IN_TOKENS, NEW_TOKENS, PROBE_TOKENS = 32, 64, 16, 4
METHOD, STD = "compacter", 0.05
ENGINE_SUM = 'kronserve_engine_seconds_sum{kind="generate"}'


# ---- inputs and adapters ----------------------------------------------------------------------------------
def make_inputs(n: int) -> list[str]:
    # ByT5 tokenizes bytes: 63 ASCII characters + EOS = 64 tokens per row.
    return [(f"row {i}: " + "the quick brown fox jumps over the lazy dog " * 2)[: IN_TOKENS - 1] for i in range(n)]


def adapter_bytes(engine: Engine, task: str, seed: int) -> bytes:
    spec = preset(METHOD)
    tensors = init_tensors(spec, engine.geometry, seed=seed, std=STD)
    return dumps(AdapterFile(task, spec, engine.backbone.fingerprint, tensors))


def split(rows: int, parts: int) -> list[int]:
    """`rows` in `parts` batches as equal as possible."""
    parts = max(1, min(parts, rows))
    q, r = divmod(rows, parts)
    return [q + (i < r) for i in range(parts)]


def row_hist(run: Run) -> str:
    """Batches per rows bucket, from the cumulative kronserve_batch_rows_bucket deltas."""
    cum = {float(k.split('le="')[1].rstrip('"}')): v for k, v in run.metrics.items() if "batch_rows_bucket" in k}
    out, prev, low = [], 0.0, 1
    for le in sorted(cum):
        if cum[le] - prev > 0:
            high = "inf" if le == float("inf") else f"{le:.0f}"
            out.append(f"{low}-{high}:{cum[le] - prev:.0f}")
        prev, low = cum[le], int(le) + 1 if le != float("inf") else low
    return " ".join(out)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


# ---- measurement 1: closed-loop throughput over HTTP --------------------------------------------------------
@dataclass
class Run:
    wall: float
    tokens: int
    latencies: list[float] = field(default_factory=list)
    done: list[tuple[float, int]] = field(default_factory=list)  # (answer time, request index)
    metrics: dict[str, float] = field(default_factory=dict)  # deltas over the run
    cpu_self: float = 0.0  # core-seconds this process used during the run (HTTP client, or the engine)
    cpu_server: float = 0.0  # core-seconds the server process used during the run
    cpu_loop: float = 0.0  # ... of which its main thread: uvicorn's event loop (HTTP, JSON, validation, routes)

    @property
    def tput(self) -> float:
        return self.tokens / self.wall

    def m(self, name: str) -> float:
        return self.metrics.get(name, 0.0)


def cpu_s(pid: int | None = None, main_thread: bool = False) -> float:
    """utime + stime of this process (pid None), of process `pid`, or of its main thread, in seconds."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    stat = Path(f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def http_run(server: Server, client: httpx.AsyncClient, tasks: list[str], xs: list[str], c: int) -> Run:
    """Send request i = (tasks[i], xs[i]) for every i, `c` in flight at every moment."""
    url, pid = server.url, server.pid
    before = await scrape(client, url)
    todo = iter(range(len(xs)))
    latencies: list[float] = []
    done: list[tuple[float, int]] = []

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
            t1 = time.perf_counter()
            latencies.append(t1 - t0)
            done.append((t1, i))
            if r.status_code != 200:
                raise RuntimeError(f"predict {i} for {tasks[i]!r}: {r.status_code} {r.text[:300]}")

    cpu0, srv0, loop0, t0 = cpu_s(), cpu_s(pid), cpu_s(pid, main_thread=True), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(c)))
    wall = time.perf_counter() - t0
    cpu, srv, loop = cpu_s() - cpu0, cpu_s(pid) - srv0, cpu_s(pid, main_thread=True) - loop0
    after = await scrape(client, url)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return Run(wall, len(xs) * NEW_TOKENS, latencies, done, delta, cpu, srv, loop)


def server_batches(run: Run, gap_s: float = 0.1) -> tuple[list[list[int]], str]:
    """The requests of each batch the server ran, in order: answers of one batch come back in one burst,
    bursts are at least one engine call apart. Kept only when the burst count equals the server's batch
    count in /metrics; else an even split of the requests into that many batches."""
    count = max(1, round(run.m("kronserve_batch_rows_count")))
    groups: list[list[int]] = []
    last = -1.0
    for t, i in sorted(run.done):
        if not groups or t - last > gap_s:
            groups.append([])
        groups[-1].append(i)
        last = t
    if len(groups) == count:
        return groups, "exact (answer bursts = /metrics batch count)"
    order = sorted(i for _, i in run.done)
    sizes, start, even = split(len(order), count), 0, []
    for n in sizes:
        even.append(order[start : start + n])
        start += n
    return even, f"even split ({len(groups)} answer bursts != {count} batches in /metrics)"


# ---- measurement 2: the same rows in this process ----------------------------------------------------------
def in_process_run(engine: Engine, tasks: list[str], xs: list[str], groups: list[list[int]], pid: int) -> Run:
    """Engine.generate once per group of request indices, the groups one after another."""
    cpu0, srv0, t0 = cpu_s(), cpu_s(pid), time.perf_counter()
    for g in groups:
        engine.generate([tasks[i] for i in g], [xs[i] for i in g], NEW_TOKENS, 1, NEW_TOKENS)
    wall, cpu, srv = time.perf_counter() - t0, cpu_s() - cpu0, cpu_s(pid) - srv0
    return Run(wall, sum(len(g) for g in groups) * NEW_TOKENS, cpu_self=cpu, cpu_server=srv)


# ---- measurement 3: upload to first answer -----------------------------------------------------------------
@dataclass
class Probe:
    put_ms: float
    predict_ms: float
    total_ms: float
    tries: int
    again_ms: float  # a second predict for the same task right after: the steady per-request latency


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
            await asyncio.sleep(0.1)
            t3 = time.perf_counter()
            (await client.post(f"{url}/v1/predict", json=body)).raise_for_status()
            again = (time.perf_counter() - t3) * 1e3
            return Probe((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t0) * 1e3, tries, again)
        if p.status_code != 404:
            raise RuntimeError(f"predict {task!r}: {p.status_code} {p.text[:300]}")
    raise RuntimeError(f"task {task!r} never answered after its upload")


# ---- the benchmark ----------------------------------------------------------------------------------------------
@dataclass
class Results:
    runs: dict[str, list[Run]] = field(default_factory=dict)
    sizes: list[tuple[list[int], str]] = field(default_factory=list)  # in-process batch sizes, how found
    probes: list[Probe] = field(default_factory=list)
    probe_metrics: dict[str, float] = field(default_factory=dict)  # /metrics deltas over the probes

    def add(self, name: str, run: Run) -> None:
        self.runs.setdefault(name, []).append(run)

    def median_tput(self, name: str) -> float:
        return statistics.median(r.tput for r in self.runs[name])


HTTP_MIXED, HTTP_ONE = f"HTTP, {N_TASKS} tasks", "HTTP, one task"
INPROC_SAME, INPROC_FULL = "in-process, server's batches", "in-process, full batches"


async def measure(args: argparse.Namespace, server: Server, engine: Engine, blobs: dict[str, bytes]) -> Results:
    url, c, rows = server.url, args.concurrency, args.max_batch_rows
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
            await http_run(server, client, tasks[:c], xs[:c], c)
        in_process_run(engine, mixed, xs, [list(range(min(c, rows)))], server.pid)
        for rnd in range(args.rounds):
            order = [(HTTP_MIXED, mixed), (HTTP_ONE, one)]
            for name, tasks in order if rnd % 2 == 0 else order[::-1]:  # alternate which case goes first
                res.add(name, await http_run(server, client, tasks, xs, c))
            groups, how = server_batches(res.runs[HTTP_MIXED][-1])
            res.sizes.append(([len(g) for g in groups], how))
            await asyncio.sleep(0.5)  # the server is idle now (every request answered); let its threads settle
            res.add(INPROC_SAME, in_process_run(engine, mixed, xs, groups, server.pid))
            full = [list(range(i, min(i + rows, args.requests))) for i in range(0, args.requests, rows)]
            if [len(g) for g in full] != res.sizes[-1][0]:
                res.add(INPROC_FULL, in_process_run(engine, mixed, xs, full, server.pid))
            print(
                f"  round {rnd + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1].tput:.0f}" for k, v in res.runs.items()),
                flush=True,
            )
        before = await scrape(client, url)
        for i in range(args.probes):
            task = f"fresh-{os.getpid()}-{i:02d}"
            data = adapter_bytes(engine, task, seed=1000 + i)
            await asyncio.sleep(0.3)  # otherwise idle server
            res.probes.append(await upload_probe(client, url, task, data, xs[i % len(xs)]))
        res.probe_metrics = {k: v - before.get(k, 0.0) for k, v in (await scrape(client, url)).items()}
    return res


def report(args: argparse.Namespace, res: Results, env: dict[str, str]) -> None:
    print()
    print(
        f"t5-small-shaped random backbone, float32 on CPU ({os.cpu_count()} cores), method {METHOD}, "
        f"{args.requests} requests per run, {args.concurrency} in flight, 1 input x {IN_TOKENS} tokens, "
        f"{NEW_TOKENS} new tokens greedy; median of {args.rounds} rounds"
    )
    print("server env: " + " ".join(f"{k}={v}" for k, v in env.items()))
    print(f"this process: torch threads {args.threads}; engine runs only while the server is idle")
    head = f"{'case':<30} {'median s':>8} {'tokens/s':>9} {'min..max tok/s':>15} {'cpu here':>8} {'cpu server':>10}"
    print(head + f" {'(its loop)':>10}")
    for name, runs in res.runs.items():
        tputs = [r.tput for r in runs]
        line = f"{name:<30} {statistics.median(r.wall for r in runs):>8.2f} {statistics.median(tputs):>9.1f}"
        line += f" {f'{min(tputs):.0f}..{max(tputs):.0f}':>15}"
        cpu_here, cpu_server = (
            statistics.median(r.cpu_self for r in runs),
            statistics.median(r.cpu_server for r in runs),
        )
        line += f" {cpu_here:>8.2f} {cpu_server:>10.2f}"
        if runs[0].metrics:
            line += f" {statistics.median(r.cpu_loop for r in runs):>10.2f}"
        print(line)
    print(
        "(cpu: core-seconds per run, median; 'here' = the HTTP client, or the in-process engine; "
        "'its loop' = the server's main thread, uvicorn's event loop, which shares the GIL with the engine thread)"
    )
    print()
    print_server_side(res)
    print()
    print_probes(res.probes, res.probe_metrics)
    print()
    print_goals(args, res)


def print_server_side(res: Results) -> None:
    print("server side of the HTTP runs (/metrics deltas; busy = engine seconds / wall):")
    head = f"{'case':<30} {'batches':>7} {'rows/b':>6} {'tasks/b':>7} {'busy':>5} {'tok/eng-s':>9} {'queue ms':>8}"
    print(head + f" {'lat p50 ms':>10} {'lat p90 ms':>10}")
    for name in (HTTP_MIXED, HTTP_ONE):
        runs = res.runs[name]
        count = [r.m("kronserve_batch_rows_count") for r in runs]
        rows = sum(r.m("kronserve_batch_rows_sum") for r in runs) / sum(count)
        tasks_b = sum(r.m("kronserve_batch_tasks_sum") for r in runs) / sum(count)
        eng = [r.m(ENGINE_SUM) for r in runs]
        busy = statistics.median(e / r.wall for e, r in zip(eng, runs, strict=True))
        tok_eng = statistics.median(r.tokens / e for e, r in zip(eng, runs, strict=True))
        qw = sum(r.m("kronserve_queue_wait_seconds_sum") for r in runs)
        qn = sum(r.m("kronserve_queue_wait_seconds_count") for r in runs)
        lat = [x for r in runs for x in r.latencies]
        line = f"{name:<30} {statistics.median(count):>7.0f} {rows:>6.1f} {tasks_b:>7.1f} {busy:>5.0%} {tok_eng:>9.1f}"
        print(line + f" {qw / qn * 1e3:>8.0f} {pct(lat, 50) * 1e3:>10.0f} {pct(lat, 90) * 1e3:>10.0f}")
    print("batches per run (rows-bucket:count from the kronserve_batch_rows histogram):")
    for name in (HTTP_MIXED, HTTP_ONE):
        for i, run in enumerate(res.runs[name]):
            n = run.m("kronserve_batch_rows_count")
            line = (
                f"  {name:<15} {n:.0f} batches, mean {run.m('kronserve_batch_rows_sum') / n:.1f} rows, {row_hist(run)}"
            )
            print(line + (f" -> in-process {res.sizes[i][0]}, {res.sizes[i][1]}" if name == HTTP_MIXED else ""))


def print_probes(p: list[Probe], m: dict[str, float]) -> None:
    tot = [x.total_ms for x in p]
    print(
        f"upload -> first answer, {len(p)} fresh {METHOD} tasks, {PROBE_TOKENS} new tokens, idle server: "
        f"p50 {pct(tot, 50):.0f} ms, p90 {pct(tot, 90):.0f} ms, min {min(tot):.0f}, max {max(tot):.0f}"
    )
    print(
        f"  of which PUT p50 {pct([x.put_ms for x in p], 50):.0f} ms (p90 {pct([x.put_ms for x in p], 90):.0f}), "
        f"predict p50 {pct([x.predict_ms for x in p], 50):.0f} ms (p90 {pct([x.predict_ms for x in p], 90):.0f}); "
        f"predict retries before the first 200: {sum(x.tries - 1 for x in p)}"
    )

    def mean_ms(name: str) -> float:
        n = m.get(name.replace("_sum", "_count"), 0.0)
        return m.get(name, 0.0) / n * 1e3 if n else float("nan")

    print(
        f"  a second predict for the same task: p50 {pct([x.again_ms for x in p], 50):.0f} ms; server means over "
        f"the probes: adapter load {mean_ms('kronserve_adapter_load_seconds_sum'):.0f} ms, queue wait "
        f"{mean_ms('kronserve_queue_wait_seconds_sum'):.0f} ms, engine "
        f"{mean_ms(ENGINE_SUM):.0f} ms per batch"
    )


def print_goals(args: argparse.Namespace, res: Results) -> None:
    mixed, one = res.median_tput(HTTP_MIXED), res.median_tput(HTTP_ONE)
    ratio_tasks, ratio_http = mixed / one, mixed / res.median_tput(INPROC_SAME)
    p50 = pct([x.total_ms for x in res.probes], 50)
    verdict = {True: "met", False: "MISSED"}
    runs = res.runs[HTTP_MIXED]
    busy = statistics.median(r.m(ENGINE_SUM) / r.wall for r in runs)
    speed = statistics.median(r.tokens / r.m(ENGINE_SUM) for r in runs) / res.median_tput(INPROC_SAME)
    print(
        f"http/in_process ~ engine busy share {busy:.3f} x engine speed in the server vs here on the same batches "
        f"{speed:.3f} = {busy * speed:.3f}"
    )
    if INPROC_FULL in res.runs:
        full = mixed / res.median_tput(INPROC_FULL)
        print(f"HTTP {N_TASKS} tasks / in-process at full {args.max_batch_rows}-row batches: {full:.3f}")
    print(
        f"goals: tasks32/one_task >= 0.90 {verdict[ratio_tasks >= 0.90]}; http/in_process >= 0.85 "
        f"{verdict[ratio_http >= 0.85]}; upload_to_first_answer p50 <= 200 ms {verdict[p50 <= 200]}"
    )
    print(
        f"ratios tasks32/one_task={ratio_tasks:.3f} http/in_process={ratio_http:.3f} "
        f"upload_to_first_answer_p50_ms={p50:.0f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds (under 3 minutes on 2 CPU cores)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of (32 tasks, one task, in-process); 6 / 3")
    ap.add_argument("--requests", type=int, default=192, help="requests per throughput run")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    ap.add_argument("--max-batch-rows", type=int, default=64, help="KRONSERVE_MAX_BATCH_ROWS of the server")
    ap.add_argument("--probes", type=int, default=20, help="fresh tasks for upload-to-first-answer")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="KRONSERVE_BATCH_WAIT_MS (server default 5)")
    ap.add_argument("--server-threads", type=int, default=os.cpu_count() or 1, help="torch threads of the server")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of this process")
    args = ap.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 6)
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the server on SIGTERM too

    work = Path(tempfile.mkdtemp(prefix="kronserve-http-bench-"))
    env = {
        "KRONSERVE_BATCH_WAIT_MS": f"{args.batch_wait_ms:g}",
        "KRONSERVE_MAX_BATCH_ROWS": str(args.max_batch_rows),
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
