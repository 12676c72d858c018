"""kronserve soak: minutes of mixed traffic plus adapter churn against one real server; checks for leaks.

One `kronserve serve` subprocess on 127.0.0.1 with its own temporary store and a random backbone of --shape
(ByT5 byte tokenizer), --tasks adapters uploaded with PUT /v1/adapters/{task} (a pool of native files of
several methods: compacter, compacter++, pfeiffer, lora). After a warm-up (traffic and a few upload/delete
cycles, so the bank, allocator and caches reach their working size) the baseline is read: the server's
VmRSS from /proc/<pid>/status and kronserve_adapters_resident / kronserve_adapters_active from /metrics.
Then, all at once:
  * --clients closed-loop clients send predict (1-3 inputs, 4/8/16 new tokens) and score (1-3 pairs) for
    random tasks for --minutes minutes;
  * every --reupload-s seconds a random existing task gets a new version (PUT, 201);
  * --cycle-workers workers run --cycles upload/delete cycles of fresh task ids: PUT (201), one predict with
    the new task (200), DELETE (204). The cycles always all run (the traffic does not wait for them).
Every request must answer 2xx with a well-formed body: the soak's tasks are never deleted while traffic
uses them, and the queue (KRONSERVE_QUEUE_SIZE, default 256) is far larger than the requests in flight,
so there is no expected error status (no 404, no 503); anything else, or a transport error, is a failure.
The server's RSS and adapter gauges are sampled every --sample-s seconds during the soak and printed.

Exit status non-zero when: failures > 0; resident or active adapters at the end differ from the baseline;
RSS growth >= --max-growth-mb (default 100 MB); fewer cycles done than asked; the server's exit code after
SIGTERM is not 0. The last line is
`soak requests=R failures=F p50_ms=.. p99_ms=.. rss_start_mb=.. rss_end_mb=.. rss_growth_mb=..
resident_start=.. resident_end=.. cycles=N` (one line; latency over predict and score together).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _server import Server, scrape
from transformers.utils import logging as hf_logging

from kronserve.backbone import load_backbone, write_tiny_backbone
from kronserve.formats.native import AdapterFile, dumps
from kronserve.methods import init_tensors, preset

METHODS = ("compacter", "compacter++", "pfeiffer", "lora")
STD = 0.05
NEW_TOKENS = (4, 8, 16)
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "tired")
WORDS += ("otters", "sing", "near", "old", "river", "banks", "under", "grey", "skies")
MAX_ITERATIONS = 10_000_000  # a hard bound on every time-limited loop


# ---- adapters and requests -----------------------------------------------------------------------------------
def adapter_pool(backbone_dir: Path, n: int) -> list[tuple[str, bytes]]:
    """`n` native adapter files (method, bytes), methods in turn; the server serves a file under any task id."""
    backbone = load_backbone(str(backbone_dir), device="cpu", dtype="float32")
    fingerprint, geometry = backbone.fingerprint, backbone.fingerprint.geometry
    pool = []
    for i in range(n):
        method = METHODS[i % len(METHODS)]
        spec = preset(method)
        tensors = init_tensors(spec, geometry, seed=1000 + i, std=STD)
        pool.append((method, dumps(AdapterFile(f"pool-{i:02d}", spec, fingerprint, tensors))))
    return pool


def text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14)))


def predict_body(rng: random.Random, task: str) -> dict[str, Any]:
    n = rng.randint(1, 3)
    return {"task": task, "inputs": [text(rng) for _ in range(n)], "max_new_tokens": rng.choice(NEW_TOKENS)}


def score_body(rng: random.Random, task: str) -> dict[str, Any]:
    n = rng.randint(1, 3)
    return {"task": task, "inputs": [text(rng) for _ in range(n)], "targets": [text(rng) for _ in range(n)]}


def body_problem(kind: str, sent: dict[str, Any] | None, got: Any) -> str | None:
    """Why a 2xx answer is malformed, or None."""
    if kind == "predict":
        outs = got.get("outputs") if isinstance(got, dict) else None
        if not isinstance(outs, list) or len(outs) != len(sent["inputs"]) or got.get("task") != sent["task"]:
            return f"malformed predict answer {str(got)[:200]}"
    elif kind == "score":
        scores = got.get("scores") if isinstance(got, dict) else None
        if not isinstance(scores, list) or len(scores) != len(sent["inputs"]):
            return f"malformed score answer {str(got)[:200]}"
        if not all(isinstance(s, int | float) and math.isfinite(s) for s in scores):
            return f"non-finite score in {scores}"
    return None


# ---- bookkeeping --------------------------------------------------------------------------------------------
@dataclass
class Stats:
    sent: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    latency: dict[str, list[float]] = field(default_factory=lambda: {"predict": [], "score": []})
    cycles: int = 0
    reuploads: int = 0

    def fail(self, kind: str, what: str) -> None:
        self.failures[kind] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: {what}")

    @property
    def requests(self) -> int:
        return sum(self.sent.values())


@dataclass
class Sample:
    t: float
    rss_mb: float
    resident: float
    active: float
    requests: int
    cycles: int


class Soak:
    def __init__(self, args: argparse.Namespace, server: Server, pool: list[tuple[str, bytes]]) -> None:
        self.args, self.server, self.pool = args, server, pool
        self.url = server.url
        self.rng = random.Random(args.seed)
        self.tasks = [f"soak-t{i:02d}" for i in range(args.tasks)]
        self.stats = Stats()
        self.samples: list[Sample] = []
        self.client: httpx.AsyncClient | None = None

    # -- one request -------------------------------------------------------------------------------------------
    async def call(self, kind: str, method: str, path: str, expect: int, **kw: Any) -> httpx.Response | None:
        """Send one request; a transport error, another status or a malformed body is a failure."""
        assert self.client is not None
        self.stats.sent[kind] += 1
        t0 = time.perf_counter()
        try:
            r = await self.client.request(method, f"{self.url}{path}", **kw)
        except httpx.HTTPError as e:
            self.stats.fail(kind, f"{method} {path}: {type(e).__name__}: {e}")
            return None
        dt = time.perf_counter() - t0
        if r.status_code != expect:
            self.stats.fail(kind, f"{method} {path}: {r.status_code} (expected {expect}) {r.text[:200]}")
            return None
        shape = {"predict": "predict", "score": "score", "cycle_predict": "predict"}.get(kind)
        try:
            problem = body_problem(shape, kw.get("json"), r.json()) if shape else None
        except ValueError:
            problem = f"answer is not JSON: {r.text[:200]}"
        if problem:
            self.stats.fail(kind, f"{method} {path}: {problem}")
            return None
        if kind in self.stats.latency:
            self.stats.latency[kind].append(dt)
        return r

    async def upload(self, kind: str, task: str, data: bytes, raw: bool) -> bool:
        if raw:  # the API takes a native file as a raw octet-stream body or as a multipart `file` part
            kw: dict[str, Any] = {"content": data, "headers": {"content-type": "application/octet-stream"}}
        else:
            kw = {"files": {"file": ("adapter.safetensors", data)}}
        return await self.call(kind, "PUT", f"/v1/adapters/{task}", 201, **kw) is not None

    async def metrics(self) -> dict[str, float]:
        assert self.client is not None
        return await scrape(self.client, self.url)

    async def sample(self, t0: float) -> Sample:
        m = await self.metrics()
        s = Sample(
            time.monotonic() - t0,
            self.server.rss_mb(),
            m.get("kronserve_adapters_resident", float("nan")),
            m.get("kronserve_adapters_active", float("nan")),
            self.stats.requests,
            self.stats.cycles,
        )
        return s

    # -- the workers -------------------------------------------------------------------------------------------
    async def traffic(self, seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        for _ in range(MAX_ITERATIONS):
            if time.monotonic() >= deadline:
                return
            task = rng.choice(self.tasks)
            if rng.random() < 0.6:
                await self.call("predict", "POST", "/v1/predict", 200, json=predict_body(rng, task))
            else:
                await self.call("score", "POST", "/v1/score", 200, json=score_body(rng, task))

    async def reuploader(self, deadline: float) -> None:
        for i in range(MAX_ITERATIONS):
            await asyncio.sleep(self.args.reupload_s)
            if time.monotonic() >= deadline:
                return
            task = self.rng.choice(self.tasks)
            if await self.upload("reupload", task, self.rng.choice(self.pool)[1], raw=i % 2 == 0):
                self.stats.reuploads += 1

    async def cycler(self, todo: Iterator[int], prefix: str, seed: int) -> None:
        rng = random.Random(seed)
        for i in todo:  # shared by the workers: each takes the next cycle
            task = f"{prefix}-{i:05d}"
            if not await self.upload("cycle_put", task, self.pool[i % len(self.pool)][1], raw=i % 2 == 1):
                continue
            await self.call("cycle_predict", "POST", "/v1/predict", 200, json=predict_body(rng, task))
            if await self.call("cycle_delete", "DELETE", f"/v1/adapters/{task}", 204) is not None:
                self.stats.cycles += 1

    async def sampler(self, t0: float, done: asyncio.Event) -> None:
        for _ in range(MAX_ITERATIONS):
            try:
                await asyncio.wait_for(done.wait(), timeout=self.args.sample_s)
                return
            except TimeoutError:
                s = await self.sample(t0)
                self.samples.append(s)
                print(
                    f"  t={s.t:6.1f}s rss={s.rss_mb:7.1f} MB resident={s.resident:.0f} active={s.active:.0f} "
                    f"requests={s.requests} cycles={s.cycles} failures={sum(self.stats.failures.values())}",
                    flush=True,
                )

    # -- the phases --------------------------------------------------------------------------------------------
    async def setup(self) -> None:
        for i, task in enumerate(self.tasks):
            if not await self.upload("setup_put", task, self.pool[i % len(self.pool)][1], raw=False):
                raise RuntimeError(f"initial upload of {task!r} failed: {self.stats.examples[-1:]}")

    async def warm_up(self) -> None:
        deadline = time.monotonic() + self.args.warmup_s
        clients = [self.traffic(10_000 + c, deadline) for c in range(self.args.clients)]
        todo = iter(range(self.args.warmup_cycles))
        cyclers = [self.cycler(todo, "warm", 20_000 + w) for w in range(self.args.cycle_workers)]
        await asyncio.gather(*clients, *cyclers)

    async def soak(self) -> tuple[float, float]:
        """The soak proper; returns (traffic seconds, cycles seconds)."""
        t0 = time.monotonic()
        deadline = t0 + self.args.minutes * 60
        done = asyncio.Event()
        sampler = asyncio.create_task(self.sampler(t0, done))
        todo = iter(range(self.args.cycles))
        cyclers = [self.cycler(todo, "cyc", 30_000 + w) for w in range(self.args.cycle_workers)]
        cycles_end = [t0]

        async def all_cycles() -> None:
            await asyncio.gather(*cyclers)
            cycles_end[0] = time.monotonic()

        cycles_task = asyncio.create_task(all_cycles())
        clients = [self.traffic(40_000 + c, deadline) for c in range(self.args.clients)]
        await asyncio.gather(*clients, self.reuploader(deadline))
        traffic_s = time.monotonic() - t0
        await cycles_task
        cycles_s = cycles_end[0] - t0
        done.set()
        await sampler
        return traffic_s, cycles_s

    async def run(self) -> dict[str, Any]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0)) as client:
            self.client = client
            await self.setup()
            t0 = time.monotonic()
            await self.warm_up()
            warm_s = time.monotonic() - t0
            if self.stats.failures:
                raise RuntimeError(f"warm-up failures {dict(self.stats.failures)}: {self.stats.examples}")
            await asyncio.sleep(1.0)  # idle: every lease released, the engine thread settled
            start = await self.sample(time.monotonic())
            print(
                f"warm-up {warm_s:.1f} s ({self.stats.requests} requests); baseline: rss {start.rss_mb:.1f} MB, "
                f"resident {start.resident:.0f}, active {start.active:.0f}",
                flush=True,
            )
            self.stats = Stats()  # the soak's own counts from here (a warm-up failure is fatal, above)
            traffic_s, cycles_s = await self.soak()
            await asyncio.sleep(1.0)
            end = await self.sample(time.monotonic())
            listed = (await client.get(f"{self.url}/v1/adapters")).json()
            return {"start": start, "end": end, "traffic_s": traffic_s, "cycles_s": cycles_s, "listed": listed}


# ---- the report ---------------------------------------------------------------------------------------------
def pct_ms(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1e3 if xs else float("nan")


def growth_pattern(samples: list[Sample], start: Sample) -> str:
    """RSS over the soak: first half vs second half, so a plateau and a steady leak look different."""
    if len(samples) < 4:
        return "too few samples for a pattern"
    half = len(samples) // 2
    first = samples[half - 1].rss_mb - start.rss_mb
    second = samples[-1].rss_mb - samples[half - 1].rss_mb
    peak = max(s.rss_mb for s in samples)
    return (
        f"rss growth first half {first:+.1f} MB, second half {second:+.1f} MB "
        f"(to t={samples[half - 1].t:.0f}s, then to t={samples[-1].t:.0f}s), peak {peak:.1f} MB"
    )


def store_summary(store: Path) -> str:
    dirs = [d for d in store.iterdir() if d.is_dir()] if store.exists() else []
    files = sum(1 for d in dirs for f in d.iterdir() if f.suffix == ".safetensors")
    other = [p.name for p in store.iterdir() if not p.is_dir()] if store.exists() else []
    return f"{len(dirs)} task dirs, {files} version files, {len(other)} other entries"


def report(args: argparse.Namespace, soak: Soak, res: dict[str, Any], server: Server) -> None:
    st, start, end = soak.stats, res["start"], res["end"]
    lat = st.latency["predict"] + st.latency["score"]
    print()
    print(
        f"soak: {args.minutes:g} min of traffic ({res['traffic_s']:.1f} s), {args.clients} clients over "
        f"{args.tasks} tasks, a re-upload every {args.reupload_s:g} s; {st.cycles}/{args.cycles} upload/delete "
        f"cycles by {args.cycle_workers} workers, done after {res['cycles_s']:.1f} s"
    )
    print("requests sent: " + ", ".join(f"{k} {v}" for k, v in sorted(st.sent.items())) + f"; total {st.requests}")
    print(f"re-uploads done: {st.reuploads}")
    fails = sum(st.failures.values())
    print(f"failures: {fails}" + (" (" + ", ".join(f"{k} {v}" for k, v in st.failures.items()) + ")" if fails else ""))
    for ex in st.examples:
        print(f"  e.g. {ex}")
    for kind, xs in st.latency.items():
        print(f"latency {kind:<7}: n={len(xs)} p50 {pct_ms(xs, 50):.1f} ms, p99 {pct_ms(xs, 99):.1f} ms")
    print(f"latency both   : n={len(lat)} p50 {pct_ms(lat, 50):.1f} ms, p99 {pct_ms(lat, 99):.1f} ms")
    print(
        f"server rss: start {start.rss_mb:.1f} MB, end {end.rss_mb:.1f} MB, growth {end.rss_mb - start.rss_mb:+.1f} MB"
    )
    print(f"  {growth_pattern(soak.samples, start)}")
    print(
        f"adapters: resident {start.resident:.0f} -> {end.resident:.0f}, active {start.active:.0f} -> "
        f"{end.active:.0f}; GET /v1/adapters lists {len(res['listed'])}"
    )
    print(f"store on disk at the end: {store_summary(server.store)}")


def verdict(args: argparse.Namespace, soak: Soak, res: dict[str, Any], rc: int | None) -> list[str]:
    st, start, end = soak.stats, res["start"], res["end"]
    problems = []
    if sum(st.failures.values()) > 0:
        problems.append(f"failures: {sum(st.failures.values())} requests failed")
    if end.resident != start.resident:
        problems.append(f"resident adapters did not return to baseline: {start.resident:.0f} -> {end.resident:.0f}")
    if end.active != start.active:
        problems.append(f"active adapters did not return to baseline: {start.active:.0f} -> {end.active:.0f}")
    if end.rss_mb - start.rss_mb >= args.max_growth_mb:
        problems.append(f"rss growth {end.rss_mb - start.rss_mb:.1f} MB >= {args.max_growth_mb:g} MB")
    if st.cycles != args.cycles:
        problems.append(f"cycles done {st.cycles} != {args.cycles} asked")
    if rc != 0:
        problems.append(f"server exit code after SIGTERM was {rc}, not 0")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=2.0, help="minutes of mixed traffic")
    ap.add_argument("--cycles", type=int, default=1000, help="upload/predict/delete cycles of fresh task ids")
    ap.add_argument("--shape", choices=("tiny", "t5-small"), default="tiny", help="random backbone's shape")
    ap.add_argument("--tasks", type=int, default=24, help="tasks the traffic is spread over")
    ap.add_argument("--clients", type=int, default=8, help="concurrent traffic clients (closed loop)")
    ap.add_argument("--cycle-workers", type=int, default=2, help="concurrent upload/delete cycle workers")
    ap.add_argument("--reupload-s", type=float, default=3.0, help="seconds between re-uploads of existing tasks")
    ap.add_argument("--warmup-s", type=float, default=15.0, help="seconds of warm-up traffic before the baseline")
    ap.add_argument("--warmup-cycles", type=int, default=20, help="upload/delete cycles during the warm-up")
    ap.add_argument("--sample-s", type=float, default=10.0, help="seconds between rss / gauge samples")
    ap.add_argument("--max-growth-mb", type=float, default=100.0, help="rss growth that fails the soak")
    ap.add_argument("--pool", type=int, default=16, help="distinct adapter files (methods in turn)")
    ap.add_argument("--server-threads", type=int, default=os.cpu_count() or 1, help="torch threads of the server")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the server on SIGTERM too

    work = Path(tempfile.mkdtemp(prefix="kronserve-soak-"))
    env = {
        "KRONSERVE_DEVICE": "cpu",
        "KRONSERVE_LOG_LEVEL": "warning",
        "OMP_NUM_THREADS": str(args.server_threads),
        "MKL_NUM_THREADS": str(args.server_threads),
    }
    server = Server(work / "backbone", work / "store", work / "server.log", env)
    ok, rc, res, soak = False, None, None, None
    try:
        t0 = time.perf_counter()
        write_tiny_backbone(server.backbone, args.shape, seed=0)
        pool = adapter_pool(server.backbone, args.pool)
        server.start()
        print(
            f"setup {time.perf_counter() - t0:.1f} s; server pid {server.pid} on {server.url}, shape {args.shape}, "
            f"{os.cpu_count()} cores, server env " + " ".join(f"{k}={v}" for k, v in env.items()),
            flush=True,
        )
        soak = Soak(args, server, pool)
        res = asyncio.run(soak.run())
        report(args, soak, res, server)
        ok = True
    finally:
        if not ok:
            print(f"--- server log tail ---\n{server.log_tail()}", file=sys.stderr)
        rc = server.stop()
        print(f"server stopped with SIGTERM, exit code {rc}", flush=True)
        log = server.log_tail(2000).strip()
        if log:
            print(f"server log (last 2000 chars):\n{log}")
        shutil.rmtree(work, ignore_errors=True)
    problems = verdict(args, soak, res, rc)
    for p in problems:
        print(f"FAIL: {p}")
    if not problems:
        print("PASS: no failures, adapters back to baseline, rss growth under the limit")
    st, start, end = soak.stats, res["start"], res["end"]
    lat = st.latency["predict"] + st.latency["score"]
    print(
        f"soak requests={st.requests} failures={sum(st.failures.values())} p50_ms={pct_ms(lat, 50):.1f} "
        f"p99_ms={pct_ms(lat, 99):.1f} rss_start_mb={start.rss_mb:.1f} rss_end_mb={end.rss_mb:.1f} "
        f"rss_growth_mb={end.rss_mb - start.rss_mb:.1f} resident_start={start.resident:.0f} "
        f"resident_end={end.resident:.0f} cycles={st.cycles}"
    )
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
