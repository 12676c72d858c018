"""In-process inference: tokenize, resolve tasks to slots, run the routed T5, detokenize.

The engine takes rows of (task, input) and nothing from HTTP, so the scheduler, a benchmark or a
Ray Serve replica call it directly. Forward passes are serialized (one model, one plan at a time).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .backbone import Backbone
from .bank import AdapterBank
from .errors import InvalidRequest
from .formats.native import AdapterFile
from .metrics import Metrics
from .plan import Route
from .registry import Entry, Registry
from .store import AdapterStore
from .t5_sites import base_norms, install_sites


@dataclass(frozen=True)
class Generated:
    outputs: list[str]
    token_ids: list[list[int]]
    entries: list[Entry | None]


@dataclass(frozen=True)
class Scored:
    scores: list[float]
    entries: list[Entry | None]


class Engine:
    def __init__(
        self,
        backbone: Backbone,
        store: AdapterStore | None = None,
        metrics: Metrics | None = None,
        max_input_tokens: int = 512,
        bank_capacity: int = 8,
        max_adapters: int = 4096,
    ) -> None:
        fp = backbone.fingerprint
        self.backbone = backbone
        self.geometry = fp.geometry
        self.max_input_tokens = max_input_tokens
        model = backbone.model
        self.bank = AdapterBank(
            self.geometry, base_norms(model), backbone.device, backbone.dtype, bank_capacity, max_adapters
        )
        self.router = install_sites(model, self.geometry)
        self.registry = Registry(self.bank, fp, store, metrics)
        self._forward_lock = threading.Lock()

    def load(self, adapter: AdapterFile, version: int = 1, sha256: str = "") -> Entry:
        """Serve `adapter` (validated against this backbone) as its task's active version."""
        self.backbone.fingerprint.check(adapter.fingerprint)
        return self.registry.install(adapter, version, sha256)

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
        with self.registry.lease(tasks) as entries:
            return self.generate_leased(entries, inputs, max_new_tokens, num_beams, min_new_tokens)

    def generate_leased(
        self,
        entries: Sequence[Entry | None],
        inputs: Sequence[str],
        max_new_tokens: int = 32,
        num_beams: int = 1,
        min_new_tokens: int = 0,
    ) -> Generated:
        """`generate` for rows whose entries the caller already leased from the registry."""
        tok = self.backbone.tokenizer
        enc = self._encode(inputs)
        with self._routed(entries):
            out = self.backbone.model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                num_beams=num_beams,
                num_return_sequences=1,
                do_sample=False,
            )
        ids = [row[row != tok.pad_token_id].tolist() for row in out]
        return Generated(tok.batch_decode(out, skip_special_tokens=True), ids, list(entries))

    def score(self, tasks: Sequence[str | None], inputs: Sequence[str], targets: Sequence[str]) -> Scored:
        """Sum of natural-log probabilities of each target's tokens (its EOS included) given its input."""
        _same_length(tasks, inputs, "inputs")
        _same_length(tasks, targets, "targets")
        with self.registry.lease(tasks) as entries:
            return self.score_leased(entries, inputs, targets)

    def score_leased(self, entries: Sequence[Entry | None], inputs: Sequence[str], targets: Sequence[str]) -> Scored:
        """`score` for rows whose entries the caller already leased from the registry."""
        enc = self._encode(inputs)
        lab = self._encode(targets, "target")
        labels, mask = lab["input_ids"], lab["attention_mask"].bool()
        start = torch.full_like(labels[:, :1], self.backbone.model.config.decoder_start_token_id)
        decoder_input_ids = torch.cat([start, labels[:, :-1]], dim=1)
        with self._routed(entries):
            logits = self.backbone.model(**enc, decoder_input_ids=decoder_input_ids).logits
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return Scored((logp * mask).sum(-1).tolist(), list(entries))

    def count_tokens(self, texts: Sequence[str], what: str = "input") -> int:
        """Tokens of `texts` (EOS included); raises InvalidRequest naming a text over the limit.

        Nothing is truncated silently: a truncated target would be scored as another string.
        """
        for i, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InvalidRequest(f"{what} {i} is not valid Unicode text ({e.reason})") from None
        lengths = [len(ids) for ids in self.backbone.tokenizer(list(texts))["input_ids"]]
        for i, n in enumerate(lengths):
            if n > self.max_input_tokens:
                raise InvalidRequest(f"{what} {i} has {n} tokens; the limit is {self.max_input_tokens}")
        return sum(lengths)

    def _encode(self, texts: Sequence[str], what: str = "input") -> dict[str, torch.Tensor]:
        self.count_tokens(texts, what)
        enc = self.backbone.tokenizer(list(texts), return_tensors="pt", padding=True)
        return {k: v.to(self.backbone.device) for k, v in enc.items()}

    @contextmanager
    def _routed(self, entries: Sequence[Entry | None]) -> Iterator[None]:
        """Serialize forward passes and activate the batch's plan around one; undone in every case."""
        route = Route.of(Registry.slots_of(entries), self.backbone.device)
        with self._forward_lock:
            plan = self.bank.plan(route)
            with torch.inference_mode(), self.router.activate(plan):
                yield


def _same_length(tasks: Sequence[object], other: Sequence[object], name: str) -> None:
    if len(tasks) != len(other):
        raise InvalidRequest(f"{name} has {len(other)} entries but tasks has {len(tasks)}")
    if not tasks:
        raise InvalidRequest("a batch needs at least one row")
