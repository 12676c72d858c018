"""Training one task's adapter on the frozen backbone, through the very wiring the server serves with.

The trainer installs the same routed modules as the engine (`install_sites`) and drives them with a
`TrainablePlan`, whose deltas come from the file's own tensors through `spec.dense` (`spec.low_rank`
for LoRA), the functions the bank materializes a loaded file with. So the tensors that are optimized
are exactly the tensors written to the native file, and the server's outputs on that file match the
trainer's held-out predictions (one code path, not a re-implementation).
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .backbone import Backbone, load_backbone
from .errors import InvalidRequest, KronserveError
from .formats.native import AdapterFile, save
from .kernels import ACTIVATIONS
from .methods import AdapterSpec, Geometry, LoraSpec, MethodSpec, init_tensors, preset
from .store import check_task_id
from .t5_sites import SiteRouter, base_norms, install_sites

IGNORE = -100  # label of right padding: cross-entropy skips it


# ---- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    input: str
    target: str


def read_examples(path: str | Path) -> list[Example]:
    """Examples of a .jsonl or .csv file; every problem is reported with its line, before any training."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequest(f"data file {str(path)!r} does not exist")
    readers = {".jsonl": _read_jsonl, ".csv": _read_csv}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise InvalidRequest(f"data file {path.name!r} must end in .jsonl or .csv")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"data file {path.name!r} is not UTF-8 text: {e.reason} at byte {e.start}") from e
    examples = reader(text, path.name)
    if not examples:
        raise InvalidRequest(f"data file {path.name!r} holds no examples")
    return examples


def _read_jsonl(text: str, name: str) -> list[Example]:
    examples = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise InvalidRequest(f"{name} line {lineno} is not JSON: {e}") from e
        if not isinstance(row, dict):
            raise InvalidRequest(f'{name} line {lineno} must be an object {{"input": ..., "target": ...}}')
        examples.append(_example(row, f"{name} line {lineno}"))
    return examples


def _read_csv(text: str, name: str) -> list[Example]:
    reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted fields may span lines
    columns = reader.fieldnames or []
    missing = [c for c in ("input", "target") if c not in columns]
    if missing:
        raise InvalidRequest(f"{name} needs a header with columns input,target; missing {missing} in {columns}")
    return [_example(row, f"{name} line {reader.line_num}") for row in reader]


def _example(row: dict[str, Any], where: str) -> Example:
    for key in ("input", "target"):
        if key not in row or row[key] is None:
            raise InvalidRequest(f"{where} has no {key!r}")
        if not isinstance(row[key], str):
            raise InvalidRequest(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}")
    return Example(row["input"], row["target"])


def split_examples(examples: Sequence[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): a seeded shuffle, so a rerun holds out the same rows; at least one of each."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(order) * eval_fraction)) if eval_fraction > 0 else 0
    if len(order) - n_eval < 1:
        raise InvalidRequest(
            f"{len(order)} examples leave none to train on after holding out {n_eval} (eval fraction {eval_fraction})"
        )
    return order[n_eval:], order[:n_eval]


# ---- the plan the routed sites call --------------------------------------------------------------


class TrainablePlan:
    """The `SitePlan` for one task on every row, differentiable in the adapter's tensors.

    `params` holds the native file's tensors by their native names, as float32 leaves. `spec.dense`
    (`spec.low_rank` for LoRA) turns them into each site's weights on every call, as the bank does on
    load, so the gradient reaches the stored form (PHM rule and factors, not a materialized matrix)
    and nothing needs converting before `save`.
    """

    def __init__(
        self, spec: MethodSpec, geometry: Geometry, tensors: dict[str, torch.Tensor], device: torch.device
    ) -> None:
        self.spec = spec
        self.params = {n: nn.Parameter(t.detach().to(device, torch.float32).clone()) for n, t in tensors.items()}
        self._sites = _indexed(
            geometry.all_sites(), spec.active_sites(geometry) if isinstance(spec, AdapterSpec) else []
        )
        self._linears = _indexed(
            geometry.all_linears(), spec.active_linears(geometry) if isinstance(spec, LoraSpec) else []
        )
        self._norms = geometry.all_norms()
        self.use_norms = spec.layer_norms

    def acts_at(self, site: int) -> bool:
        return site in self._sites

    def delta(self, site: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        assert isinstance(spec, AdapterSpec)  # only bottleneck specs have sites
        a = spec.dense(self.params, self._sites[site])
        z = adapter_input(spec.placement, x, f).to(torch.float32)
        out = ACTIVATIONS[spec.activation](z @ a.down_w + a.down_b) @ a.up_w + a.up_b
        return out.to(x.dtype)

    def lora_acts_at(self, linear: int) -> bool:
        return linear in self._linears

    def lora_delta(self, linear: int, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        assert isinstance(spec, LoraSpec)  # only LoRA specs have projections
        a, b = spec.low_rank(self.params, self._linears[linear])
        return (x.to(torch.float32) @ a @ b).to(x.dtype)

    def norm_weight(self, norm: int) -> torch.Tensor:
        """The task's weight as [1, 1, d]: every row is the same task, so it broadcasts."""
        return self.params[self._norms[norm]].view(1, 1, -1)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.params.values())

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies, so keeping the best epoch survives later optimizer steps."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}


def _indexed(order: list[str], names: list[str]) -> dict[int, str]:
    """Position in the backbone's fixed order (what the installed modules pass) -> name in the file."""
    index = {name: i for i, name in enumerate(order)}
    return {index[n]: n for n in names}


def adapter_input(placement: str, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """What the adapter reads, as the bank defines it: Houlsby the sublayer output, Pfeiffer the sum, parallel x."""
    match placement:
        case "houlsby":
            return f
        case "pfeiffer":
            return x + f
        case "parallel":
            return x
    raise ValueError(f"unknown placement {placement!r}")


# ---- batches, loss, evaluation ---------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    inputs: dict[str, torch.Tensor]
    decoder_input_ids: torch.Tensor
    labels: torch.Tensor  # IGNORE on right padding


@dataclass
class Session:
    """The routed backbone and the plan that trains on it: what every step and every evaluation needs."""

    backbone: Backbone
    router: SiteRouter
    plan: TrainablePlan

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.backbone.tokenizer(list(texts), return_tensors="pt", padding=True)
        return {k: v.to(self.backbone.device) for k, v in enc.items()}

    def batch(self, examples: Sequence[Example]) -> Batch:
        """Teacher forcing as `Engine.score` does it: targets with EOS, shifted right behind the start token."""
        lab = self.encode([e.target for e in examples])
        ids = lab["input_ids"]
        start = torch.full_like(ids[:, :1], self.backbone.model.config.decoder_start_token_id)
        labels = ids.masked_fill(lab["attention_mask"] == 0, IGNORE)
        return Batch(self.encode([e.input for e in examples]), torch.cat([start, ids[:, :-1]], dim=1), labels)

    def token_losses(self, batch: Batch) -> torch.Tensor:
        """Cross-entropy summed over the target tokens: batches of different lengths then average per token."""
        with self.router.activate(self.plan):
            logits = self.backbone.model(**batch.inputs, decoder_input_ids=batch.decoder_input_ids).logits
        return F.cross_entropy(
            logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE, reduction="sum"
        )

    def generate(self, inputs: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy decoding with the arguments `Engine.generate` uses, so the server reproduces these outputs."""
        tok = self.backbone.tokenizer
        with torch.no_grad(), self.router.activate(self.plan):
            out = self.backbone.model.generate(
                **self.encode(inputs),
                max_new_tokens=max_new_tokens,
                min_new_tokens=0,
                num_beams=1,
                num_return_sequences=1,
                do_sample=False,
            )
        return tok.batch_decode(out, skip_special_tokens=True)


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    predictions: list[str]


def evaluate(session: Session, examples: Sequence[Example], batch_size: int, max_new_tokens: int) -> Evaluation:
    """Mean token loss and exact-match accuracy of greedy outputs: the loss moves before the accuracy does."""
    total, tokens, predictions = 0.0, 0, []
    for chunk in chunks(examples, batch_size):
        batch = session.batch(chunk)
        with torch.no_grad():
            total += session.token_losses(batch).item()
        tokens += int((batch.labels != IGNORE).sum())
        predictions += session.generate([e.input for e in chunk], max_new_tokens)
    hits = sum(p == e.target for p, e in zip(predictions, examples, strict=True))
    return Evaluation(total / tokens, hits / len(examples), predictions)


def chunks(items: Sequence[Example], size: int) -> Iterator[Sequence[Example]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ---- the loop ---------------------------------------------------------------------------------------


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


def train(
    backbone: str, data: str | Path, task: str, out: str | Path, config: TrainConfig | None = None
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
    history, best, steps = fit(session, train_set, eval_set, max_new, cfg)
    fp = session.backbone.fingerprint
    adapter = AdapterFile(task, spec, fp, best.tensors)
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
    plan = TrainablePlan(spec, geometry, tensors, backbone.device)
    return Session(backbone, install_sites(backbone.model, geometry), plan)


def longest_target(session: Session, examples: Sequence[Example]) -> int:
    """Room for the longest target and its EOS: a longer output cannot be an exact match anyway."""
    return max(len(ids) for ids in session.backbone.tokenizer([e.target for e in examples])["input_ids"])


def fit(
    session: Session, train_set: list[Example], eval_set: list[Example], max_new_tokens: int, cfg: TrainConfig
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
            loss = run_epoch(session, optimizer, order, cfg.batch_size, bar)
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
) -> float:
    """One pass; returns the epoch's mean loss per target token."""
    total, tokens = 0.0, 0
    for chunk in chunks(order, batch_size):
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
    return total / tokens


# ---- upload and the command ---------------------------------------------------------------------------


def upload(path: Path, task: str, url: str, token: str | None) -> int:
    """Push the file as TASK's next version; a failure says the trained file is safe, so nothing is retrained."""
    import kronserve_client

    try:
        with kronserve_client.KronserveClient(url, token) as client:
            return client.upload(task, [path]).version
    except kronserve_client.KronserveClientError as e:
        raise KronserveError(f"upload to {url} failed ({e}); the trained adapter is saved at {path}") from e
