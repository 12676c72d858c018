"""In-process inference on the routed T5: tokenize, resolve tasks to device slots, run forward passes, detokenize.

Two ways to decode, on the same sites, device tier and Route:
- the step loop's passes (`prefill`, `step`, `score_ids`): the server's `DecodeLoop` admits rows into a
  `RunningBatch` and advances every row one token per `step`, whatever its task and settings;
- `generate`: one Hugging Face `generate()` call for a whole batch; the independent reference the step
  loop is tested against, and the `static` batching mode the continuous loop is measured against.
The engine takes token ids or strings and nothing from HTTP, so the loop, a benchmark or a Ray Serve
replica call it directly. Forward passes and device-memory changes run on one thread (`owner`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList

from .backbone import Backbone
from .compact import Compact, packed_bytes
from .decoding import Vocabulary
from .device_tier import DeviceTier
from .errors import InvalidRequest, PinRefused
from .formats.native import AdapterFile
from .host_tier import HostTier
from .methods import MethodSpec
from .metrics import Metrics
from .plan import BatchPlan, Route, SiteNames
from .registry import Entry, Registry
from .running import RunningBatch, empty_cache
from .store import AdapterStore
from .t5_sites import base_norms, install_sites
from .text import TextCodec

log = logging.getLogger(__name__)
MB = 1024 * 1024
PLANS_KEPT = 2  # a step's plan survives the admission pass between two steps


@dataclass(frozen=True)
class Generated:
    outputs: list[str]
    token_ids: list[list[int]]
    entries: list[Entry | None]


@dataclass(frozen=True)
class Scored:
    scores: list[float]
    entries: list[Entry | None]


@dataclass(frozen=True)
class Prefilled:
    batch: RunningBatch
    logits: torch.Tensor  # [R, V] float32: each new row's first-token logits


class Engine:
    def __init__(
        self,
        backbone: Backbone,
        store: AdapterStore | None = None,
        metrics: Metrics | None = None,
        max_input_tokens: int = 512,
        host_adapter_mb: float = 4096,
        device_adapter_mb: float = 1024,
        max_adapters: int = 1_000_000,
    ) -> None:
        fp = backbone.fingerprint
        self.backbone = backbone
        self.geometry = g = fp.geometry
        self.max_input_tokens = max_input_tokens
        self.codec = TextCodec(backbone.tokenizer, max_input_tokens)
        model = backbone.model
        names = SiteNames(tuple(g.all_sites()), tuple(g.all_norms()), tuple(g.all_linears()))
        norms = base_norms(model)
        norms_stack = torch.stack([norms[n] for n in names.norms])
        metrics = metrics or Metrics()
        self.device = DeviceTier(
            names, norms_stack, backbone.device, backbone.dtype, int(device_adapter_mb * MB), metrics
        )
        self.host = HostTier(int(host_adapter_mb * MB), metrics)
        metrics.tier_budget_bytes.labels("device").set(self.device.budget)
        metrics.tier_budget_bytes.labels("host").set(self.host.budget)
        self.router = install_sites(model, self.geometry)
        self.registry = Registry(self.device, self.host, fp, store, metrics, max_adapters)
        self.registry.on_new_version = self._keep_pinned
        self.registry.on_upload = self._pin_room
        self.registry.serving = backbone.source
        # How work on device memory and forward passes reaches the one thread that owns them: the step loop sets it
        # to run them between its steps (so no lock sits on the step path); alone, the engine runs them in place.
        self.owner: Callable[[Callable[[], Any]], Any] = _in_place
        self.post: Callable[[Callable[[], Any]], None] = _in_place  # the same, not waiting for it to be done
        self.registry.on_drop = self._drop
        self._plans: dict[tuple, BatchPlan] = {}
        tok, gen = backbone.tokenizer, model.generation_config
        self.pad_id = tok.pad_token_id
        self.vocab = Vocabulary(
            size=min(len(tok), model.config.vocab_size),
            eos=model.config.eos_token_id,
            start=model.config.decoder_start_token_id,
            length_penalty=1.0 if gen.length_penalty is None else gen.length_penalty,  # None: HF's default
            early_stopping=bool(gen.early_stopping) if gen.early_stopping != "never" else "never",
        )
        # transformers renamed `past_key_values` to `cache` during 5.x; take whichever this version has.
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def load(self, adapter: AdapterFile, version: int = 1, sha256: str = "") -> Entry:
        """Serve `adapter` (validated against this backbone) as its task's active version."""
        self.backbone.fingerprint.check(adapter.fingerprint)
        return self.registry.install(adapter, version, sha256)

    # ---- residency -------------------------------------------------------------------------------------
    def hold(self, entries: Sequence[Entry | None], packed: Sequence[Compact | None]) -> list[int]:
        """Lease each version on the device (loading the missing ones from their packed form): its slot, or
        BARE for None. Runs between forward passes; `release` must follow."""
        wants = [None if e is None or c is None else (e.key, e.task, c) for e, c in zip(entries, packed, strict=True)]
        return self.owner(lambda: self.device.hold(wants))

    def _drop(self, key: tuple) -> None:
        """A version leaving the registry leaves the device on the owning thread: waited for, so what the registry
        reports after is true, except on an event loop, which must not block on a step (then it is posted)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.owner(lambda: self.device.drop(key))
        else:
            self.post(lambda: (self.device.drop(key), self.registry.update_gauges()))

    def release(self, slots: Sequence[int]) -> None:
        self.owner(lambda: self.device.release(slots))

    @contextmanager
    def resident(self, tasks: Sequence[str | None]) -> Iterator[tuple[list[Entry | None], list[int]]]:
        """Lease `tasks`' active versions in the registry and on the device for one block (reference paths)."""
        with self.registry.lease(tasks) as entries:
            packed = [None if e is None else self.registry.fetch(e) for e in entries]
            slots = self.hold(entries, packed)
            try:
                yield entries, slots
            finally:
                self.release(slots)

    def pin(self, task: str) -> None:
        """Keep `task` on the device, never evicted: loaded now if registered (and at each new version).

        Refused (PinRefused) when the pinned adapters would need more than the device budget. The weights are read
        first (a damaged file refuses the pin before it is recorded); the budget check, the reservation and the load
        then run together on the owning thread, so concurrent pins cannot both pass the check. A task pinned before
        it exists reserves nothing until its upload, which is checked then (`_pin_room`)."""
        entry = self.registry.peek(task)
        packed = None if entry is None else self.registry.fetch(entry)
        self.owner(lambda: self._pin(task, entry, packed))

    def _pin(self, task: str, entry: Entry | None, packed: Compact | None) -> None:
        self._reserve(task, 0 if entry is None else self._bytes(entry.spec))
        if entry is not None and packed is not None:
            self.device.release(self.device.hold([(entry.key, entry.task, packed)]))

    def _reserve(self, task: str, size: int) -> int | None:
        """Pin `task` with `size` bytes reserved (or what it has, if more), if all pins then fit the budget; else
        PinRefused, changing nothing. Returns its reservation before (None: it was not pinned). Owning thread only."""
        before = self.device.reservation(task)
        want = max(size, before or 0)
        pinned = self.device.pinned_bytes() - (before or 0) + want
        if pinned > self.device.budget:
            raise PinRefused(
                f"pinning {task!r} ({want} bytes) would make pinned adapters need {pinned} bytes; "
                f"the device budget is {self.device.budget} (device_adapter_mb)"
            )
        self.device.pin(task, want)
        return before

    @contextmanager
    def _pin_room(self, task: str, spec: MethodSpec, pin: bool) -> Iterator[None]:
        """Around an upload (the registry's `on_upload`): a new version of a pinned task, or one uploaded with
        `pin`, must fit the device budget beside the other pins. Checked and reserved before the store changes (a
        refusal is 409 `pin_refused` and nothing is written); undone if the upload then fails."""
        if not (pin or self.device.pinned(task)):
            yield
            return
        size = self._bytes(spec)
        before = self.owner(lambda: self._reserve(task, size))
        try:
            yield
        except BaseException:
            self.owner(lambda: self.device.unpin(task) if before is None else self.device.pin(task, before))
            raise

    def unpin(self, task: str) -> None:
        """Back to LRU: the task stays on the device until evicted."""
        self.owner(lambda: self.device.unpin(task))

    def _keep_pinned(self, entry: Entry) -> None:
        """A pinned task's new version goes to the device at once, its reservation now its own size. A version that
        came from the store unchecked (another replica's upload) and does not fit beside the other pins unpins its
        task rather than take the device past its budget."""
        if not self.device.pinned(entry.task):
            return
        packed = self.registry.fetch(entry)

        def keep() -> None:
            try:
                self.device.unpin(entry.task)  # its old reservation no longer counts: the new size replaces it
                self._reserve(entry.task, self._bytes(entry.spec))
            except PinRefused as e:
                log.error("unpinned %r: its new version v%d does not fit: %s", entry.task, entry.version, e)
                return
            self.device.release(self.device.hold([(entry.key, entry.task, packed)]))

        self.owner(keep)

    def _bytes(self, spec: MethodSpec) -> int:
        return packed_bytes(spec, self.geometry, self.device.dtype)

    def where(self, entry: Entry) -> dict[str, object]:
        """Where the version's weights are, and what they cost there (GET /v1/adapters/{task})."""
        return {
            "residency": {
                "tier": self.registry.tier(entry),
                "pinned": self.device.pinned(entry.task),
                "bytes": self._bytes(entry.spec),
            }
        }

    # ---- whole-batch generate (reference and static mode) and score --------------------------------
    def generate(
        self,
        tasks: Sequence[str | None],
        inputs: Sequence[str],
        max_new_tokens: int = 32,
        num_beams: int = 1,
        min_new_tokens: int = 0,
    ) -> Generated:
        """Greedy (num_beams=1) or beam-search outputs, one per row, each through its task's adapter."""
        _same_length(tasks, inputs, "inputs")
        ids_in = self.tokenize(inputs)

        def run() -> Generated:
            with self.resident(tasks) as (entries, slots):
                ids = self.generate_ids(slots, ids_in, max_new_tokens, num_beams, min_new_tokens)
            return Generated([self.decode(row) for row in ids], ids, list(entries))

        return self.owner(run)

    def generate_ids(
        self,
        slots: Sequence[int],
        inputs: Sequence[list[int]],
        max_new_tokens: int = 32,
        num_beams: int = 1,
        min_new_tokens: int = 0,
    ) -> list[list[int]]:
        """One HF `generate()` over the whole batch; each row's tokens after the start token, through its EOS."""
        with self._routed_slots(slots):
            out = self.backbone.model.generate(
                **self._padded(inputs),
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                num_beams=num_beams,
                num_return_sequences=1,
                do_sample=False,
                logits_processor=LogitsProcessorList([_VocabularyLimit(self.vocab)]),
            )
        return [_until_eos(row[1:].tolist(), self.vocab.eos) for row in out]

    def score(self, tasks: Sequence[str | None], inputs: Sequence[str], targets: Sequence[str]) -> Scored:
        """Sum of natural-log probabilities of each target's tokens (its EOS included) given its input."""
        _same_length(tasks, inputs, "inputs")
        _same_length(tasks, targets, "targets")
        ids, target_ids = self.tokenize(inputs), self.tokenize(targets, "target")

        def run() -> Scored:
            with self.resident(tasks) as (entries, slots):
                return Scored(self.score_ids(slots, ids, target_ids), list(entries))

        return self.owner(run)

    def score_ids(self, slots: Sequence[int], inputs: Sequence[list[int]], targets: Sequence[list[int]]) -> list[float]:
        """Teacher-forced log-probabilities of tokenized targets (EOS included) given tokenized inputs."""
        enc = self._padded(inputs)
        labels, mask = (t.to(self.backbone.device) for t in _pad(targets, self.pad_id))
        start = torch.full_like(labels[:, :1], self.vocab.start)
        decoder_input_ids = torch.cat([start, labels[:, :-1]], dim=1)
        with self._routed_slots(slots):
            logits = self.backbone.model(**enc, decoder_input_ids=decoder_input_ids).logits
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return (logp * mask).sum(-1).tolist()

    # ---- the step loop's passes -------------------------------------------------------------------
    def prefill(self, inputs: Sequence[list[int]], input_slots: Sequence[int], rows: Sequence[int]) -> Prefilled:
        """Admission: one mixed-adapter encoder pass over `inputs`, then the first decoder step.

        `rows[i]` decoder rows start from input i (beams: `num_beams` rows, as HF expands them). They come back
        as a `RunningBatch` (cross-attention K/V computed here, once) with their first logits.
        """
        enc = self._padded(inputs)
        with self._routed_slots(input_slots):
            hidden = self.backbone.model.encoder(**enc).last_hidden_state  # [N, S, d]
        index = torch.repeat_interleave(torch.arange(len(inputs)), torch.tensor(list(rows))).to(hidden.device)
        slots = [input_slots[i] for i in index.tolist()]
        encoder_mask = enc["attention_mask"][index]
        start = torch.full((len(slots), 1), self.vocab.start, dtype=torch.long, device=hidden.device)
        batch = RunningBatch(empty_cache(), torch.ones_like(start), encoder_mask, start[:, 0], slots, hidden.dtype)
        with self._routed_slots(slots):
            out = self.backbone.model(
                encoder_outputs=(hidden[index],),
                attention_mask=encoder_mask,
                decoder_input_ids=start,
                use_cache=True,
                **{self._cache_kwarg: batch.cache},
            )
        return Prefilled(batch, out.logits[:, -1].float())

    def step(self, batch: RunningBatch) -> torch.Tensor:
        """One decoder step for every running row (each through its own adapter); returns logits [R, V]."""
        decoder_mask = F.pad(batch.decoder_mask, (0, 1), value=1)  # [R, T+1]: the new token is every row's own
        stub = torch.zeros((), dtype=batch.encoder_dtype, device=self.backbone.device)
        encoder_states = stub.expand(batch.rows, batch.encoder_mask.shape[1], self.geometry.d_model)  # K/V cached
        with self._routed_slots(batch.slots):
            out = self.backbone.model(
                encoder_outputs=(encoder_states,),
                attention_mask=batch.encoder_mask,
                decoder_input_ids=batch.next_tokens[:, None],
                decoder_attention_mask=decoder_mask,
                use_cache=True,
                **{self._cache_kwarg: batch.cache},
            )
        batch.decoder_mask = decoder_mask
        return out.logits[:, -1].float()

    # ---- tokens ----------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], what: str = "input") -> list[list[int]]:
        return self.codec.tokenize(texts, what)

    def decode(self, ids: Sequence[int]) -> str:
        return self.codec.decode(ids)

    def _padded(self, inputs: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        ids, mask = _pad(inputs, self.pad_id)
        return {"input_ids": ids.to(self.backbone.device), "attention_mask": mask.to(self.backbone.device)}

    @contextmanager
    def _routed_slots(self, slots: Sequence[int]) -> Iterator[None]:
        """Activate the rows' plan around one forward pass; undone in every case. Runs on the owning thread (the step
        loop's, or the caller's when the engine runs alone), so passes never overlap."""
        with torch.inference_mode(), self.router.activate(self._plan(tuple(slots))):
            yield

    def _plan(self, slots: tuple[int, ...]) -> BatchPlan:
        """The plan for these rows, reused while they and the device pools stay the same: decode steps over an
        unchanged batch gather their adapters' weights once, not once per step."""
        key = (slots, self.device.generation)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= PLANS_KEPT:
                self._plans.clear()
            plan = self._plans[key] = self.device.plan(Route.of(slots, self.backbone.device))
        return plan


def _in_place(work: Callable[[], Any]) -> Any:
    return work()


class _VocabularyLimit(LogitsProcessor):
    """HF's side of `Vocabulary.mask`: ids the tokenizer cannot decode are never generated."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.vocab.mask(scores)


def _pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [N, L] and their attention mask."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def _same_length(tasks: Sequence[object], other: Sequence[object], name: str) -> None:
    if len(tasks) != len(other):
        raise InvalidRequest(f"{name} has {len(other)} entries but tasks has {len(tasks)}")
    if not tasks:
        raise InvalidRequest("a batch needs at least one row")
