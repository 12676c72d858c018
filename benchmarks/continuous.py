"""The step loop against the static one-`generate()`-per-batch engine, side by side in one run, and against PEFT.

Two `kronserve serve` subprocesses on 127.0.0.1 over one t5-small-shaped random backbone (ByT5 byte
tokenizer) and the same 32 Compacter++ adapters, one with `KRONSERVE_BATCHING=static` (the engine before
the step loop) and one with the default `continuous`, measured one after the other (never both at once):
  (a) head-of-line: p50 latency of short requests (2 new tokens) sent one after another while a long request
      (16 rows, 64 new tokens) runs, divided by their p50 on the idle server;
  (b) throughput in generated tokens/s of a closed loop of 32 clients over 32 tasks, one input each, output
      lengths uniform in 1..64 (min_new_tokens = max_new_tokens, seeded);
  (c) the same with every output 16 tokens;
  (e) the stall: p50 latency of a 2-token request sent while a 16-row request of ~200-token inputs is being
      admitted (the encoder work of its admission), divided by its p50 on the idle server;
  (d) PEFT's own mixed-adapter batch (`model.generate(..., adapter_names=[...])`, in this process, no HTTP) on
      8 PEFT LoRA adapters against the continuous server answering the same saved adapters (uploaded as PEFT
      directories) as 32 concurrent one-row requests, 16 new tokens; time for all 32, median of rounds.
Last line: `continuous hol=A mixed_len_speedup=B fixed_len_ratio=C vs_peft=D stall=E` (goals: A ≤ 3, B ≥ 1.5,
C ≥ 0.95, D ≥ 1.1, E ≤ 2). `--step-tokens` sets the server's KRONSERVE_MAX_STEP_TOKENS (the stall's bound).
Needs `pip install peft` for (d) (skipped, D=nan, without it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from _server import Server

from kronserve.backbone import load_backbone, write_tiny_backbone
from kronserve.formats.native import AdapterFile, dumps
from kronserve.methods import init_tensors, preset

N_TASKS, CLIENTS, PEFT_TASKS, PEFT_ROWS = 32, 32, 8, 32


def text(i: int) -> str:
    return (f"request {i}: " + "the quick brown fox jumps over the lazy dog ")[:40]


def native_adapters(backbone_dir: Path) -> dict[str, bytes]:
    bb = load_backbone(str(backbone_dir), device="cpu")
    spec = preset("compacter++")
    out = {}
    for i in range(N_TASKS):
        tensors = init_tensors(spec, bb.fingerprint.geometry, seed=i, std=0.05)
        out[f"task{i}"] = dumps(AdapterFile(f"task{i}", spec, bb.fingerprint, tensors))
    return out


def peft_adapters(backbone_dir: Path, out: Path) -> list[Path]:
    """8 PEFT LoRA adapters (r 8 on q, v) saved as PEFT writes them, with non-zero B so they matter."""
    from peft import LoraConfig, get_peft_model
    from transformers import T5ForConditionalGeneration

    dirs = []
    for i in range(PEFT_TASKS):
        torch.manual_seed(100 + i)
        model = T5ForConditionalGeneration.from_pretrained(backbone_dir)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"]))
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        peft_model.save_pretrained(out / f"lora{i}")
        dirs.append(out / f"lora{i}")
    return dirs


async def upload_all(client: httpx.AsyncClient, url: str, blobs: dict[str, bytes], peft_dirs: list[Path]) -> None:
    for task, data in blobs.items():
        (await client.put(f"{url}/v1/adapters/{task}", files={"file": ("a.safetensors", data)})).raise_for_status()
    for i, d in enumerate(peft_dirs):
        files = [("file", (p.name, p.read_bytes())) for p in sorted(d.iterdir()) if p.is_file()]
        (await client.put(f"{url}/v1/adapters/lora{i}", files=files)).raise_for_status()


async def predict(client: httpx.AsyncClient, url: str, task: str, inputs: list[str], new: int) -> float:
    body = {"task": task, "inputs": inputs, "max_new_tokens": new, "min_new_tokens": new}
    started = time.perf_counter()
    r = await client.post(f"{url}/v1/predict", json=body)
    r.raise_for_status()
    return time.perf_counter() - started


async def head_of_line(client: httpx.AsyncClient, url: str, shorts: int) -> tuple[float, float]:
    """(idle p50, p50 while a 16-row 64-token request runs) of 2-token requests sent one after another."""
    idle = [await predict(client, url, f"task{i % N_TASKS}", [text(i)], 2) for i in range(shorts)]
    long = asyncio.create_task(predict(client, url, "task0", [text(i) for i in range(16)], 64))
    await asyncio.sleep(0.05)  # the long request is admitted; every short one below is sent while it runs
    busy = []
    while not busy or not long.done():
        busy.append(await predict(client, url, f"task{len(busy) % N_TASKS}", [text(len(busy))], 2))
    await long
    return statistics.median(idle), statistics.median(busy) if busy else float("nan")


def long_text(i: int) -> str:
    return (f"long input {i}: " + "the quick brown fox jumps over the lazy dog " * 6)[:200]


async def stall(client: httpx.AsyncClient, url: str, rounds: int, delay_s: float) -> float:
    """p50 of a 2-token request sent `delay_s` after a 16-row request of 200-token inputs (2 new tokens) arrives."""
    times = []
    for r in range(rounds):
        long = asyncio.create_task(predict(client, url, "task1", [long_text(16 * r + i) for i in range(16)], 2))
        await asyncio.sleep(delay_s)
        times.append(await predict(client, url, f"task{2 + r % (N_TASKS - 2)}", [text(r)], 2))
        await long
    return statistics.median(times)


async def closed_loop(client: httpx.AsyncClient, url: str, seconds: float, lengths: list[int]) -> float:
    """Generated tokens/s of CLIENTS clients, each sending its next request when its answer comes back."""
    stop = time.perf_counter() + seconds
    tokens = 0

    async def worker(c: int) -> None:
        nonlocal tokens
        i = c
        while time.perf_counter() < stop:
            new = lengths[i % len(lengths)]
            await predict(client, url, f"task{i % N_TASKS}", [text(i)], new)
            tokens += new
            i += CLIENTS

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in range(CLIENTS)))
    return tokens / (time.perf_counter() - started)


async def burst(client: httpx.AsyncClient, url: str, rounds: int) -> float:
    """Median time for 32 concurrent one-row requests over the 8 PEFT tasks, 16 new tokens."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        jobs = [predict(client, url, f"lora{i % PEFT_TASKS}", [text(i)], 16) for i in range(PEFT_ROWS)]
        await asyncio.gather(*jobs)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def peft_time(backbone_dir: Path, peft_dirs: list[Path], rounds: int) -> float:
    from peft import PeftModel
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(backbone_dir).eval()
    peft_model = PeftModel.from_pretrained(model, peft_dirs[0], adapter_name="lora0")
    for i, d in enumerate(peft_dirs[1:], start=1):
        peft_model.load_adapter(d, adapter_name=f"lora{i}")
    tok = AutoTokenizer.from_pretrained(backbone_dir)
    enc = tok([text(i) for i in range(PEFT_ROWS)], return_tensors="pt", padding=True)
    names = [f"lora{i % PEFT_TASKS}" for i in range(PEFT_ROWS)]
    times = []
    with torch.inference_mode():
        for _ in range(rounds):
            started = time.perf_counter()
            peft_model.generate(**enc, adapter_names=names, max_new_tokens=16, min_new_tokens=16, do_sample=False)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


async def measure(url: str, blobs: dict[str, bytes], peft_dirs: list[Path], args: argparse.Namespace) -> dict:
    limits = httpx.Limits(max_connections=CLIENTS + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await upload_all(client, url, blobs, peft_dirs)
        await predict(client, url, "task0", [text(0)], 2)  # warm-up
        rng = random.Random(0)
        mixed = [rng.randint(1, 64) for _ in range(4096)]
        out = {}
        out["idle_p50"], out["busy_p50"] = await head_of_line(client, url, args.shorts)
        out["stall_p50"] = await stall(client, url, args.shorts, args.stall_delay)
        out["mixed_tps"] = await closed_loop(client, url, args.seconds, mixed)
        out["fixed_tps"] = await closed_loop(client, url, args.seconds, [16])
        if peft_dirs:
            out["burst_s"] = await burst(client, url, args.rounds)
        return out


def run_server(mode: str, backbone_dir: Path, work: Path, blobs, peft_dirs, args) -> dict:
    env = {
        "KRONSERVE_BATCHING": mode,
        "KRONSERVE_DEVICE": "cpu",
        "KRONSERVE_LOG_LEVEL": "warning",
        "KRONSERVE_QUEUE_SIZE": "1024",
        "KRONSERVE_MAX_BATCH_ROWS": "64",
    } | ({"KRONSERVE_MAX_STEP_TOKENS": str(args.step_tokens)} if args.step_tokens else {})
    server = Server(backbone_dir, work / f"store-{mode}", work / f"{mode}.log", env)
    server.start()
    try:
        return asyncio.run(measure(server.url, blobs, peft_dirs, args))
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (same shape)")
    parser.add_argument("--shape", default="t5-small", choices=["tiny", "t5-small"])
    parser.add_argument("--step-tokens", type=int, default=0, help="KRONSERVE_MAX_STEP_TOKENS (0: the default)")
    parser.add_argument("--stall-delay", type=float, default=0.05, help="seconds between the long and short request")
    args = parser.parse_args()
    args.seconds, args.shorts, args.rounds = (10, 5, 2) if args.quick else (30, 10, 3)
    try:
        import peft  # noqa: F401

        have_peft = True
    except ImportError:
        have_peft = False
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        backbone_dir = write_tiny_backbone(work / "backbone", args.shape, seed=0)
        blobs = native_adapters(backbone_dir)
        peft_dirs = peft_adapters(backbone_dir, work / "peft") if have_peft else []
        print(f"# shape={args.shape} cores={os.cpu_count()} torch={torch.__version__} seconds={args.seconds}")
        res = {mode: run_server(mode, backbone_dir, work, blobs, peft_dirs, args) for mode in ("static", "continuous")}
        peft_s = peft_time(backbone_dir, peft_dirs, args.rounds) if have_peft else float("nan")
    print(f"{'':26}{'static':>12}{'continuous':>12}")
    for key, label in (
        ("idle_p50", "short p50 idle (s)"),
        ("busy_p50", "short p50 behind long (s)"),
        ("stall_p50", "short p50 in admission (s)"),
        ("mixed_tps", "tokens/s, lengths 1..64"),
        ("fixed_tps", "tokens/s, all 16"),
        ("burst_s", "32-row PEFT burst (s)"),
    ):
        if key in res["static"]:
            print(f"{label:26}{res['static'][key]:12.3f}{res['continuous'][key]:12.3f}")
    print(f"{'PEFT in-process 32 rows (s)':26}{peft_s:12.3f}")
    c, s = res["continuous"], res["static"]
    print(f"static hol={s['busy_p50'] / s['idle_p50']:.2f}", file=sys.stderr)
    vs_peft = peft_s / c["burst_s"] if have_peft else float("nan")
    print(
        f"continuous hol={c['busy_p50'] / c['idle_p50']:.2f} mixed_len_speedup={c['mixed_tps'] / s['mixed_tps']:.2f} "
        f"fixed_len_ratio={c['fixed_tps'] / s['fixed_tps']:.2f} vs_peft={vs_peft:.2f} "
        f"stall={c['stall_p50'] / c['idle_p50']:.2f}"
    )


if __name__ == "__main__":
    main()
