"""Mixed-task batches vs the alternatives, side by side in one run (issue: core engine).

t5-small-shaped random backbone, batch 32, 64 input tokens, 16 new tokens greedy (fixed length):
  (a) bare backbone, (b) all rows one task, (c) 32 distinct tasks in one batch,
  (d) per-task: one generate call per task, as PEFT/AdapterHub users serve several adapters.
Prints a table of throughput (generated tokens/s) and, last, the ratios line.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from kronserve.backbone import load_backbone, write_tiny_backbone
from kronserve.engine import Engine
from kronserve.formats.native import AdapterFile
from kronserve.methods import init_tensors, preset

BATCH, IN_TOKENS, NEW_TOKENS = 32, 64, 16


def build(shape: str, device: str, dtype: str, method: str) -> tuple[Engine, list[str]]:
    with tempfile.TemporaryDirectory(prefix="kronserve-bench-") as tmp:  # loaded, the files can go (231 MB: t5-small)
        path = write_tiny_backbone(tmp, shape, seed=0)  # type: ignore[arg-type]
        engine = Engine(load_backbone(str(path), device=device, dtype=dtype))
    spec = preset(method)
    tasks = []
    for i in range(BATCH):
        tensors = init_tensors(spec, engine.geometry, seed=i, std=0.05)
        engine.load(AdapterFile(f"task{i}", spec, engine.backbone.fingerprint, tensors))
        tasks.append(f"task{i}")
    return engine, tasks


def inputs() -> list[str]:
    # ByT5 tokenizes bytes: 63 characters + EOS = 64 tokens per row.
    return [(f"row {i}: " + "the quick brown fox jumps over the lazy dog " * 2)[: IN_TOKENS - 1] for i in range(BATCH)]


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (under 5 minutes on 2 CPU cores)")
    ap.add_argument("--shape", default="t5-small", choices=["tiny", "t5-small", "t5-base"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--method", default="compacter")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    repeats = args.repeats or (5 if args.quick else 11)
    torch.set_grad_enabled(False)

    engine, tasks = build(args.shape, args.device, args.dtype, args.method)
    xs = inputs()
    gen = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    cases: dict[str, Callable[[], object]] = {
        "bare backbone": lambda: engine.generate([None] * BATCH, xs, **gen),
        "one task, all rows": lambda: engine.generate([tasks[0]] * BATCH, xs, **gen),
        f"{BATCH} distinct tasks (mixed)": lambda: engine.generate(tasks, xs, **gen),
        "per-task forwards": lambda: [engine.generate([t], [x], **gen) for t, x in zip(tasks, xs, strict=True)],
    }
    sync = torch.cuda.synchronize if engine.backbone.device.type == "cuda" else (lambda: None)
    for fn in cases.values():  # warm-up
        timed(fn, sync)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):  # interleaved, so drift hits every case alike
        for name, fn in cases.items():
            times[name].append(timed(fn, sync))

    tokens = BATCH * NEW_TOKENS
    tput = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    print(
        f"backbone {args.shape} {args.dtype} on {engine.backbone.device}, method {args.method}, batch {BATCH}, "
        f"{IN_TOKENS} input tokens, {NEW_TOKENS} new tokens greedy, median of {repeats}"
    )
    print(f"{'case':<28} {'median s':>9} {'tokens/s':>10}")
    for name, ts in times.items():
        print(f"{name:<28} {statistics.median(ts):>9.3f} {tput[name]:>10.1f}")
    bare, single, mixed, per_task = tput.values()
    print(
        f"ratios mixed/single={mixed / single:.3f} mixed/bare={mixed / bare:.3f} mixed/per_task={mixed / per_task:.2f}"
    )


if __name__ == "__main__":
    main()
