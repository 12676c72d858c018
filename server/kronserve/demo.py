"""The demo tasks a first start on the offline demo backbone serves, so the README's first curl answers.

Two small keyword tasks, `sentiment` (-> positive / negative) and `topic` (-> sports / food), are trained once
with `kronserve train`'s own code (`train.train` on a generated .jsonl) and cached under the cache dir, keyed
by the backbone's fingerprint and a digest of the recipe: a second start loads the files in milliseconds, and
any change to the recipe (data, options) trains anew. Training is seeded, so the files are reproducible.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .backbone import Fingerprint
from .train import Example, TrainConfig, TrainResult, train

log = logging.getLogger(__name__)
LOG_EVERY_S = 3.0  # a first start's demo training says where it is this often


@dataclass(frozen=True)
class DemoTask:
    """A keyword task: each input is a template around one keyword; the keyword's class is the target."""

    name: str
    keywords: dict[str, tuple[str, ...]]  # target -> the words that mean it
    templates: tuple[str, ...]  # each holds "{w}" once, and "{s}" at most once
    subjects: tuple[str, ...] = ("",)

    def examples(self, n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[Example]:
        """`n` distinct examples (none of whose inputs is in `exclude`), the same ones for the same seed."""
        rng, seen, out = random.Random(seed), set(exclude), []
        targets = sorted(self.keywords)
        for _ in range(100 * n):  # enough draws to find n distinct inputs where that many exist
            if len(out) == n:
                break
            target = rng.choice(targets)
            text = rng.choice(self.templates).format(w=rng.choice(self.keywords[target]), s=rng.choice(self.subjects))
            if text not in seen:
                seen.add(text)
                out.append(Example(text, target))
        if len(out) < n:
            raise ValueError(
                f"demo task {self.name!r} has fewer than {n} distinct inputs outside the {len(exclude)} excluded"
            )
        return out


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split("|"))


SENTIMENT = DemoTask(
    "sentiment",
    {
        "positive": ("great", "wonderful", "lovely", "superb", "excellent", "brilliant", "delightful", "amazing"),
        "negative": ("awful", "terrible", "boring", "dreadful", "horrible", "dull", "poor", "disappointing"),
    },
    ("{w} {s}", "a {w} {s}", "the {s} was {w}", "what a {w} {s}", "really {w} {s}", "such a {w} {s}", "so {w}!"),
    ("film", "meal", "trip", "service", "book", "concert", "hotel", "game", "day", "show", "song", "party"),
)
TOPIC = DemoTask(
    "topic",
    {
        "sports": _words("football|tennis|rugby|golf|cricket|hockey|baseball|boxing|cycling|skiing|racing|chess"),
        "food": _words("pizza|soup|bread|cheese|pasta|salad|dessert|noodles|curry|cake|cookie|burger"),
    },
    ("{w} {s}", "the {w} {s}", "our {w} {s}", "a new {w} {s}", "{w} {s} tonight", "all about {w}", "more {w}!"),
    ("news", "club", "fans", "night", "lesson", "shop", "show", "magazine", "festival", "week", "podcast", "blog"),
)
DEMO_TASKS = (SENTIMENT, TOPIC)
TRAIN_EXAMPLES = 640
# Compacter with per-task layer norms at a high rate: on the demo backbone, 0.95-1.0 held-out in 200-300 steps;
# early stopping (patience) ends a run a few epochs after its best.
RECIPE = TrainConfig(
    method="compacter", layer_norms=True, lr=2e-2, epochs=12, batch_size=16, patience=3, progress=False, device="cpu"
)


def recipe_digest() -> str:
    """Changes whenever anything that decides the trained files does: a cached file of another recipe is stale."""
    recipe = {"tasks": [asdict(t) for t in DEMO_TASKS], "examples": TRAIN_EXAMPLES, "config": asdict(RECIPE)}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def cache_folder(cache_dir: Path, fingerprint: Fingerprint) -> Path:
    return Path(cache_dir) / "demo-adapters" / f"{fingerprint.digest[:12]}-{recipe_digest()}"


def demo_adapters(
    source: str, fingerprint: Fingerprint, cache_dir: Path, status: Callable[[str], None] | None = None
) -> dict[str, Path]:
    """Task -> its trained native file, trained now (once) for any task not cached yet.

    Each file is written beside its final name and renamed into place, so a start killed mid-training leaves
    no file that a later start would take for a finished one. Training logs its progress every few seconds and
    tells `status` (what /readyz says meanwhile) at each step: a slow first start is never silent.
    """
    folder = cache_folder(cache_dir, fingerprint)
    files = {t.name: folder / f"{t.name}.safetensors" for t in DEMO_TASKS}
    todo = [t for t in DEMO_TASKS if not files[t.name].is_file()]
    if todo:
        log.info("training demo adapters %s on the demo backbone, once (about 20 s on 2 free CPU cores); cached in %s",
                 [t.name for t in todo], folder)  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
    for task in todo:
        started = time.perf_counter()
        result = _train(task, source, folder, _Progress(task.name, started, status))
        os.replace(result.path, files[task.name])
        summary = result.summary()
        log.info("demo adapter %r: held-out accuracy %.2f after %d steps, %.1f s",
                 task.name, summary["best_eval_accuracy"], result.steps, time.perf_counter() - started)  # fmt: skip
    return files


class _Progress:
    """`train`'s report: a log line at the first step and then every LOG_EVERY_S (step, loss, elapsed); the status
    at each step."""

    def __init__(self, task: str, started: float, status: Callable[[str], None] | None) -> None:
        self.task, self.started, self.status = task, started, status
        self.logged = started

    def __call__(self, step: int, steps: int, loss: float) -> None:
        now = time.perf_counter()
        if self.status is not None:
            self.status(f"training demo adapters ({self.task}: step {step} of at most {steps})")
        if step == 1 or step == steps or now - self.logged >= LOG_EVERY_S:
            self.logged = now
            log.info("demo adapter %r: step %d of at most %d, loss %.3f, %.1f s",
                     self.task, step, steps, loss, now - self.started)  # fmt: skip


def _train(task: DemoTask, source: str, folder: Path, report: _Progress) -> TrainResult:
    """`kronserve train` on the task's generated rows, on the CPU (seeded: the same files on every machine)."""
    data = folder / f"{task.name}.{os.getpid()}.jsonl"
    rows = task.examples(TRAIN_EXAMPLES, seed=0)
    data.write_text("".join(json.dumps({"input": e.input, "target": e.target}) + "\n" for e in rows))
    try:
        return train(source, data, task.name, folder / f"{task.name}.{os.getpid()}.part", RECIPE, report)
    finally:
        data.unlink()


def training_inputs(task: DemoTask) -> frozenset[str]:
    """What the demo adapters were trained on: held-out checks draw outside it."""
    return frozenset(e.input for e in task.examples(TRAIN_EXAMPLES, seed=0))
