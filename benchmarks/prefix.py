"""What per-row prefixes cost a decode step: one running batch of ROWS rows, measured side by side in one run.

In-process (engine passes, as the step loop calls them) on a random T5 of the named shape, every row its own task:
  adapters   every row a Compacter++ task (no prefix: the stock attention runs);
  mixed      half the rows prefix tasks (lengths 10, 20, 30 on all three attentions, AdapterHub positions), half
             Compacter++;
  prefixes   every row a prefix task (P = 30);
  mam        every row a MAM task (P = 30 + the parallel adapter).
Each mode: prefill (encoder + first step) once, then STEPS decode steps; the median step time is reported, and
its ratio to `adapters`. Last line: `prefix step_ms_adapters=A mixed_ratio=B prefixes_ratio=C mam_ratio=D`.

    python benchmarks/prefix.py [--shape t5-small] [--rows 16] [--steps 24] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kronserve.backbone import load_backbone, write_tiny_backbone
from kronserve.engine import Engine
from kronserve.formats.native import AdapterFile
from kronserve.methods import init_tensors, preset

INPUT = "summarize: the quick brown fox jumps over the lazy dog " * 2


def load_tasks(engine: Engine, rows: int) -> dict[str, list[str]]:
    fp = engine.backbone.fingerprint
    specs = {
        "c": lambda i: preset("compacter++"),
        "p": lambda i: preset("prefix", prefix_length=(10, 20, 30)[i % 3]),
        "q": lambda i: preset("prefix", prefix_length=30),
        "m": lambda i: preset("mam", prefix_length=30),
    }
    for kind, make in specs.items():
        for i in range(rows):
            spec = make(i)
            tensors = init_tensors(spec, fp.geometry, seed=i, std=0.3)
            engine.load(AdapterFile(f"{kind}{i}", spec, fp, tensors))
    half = rows // 2
    return {
        "adapters": [f"c{i}" for i in range(rows)],
        "mixed": [f"p{i}" for i in range(half)] + [f"c{i}" for i in range(half, rows)],
        "prefixes": [f"q{i}" for i in range(rows)],
        "mam": [f"m{i}" for i in range(rows)],
    }


def step_ms(engine: Engine, tasks: list[str], steps: int) -> float:
    with engine.resident(tasks) as (_, slots):
        ids = engine.tokenize([INPUT] * len(tasks))
        pre = engine.prefill(ids, slots, [1] * len(tasks))
        batch = pre.batch
        batch.next_tokens = pre.logits.argmax(-1)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            logits = engine.step(batch)
            batch.next_tokens = logits.argmax(-1)
            if logits.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="t5-small")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(load_backbone(str(write_tiny_backbone(Path(tmp) / "bb", args.shape)), device=args.device))
        modes = load_tasks(engine, args.rows)
        step_ms(engine, modes["adapters"], 3)  # warm-up
        figures = {}
        for _ in range(2):  # interleaved rounds, the best of each: a busy machine hurts every mode alike
            for mode, tasks in modes.items():
                ms = step_ms(engine, tasks, args.steps)
                figures[mode] = min(figures.get(mode, ms), ms)
        for mode, ms in figures.items():
            print(f"{mode:>9}: {ms:8.2f} ms/step  ({ms / figures['adapters']:.2f}x adapters)")
        base = figures["adapters"]
        print(
            f"prefix step_ms_adapters={base:.2f} mixed_ratio={figures['mixed'] / base:.2f} "
            f"prefixes_ratio={figures['prefixes'] / base:.2f} mam_ratio={figures['mam'] / base:.2f}"
        )


if __name__ == "__main__":
    main()
