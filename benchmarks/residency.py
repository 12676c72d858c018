"""Tiered residency at catalogue scale: N stored Compacter++ adapters, a device budget far below N, Zipf traffic.

In-process (the engine, registry and step loop a server runs; no HTTP, so the figures are the tiers' own), over a
real local store on disk and a random T5 of the named shape (ByT5 byte tokenizer):
  start-up   `Registry.load_store` over N stored versions: headers only, no weights; then again in a fresh engine,
             as a restart does, with the snapshot the first wrote (pointers and file sizes only);
  cold miss  on the idle engine, a request for a never-used task (store read + validate + pack + device copy) against
             one for a device-resident task, one after the other, alternating; added = p50(cold) - p50(hot);
  memory     RSS growth with every one of the N adapters packed in the host tier, per adapter, against its tensor
             bytes (float32 parameters);
  workload   a closed loop of CLIENTS clients, each request's task drawn from Zipf(s=1) over the first n tasks, for
             n = 1 and n = N, device budget DEVICE_ADAPTERS adapters: p50/p99 of hot requests (adapter on the device
             at submission), device hit rate;
  kernel     one site over a batch, compact PHM (from the factors) against the same adapters materialized dense.
Last line: `residency memory_ratio=A startup_s=B restart_s=R hot_p50_ratio=C cold_added_ms=D device_hit_rate=E`
(goals: A <= 1.5, B (and the restart's R) <= 10 with 100,000 stored on the tiny shape, C <= 1.10, D <= 50 on
t5-small).

    python benchmarks/residency.py            # tiny shape N=100,000, then t5-small N=10,000
    python benchmarks/residency.py --quick    # t5-small, N=1,000, shorter phases
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kronserve.backbone import load_backbone, write_tiny_backbone
from kronserve.compact import Compact, layout_of
from kronserve.engine import Engine
from kronserve.formats.native import AdapterFile, dumps
from kronserve.loop import Bounds
from kronserve.messages import GenerationParams
from kronserve.methods import init_tensors, preset
from kronserve.methods.base import AdapterSpec
from kronserve.metrics import Metrics
from kronserve.plan import Route
from kronserve.scheduler import Scheduler
from kronserve.store import sha256_of

DISTINCT, CLIENTS, DEVICE_ADAPTERS = 16, 8, 64
PARAMS = GenerationParams(max_new_tokens=8, min_new_tokens=8)
TEXT = "a request of the zipf workload"


def build_store(root: Path, backbone_dir: Path, n: int) -> int:
    """N tasks in LocalStore's layout (task dir, version file, ACTIVE pointer), written without LocalStore's
    per-file fsyncs so 100,000 take seconds; DISTINCT different adapters cycle. Returns one adapter's tensor bytes."""
    bb = load_backbone(str(backbone_dir), device="cpu")
    spec, geometry = preset("compacter++"), bb.fingerprint.geometry
    files = [
        dumps(AdapterFile("t", spec, bb.fingerprint, init_tensors(spec, geometry, seed=k, std=0.05)))
        for k in range(DISTINCT)
    ]
    if not (root / "DONE").exists():
        for i in range(n):
            data = files[i % DISTINCT]
            sha = sha256_of(data)
            name = f"v000001-{sha[:16]}.safetensors"
            task = root / f"t{i:06d}"
            task.mkdir(parents=True, exist_ok=True)
            (task / name).write_bytes(data)
            (task / "ACTIVE").write_text(json.dumps({"version": 1, "sha256": sha, "file": name}))
        (root / "EPOCH").write_text("bench")
        (root / "DONE").write_text(str(n))
    return spec.param_count(geometry) * 4


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Zipf:
    def __init__(self, n: int, seed: int) -> None:
        weights, total = [], 0.0
        for k in range(1, n + 1):
            total += 1.0 / k
            weights.append(total)
        self.cumulative, self.rng = weights, random.Random(seed)

    def draw(self) -> int:
        return bisect.bisect_left(self.cumulative, self.rng.random() * self.cumulative[-1])


async def ask(sched: Scheduler, task: str, ids: list[list[int]]) -> tuple[float, str]:
    engine = sched.engine
    (entry,) = engine.registry.acquire([task])
    tier = engine.registry.tier(entry)
    started = time.perf_counter()
    await sched.submit(entry, ids, None, PARAMS)
    return time.perf_counter() - started, tier


def counter(engine: Engine, name: str, tier: str) -> float:
    return getattr(engine.device.metrics, name).labels(tier)._value.get()


async def workload(sched: Scheduler, n: int, seconds: float, ids: list[list[int]]) -> dict[str, float]:
    engine, zipf = sched.engine, Zipf(n, seed=n)
    hits0, misses0 = counter(engine, "tier_hits", "device"), counter(engine, "tier_misses", "device")
    hot: list[float] = []
    end = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < end:
            latency, tier = await ask(sched, f"t{zipf.draw():06d}", ids)
            if tier == "device":
                hot.append(latency)

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    hits = counter(engine, "tier_hits", "device") - hits0
    misses = counter(engine, "tier_misses", "device") - misses0
    q = statistics.quantiles(hot, n=100)
    return {"hot_p50": q[49], "hot_p99": q[98], "requests": len(hot), "hit_rate": hits / max(hits + misses, 1)}


async def cold_misses(sched: Scheduler, n: int, pairs: int, ids: list[list[int]]) -> tuple[float, float]:
    await ask(sched, "t000000", ids)  # resident from here on
    hot, cold = [], []
    for i in range(pairs):
        hot.append((await ask(sched, "t000000", ids))[0])
        latency, tier = await ask(sched, f"t{n - 1 - i:06d}", ids)  # never asked before
        assert tier == "store", tier
        cold.append(latency)
    return statistics.median(hot), statistics.median(cold)


def kernel_figures(engine: Engine, rows: int, tokens: int, rounds: int = 50) -> tuple[float, float]:
    """Seconds per site for `rows` rows of distinct adapters: compact PHM against the same adapters dense."""
    entries = [engine.registry.get(f"t{i:06d}") for i in range(rows)]
    packed = [engine.registry.fetch(e) for e in entries]
    slots = engine.hold(entries, packed)
    geometry = engine.geometry
    dense_entries = []
    for e in entries:  # the same adapters as dense bottlenecks (what a dense device cache would hold)
        adapter = AdapterFile(e.task, e.spec, engine.backbone.fingerprint, _tensors(engine, e))
        parts = AdapterSpec.compact_own(e.spec, geometry, adapter.tensors)
        shapes = tuple((k, tuple(v.shape)) for k, v in parts.items())
        layout = layout_of("bottleneck", e.spec.activation, e.spec.placement, shapes)
        flat = torch.cat([v.reshape(-1) for v in parts.values()]).to(engine.device.dtype)
        dense_entries.append(((e.task, "dense"), e.task, Compact(layout, flat)))
    with engine._forward_lock:
        dense_slots = engine.device.hold(dense_entries)
    site = engine.device.names.sites.index("encoder.0.ffn")
    x = torch.randn(rows, tokens, geometry.d_model, device=engine.backbone.device)
    out = []
    for s in (slots, dense_slots):
        plan = engine.device.plan(Route.of(s, x.device))
        with torch.inference_mode():
            plan.delta(site, x, x)
            started = time.perf_counter()
            for _ in range(rounds):
                plan = engine.device.plan(Route.of(s, x.device))
                plan.delta(site, x, x)
            if x.is_cuda:
                torch.cuda.synchronize()
        out.append((time.perf_counter() - started) / rounds)
    return out[0], out[1]


def _tensors(engine: Engine, entry) -> dict[str, torch.Tensor]:
    from kronserve.formats.native import loads
    from kronserve.store import VersionRef

    data = engine.registry.store.read(VersionRef(entry.task, entry.version, entry.sha256))
    return loads(data, engine.backbone.fingerprint).tensors


def run(shape: str, n: int, seconds: float, pairs: int, work: Path, device: str) -> dict[str, float]:
    backbone_dir = work / f"backbone-{shape}"
    if not (backbone_dir / "config.json").exists():
        write_tiny_backbone(backbone_dir, shape, seed=0)
    store_dir = work / f"store-{shape}-{n}"
    size = build_store(store_dir, backbone_dir, n)
    from kronserve.store import LocalStore

    bb = load_backbone(str(backbone_dir), device=device)
    engine = Engine(
        bb,
        store=LocalStore(store_dir),
        metrics=Metrics(),
        host_adapter_mb=2 * n * size / 2**20 + 64,
        device_adapter_mb=DEVICE_ADAPTERS * size / 2**20,
    )
    snapshot = work / f"snapshot-{shape}-{n}.json"
    snapshot.unlink(missing_ok=True)
    started = time.perf_counter()
    indexed = engine.registry.load_store(snapshot=snapshot)
    startup = time.perf_counter() - started
    assert len(indexed) == n
    again = Engine(load_backbone(str(backbone_dir), device=device), store=LocalStore(store_dir), metrics=Metrics())
    started = time.perf_counter()
    assert len(again.registry.load_store(snapshot=snapshot)) == n
    restart = time.perf_counter() - started
    del again
    print(
        f"[{shape} N={n} {device}] start-up: indexed {n} stored adapters in {startup:.2f} s from their headers, "
        f"{restart:.2f} s on a restart with the start-up snapshot (no weights read either way)"
    )

    ids = engine.tokenize([TEXT])
    bounds = Bounds(rows=64, pass_tokens=16384, cached_tokens=262144, wait_s=0.002)

    async def serve() -> tuple:
        sched = Scheduler(engine, engine.device.metrics, bounds, queue_size=1024, timeout_s=600)
        sched.start()
        hot, cold = await cold_misses(sched, n, pairs, ids)
        before = rss()
        await asyncio.to_thread(lambda: [engine.registry.fetch(e) for e in engine.registry.entries()])
        per_adapter = (rss() - before) / n
        one = await workload(sched, 1, seconds, ids)
        many = await workload(sched, n, seconds, ids)
        await sched.drain_and_stop()
        return hot, cold, per_adapter, one, many

    hot, cold, per_adapter, one, many = asyncio.run(serve())
    print(f"[{shape} N={n}] cold miss: p50 {cold * 1e3:.1f} ms vs hot {hot * 1e3:.1f} ms: +{(cold - hot) * 1e3:.1f} ms")
    print(
        f"[{shape} N={n}] memory: {per_adapter / 1024:.1f} KiB per registered adapter in the host tier, "
        f"tensors {size / 1024:.1f} KiB: {per_adapter / size:.2f}x"
    )
    for label, r in (("n=1", one), (f"n={n}", many)):
        print(
            f"[{shape} N={n}] workload {label}: hot p50 {r['hot_p50'] * 1e3:.1f} ms p99 {r['hot_p99'] * 1e3:.1f} ms "
            f"over {r['requests']} hot requests, device hit rate {r['hit_rate']:.3f}"
        )
    compact_s, dense_s = kernel_figures(engine, rows=16, tokens=1)
    print(
        f"[{shape} N={n}] kernel: one site, 16 rows of distinct adapters: compact {compact_s * 1e6:.0f} us, "
        f"dense {dense_s * 1e6:.0f} us; device bytes per adapter compact {size} vs dense "
        f"{_dense_bytes(engine)}"
    )
    return {
        "memory_ratio": per_adapter / size,
        "startup_s": startup,
        "restart_s": restart,
        "hot_p50_ratio": many["hot_p50"] / one["hot_p50"],
        "cold_added_ms": (cold - hot) * 1e3,
        "device_hit_rate": many["hit_rate"],
    }


def _dense_bytes(engine: Engine) -> int:
    spec, geometry = preset("compacter++"), engine.geometry
    per_site = 2 * geometry.d_model * spec.bottleneck(geometry) + spec.bottleneck(geometry) + geometry.d_model
    return per_site * len(spec.active_sites(geometry)) * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="t5-small, N=1,000, short phases")
    parser.add_argument("--shape", choices=("tiny", "t5-small"), help="only this shape (with --n)")
    parser.add_argument("--n", type=int, help="stored adapters for --shape (default: 100,000 tiny, 10,000 t5-small)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (where the backbone and the device tier live)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kronserve-residency-bench")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    args.work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        results = {"t5-small": run("t5-small", 1000, 6, 10, args.work, args.device)}
    elif args.shape:
        n = args.n or {"tiny": 100_000, "t5-small": 10_000}[args.shape]
        results = {args.shape: run(args.shape, n, 20, 30, args.work, args.device)}
    else:
        results = {
            "tiny": run("tiny", 100_000, 15, 20, args.work, args.device),
            "t5-small": run("t5-small", 10_000, 20, 30, args.work, args.device),
        }
    small = results.get("t5-small", next(iter(results.values())))
    start = results.get("tiny", small)
    print(
        f"residency memory_ratio={max(r['memory_ratio'] for r in results.values()):.2f} "
        f"startup_s={start['startup_s']:.2f} restart_s={start['restart_s']:.2f} "
        f"hot_p50_ratio={small['hot_p50_ratio']:.2f} "
        f"cold_added_ms={small['cold_added_ms']:.1f} device_hit_rate={small['device_hit_rate']:.3f}"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
