"""The training run: options, epochs with early stopping, the best epoch kept and written as a native file."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..backbone import load_backbone
from ..errors import InvalidRequest, KronserveError
from ..formats.native import MAX_BASE_MODEL, AdapterFile, save
from ..methods import Geometry, MethodSpec, init_tensors, preset
from ..store import check_task_id
from ..t5_sites import base_norms, install_sites
from .data import Example, chunks, read_examples, split_examples
from .session import IGNORE, Evaluation, Session, evaluate
from .trainable import TrainablePlan


@dataclass(frozen=True)
class TrainConfig:
    """Defaults follow Compacter's recipe where it has one (lr 3e-3); the rest suit small datasets."""

    method: str = "compacter++"
    reduction_factor: int | None = None
    phm_dim: int | None = None
    rank: int | None = None
    layer_norms: bool = False
    epochs: int = 10
    batch_size: int = 16
    lr: float = 3e-3
    eval_fraction: float = 0.1
    patience: int = 3
    max_new_tokens: int | None = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    max_steps: int | None = None  # optimizer steps over all epochs; None: as many as the epochs take
    prefix_length: int | None = None  # prefix and mam

    def check(self) -> None:
        """Refuse nonsense before the backbone is loaded: a bad option should cost nothing."""
        rules = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (math.isfinite(self.lr) and self.lr > 0, f"learning rate must be a positive number, got {self.lr}"),
            (0 <= self.eval_fraction < 1, f"eval fraction must be in [0, 1), got {self.eval_fraction}"),
            (self.patience >= 1, f"patience must be at least 1 epoch, got {self.patience}"),
            (self.max_new_tokens is None or self.max_new_tokens >= 1, "max new tokens must be at least 1"),
            (self.max_steps is None or self.max_steps >= 1, f"max steps must be at least 1, got {self.max_steps}"),
        ]
        for ok, message in rules:
            if not ok:
                raise InvalidRequest(message)

    def spec(self, geometry: Geometry | None = None) -> MethodSpec:
        """The method's paper preset with these options (for `geometry`'s sizes where the preset depends on them)."""
        return preset(
            self.method,
            geometry,
            reduction_factor=self.reduction_factor,
            phm_dim=self.phm_dim,
            rank=self.rank,
            layer_norms=self.layer_norms or None,
            prefix_length=self.prefix_length,
        )


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    eval_loss: float | None
    eval_accuracy: float | None


@dataclass
class Best:
    """The epoch to keep: highest held-out accuracy, ties broken by lower held-out loss."""

    epoch: int = 0
    accuracy: float = -1.0
    loss: float = math.inf
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    predictions: list[str] = field(default_factory=list)
    last_gain: int = 0  # last epoch the accuracy strictly rose: early stopping counts from here
    start: Evaluation | None = None  # the untrained adapter's held-out numbers: what training must beat

    def offer(self, epoch: int, ev: Evaluation, plan: TrainablePlan) -> None:
        if ev.accuracy > self.accuracy:
            self.last_gain = epoch
        if (ev.accuracy, -ev.loss) > (self.accuracy, -self.loss):
            self.epoch, self.accuracy, self.loss = epoch, ev.accuracy, ev.loss
            self.tensors, self.predictions = plan.snapshot(), ev.predictions


@dataclass(frozen=True)
class TrainResult:
    adapter: AdapterFile
    path: Path
    history: list[EpochStats]
    best_epoch: int
    train_examples: int
    eval_examples: list[Example]
    eval_predictions: list[str]  # the kept epoch's greedy outputs on eval_examples
    max_new_tokens: int
    params: int
    seconds: float
    start: Evaluation | None = None
    steps: int = 0

    @property
    def improved(self) -> bool | None:
        """Did the kept epoch's held-out accuracy rise above the untrained adapter's? None without a held-out set."""
        best = next((h for h in self.history if h.epoch == self.best_epoch), None)
        if self.start is None or best is None or best.eval_accuracy is None:
            return None
        return best.eval_accuracy > self.start.accuracy

    def summary(self) -> dict[str, object]:
        best = next((h for h in self.history if h.epoch == self.best_epoch), None)
        return {
            "task": self.adapter.task,
            "method": self.adapter.spec.method,
            "out": str(self.path),
            "params": self.params,
            "train_examples": self.train_examples,
            "first_epoch_loss": self.history[0].train_loss,
            "final_train_loss": self.history[-1].train_loss,
            "best_eval_accuracy": best.eval_accuracy if best else None,
            "best_eval_loss": best.eval_loss if best else None,
            "best_epoch": self.best_epoch,
            "epochs_run": len(self.history),
            "eval_examples": len(self.eval_examples),
            "seconds": round(self.seconds, 2),
            "start_eval_accuracy": self.start.accuracy if self.start else None,
            "start_eval_loss": self.start.loss if self.start else None,
            "improved": self.improved,
            "steps": self.steps,
            "history": [asdict(h) for h in self.history],
        }


# Told after each optimizer step: (steps done, steps at most, that step's loss per target token).
Report = Callable[[int, int, float], None]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` within the block (a server trains its demo tasks with fewer threads than
    it serves with: Settings.intra_op_threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    backbone: str,
    data: str | Path,
    task: str,
    out: str | Path,
    config: TrainConfig | None = None,
    report: Report | None = None,
) -> TrainResult:
    """Train TASK's adapter on DATA, keep the best held-out epoch, and write it to OUT in the native format."""
    started = time.perf_counter()
    cfg = config or TrainConfig()
    cfg.check()
    check_task_id(task)
    if Path(out).is_dir():
        raise InvalidRequest(f"output {str(out)!r} is a directory; give the path of the .safetensors file to write")
    cfg.spec()  # bad options are refused before the backbone loads
    examples = read_examples(data)
    train_set, eval_set = split_examples(examples, cfg.eval_fraction, cfg.seed)
    session = open_session(backbone, cfg)
    spec = session.plan.spec
    max_new = cfg.max_new_tokens or longest_target(session, examples)
    history, best, steps = fit(session, train_set, eval_set, max_new, cfg, report)
    fp = session.backbone.fingerprint
    adapter = AdapterFile(task, spec, fp, best.tensors, backbone[:MAX_BASE_MODEL])  # base_model: as it was given
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save(adapter, out)
    params = sum(p.numel() for p in session.plan.parameters())
    return TrainResult(
        adapter,
        Path(out),
        history,
        best.epoch,
        len(train_set),
        eval_set,
        best.predictions,
        max_new,
        params,
        time.perf_counter() - started,
        best.start,
        steps,
    )


def open_session(source: str, cfg: TrainConfig, spec: MethodSpec | None = None) -> Session:
    """A float32 backbone of its own (the sites install into it), frozen, with the paper-initialized adapter
    (`spec`, else `cfg`'s preset for this backbone's sizes)."""
    backbone = load_backbone(source, device=cfg.device, dtype="float32")
    fp = backbone.fingerprint
    geometry = fp.geometry
    spec = spec or cfg.spec(geometry)
    norms = {k: v.float().cpu() for k, v in base_norms(backbone.model).items()}
    tensors = init_tensors(spec, geometry, seed=cfg.seed, base_norms=norms)
    backbone.model.requires_grad_(False)
    plan = TrainablePlan(spec, geometry, tensors, backbone.device, cfg.seed)
    return Session(backbone, install_sites(backbone.model, geometry), plan)


def longest_target(session: Session, examples: Sequence[Example]) -> int:
    """Room for the longest target and its EOS: a longer output cannot be an exact match anyway."""
    return max(len(ids) for ids in session.backbone.tokenizer([e.target for e in examples])["input_ids"])


def fit(
    session: Session,
    train_set: list[Example],
    eval_set: list[Example],
    max_new_tokens: int,
    cfg: TrainConfig,
    report: Report | None = None,
) -> tuple[list[EpochStats], Best, int]:
    """Epochs until `epochs`, `max_steps` optimizer steps, or `patience` epochs without a better held-out accuracy;
    returns the history, the epoch to keep (with the untrained adapter's held-out numbers) and the steps taken.

    The backbone stays in eval mode: it is frozen, and its dropout would only add noise to what the
    adapter is fitted to. No weight decay: it would pull per-task norm weights towards 0, not towards
    the backbone's.
    """
    optimizer = torch.optim.AdamW(session.plan.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    steps = math.ceil(len(train_set) / cfg.batch_size)
    budget = min(cfg.epochs * steps, cfg.max_steps or cfg.epochs * steps)
    history: list[EpochStats] = []
    best = Best(start=evaluate(session, eval_set, cfg.batch_size, max_new_tokens) if eval_set else None)
    done = 0
    with tqdm(total=budget, desc="train", unit="step", disable=not cfg.progress) as bar:
        for epoch in range(1, cfg.epochs + 1):
            order = rng.sample(train_set, len(train_set))[: (budget - done) * cfg.batch_size]
            stepped = None if report is None else (lambda i, loss, at=done: report(at + i, budget, loss))
            loss = run_epoch(session, optimizer, order, cfg.batch_size, bar, stepped)
            done += math.ceil(len(order) / cfg.batch_size)
            ev = evaluate(session, eval_set, cfg.batch_size, max_new_tokens) if eval_set else None
            history.append(EpochStats(epoch, loss, ev.loss if ev else None, ev.accuracy if ev else None))
            if ev is not None:
                best.offer(epoch, ev, session.plan)
                bar.set_description(f"train (epoch {epoch}: eval acc {ev.accuracy:.3f}, best {best.accuracy:.3f})")
                if epoch - best.last_gain >= cfg.patience:
                    break
            if done >= budget:
                break
    if not eval_set:  # nothing to choose by: keep the last epoch
        best.epoch, best.tensors = history[-1].epoch, session.plan.snapshot()
    return history, best, done


def run_epoch(
    session: Session,
    optimizer: torch.optim.Optimizer,
    order: list[Example],
    batch_size: int,
    bar: tqdm | None = None,
    stepped: Callable[[int, float], None] | None = None,
) -> float:
    """One pass; returns the epoch's mean loss per target token. `stepped` hears (steps this pass, step loss)."""
    total, tokens = 0.0, 0
    for i, chunk in enumerate(chunks(order, batch_size), 1):
        batch = session.batch(chunk)
        n = int((batch.labels != IGNORE).sum())
        loss = session.token_losses(batch)
        if not torch.isfinite(loss):
            raise KronserveError(f"training diverged: the loss is {loss.item()}; try a lower --lr")
        optimizer.zero_grad(set_to_none=True)
        (loss / n).backward()
        optimizer.step()
        total, tokens = total + loss.item(), tokens + n
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item() / n:.4f}", refresh=False)
        if stepped is not None:
            stepped(i, loss.item() / n)
    return total / tokens
