"""The padded running batch against an independent reference: at every step, each row's logits equal a plain
teacher-forced forward of that row alone (no cache, no padding, no neighbours), while rows join and leave."""

from __future__ import annotations

import pytest
import torch

from kronserve.decoding import Sequence
from kronserve.engine import Engine
from kronserve.messages import GenerationParams

from .conftest import held_slots
from .test_engine import INPUTS, METHODS, std_of

LENGTHS = [12, 5, 9, 7, 3, 10, 4]
# Prefixes of lengths 3, 5 (PEFT's positions), 7 (with leave_out layers) and MAM's 4 beside Compacter and LoRA rows.
PREFIXED = [METHODS[i] for i in (11, 12, 13, 14, 0, 9)]


@pytest.mark.parametrize("methods", [METHODS[: len(LENGTHS) - 1], PREFIXED], ids=["adapters", "prefixes"])
def test_every_rows_logits_equal_its_own_forward_as_rows_join_and_leave(
    engine: Engine, adapter_for, methods: list
) -> None:
    slots = []
    for i, (method, overrides) in enumerate([*methods, METHODS[0]]):
        engine.load(adapter_for(f"r{i}", method, seed=i, std=std_of(method), **overrides))
        slots += held_slots(engine, [f"r{i}"])
    slots[-1] = -1  # and a bare row
    ids = engine.tokenize([INPUTS[i % len(INPUTS)] + f" {i}" for i in range(len(LENGTHS))])
    worst = 0.0

    def reference(i: int, tokens: list[int]) -> torch.Tensor:
        decoder = torch.tensor([[engine.vocab.start, *tokens]])
        with engine._routed_slots([slots[i]]):
            return engine.backbone.model(**engine._padded([ids[i]]), decoder_input_ids=decoder).logits[0, -1]

    def check(i: int, seq: Sequence, logits: torch.Tensor) -> None:
        nonlocal worst
        worst = max(worst, (reference(i, seq.tokens) - logits).abs().max().item())

    def admit(rows: list[int]):
        pre = engine.prefill([ids[i] for i in rows], [slots[i] for i in rows], [1] * len(rows))
        seqs = []
        for k, i in enumerate(rows):
            p = GenerationParams(max_new_tokens=LENGTHS[i], min_new_tokens=LENGTHS[i])
            seqs.append(Sequence(p, engine.vocab, torch.device("cpu")))
            check(i, seqs[-1], pre.logits[k])
        pre.batch.next_tokens = torch.tensor(
            [s.choose(pre.logits[k : k + 1].clone()).tokens[0] for k, s in enumerate(seqs)]
        )
        return pre.batch, list(zip(rows, seqs, strict=True))

    batch, running = admit([0])
    joins = {2: [1, 2], 4: [3, 4], 6: [5, 6]}
    done: list[int] = []
    for step in range(40):
        if step in joins:
            new, members = admit(joins[step])
            batch.concatenate(new)
            running += members
        if not running:
            break
        logits = engine.step(batch)
        for k, (i, seq) in enumerate(running):
            check(i, seq, logits[k])
        batch.next_tokens = torch.tensor(
            [s.choose(logits[k : k + 1].clone()).tokens[0] for k, (_, s) in enumerate(running)]
        )
        keep = [k for k, (_, s) in enumerate(running) if not s.done]
        done += [i for i, s in running if s.done]
        if keep and len(keep) < len(running):
            batch.filter(keep)
        running = [running[k] for k in keep]
    assert sorted(done) == list(range(len(LENGTHS)))  # every row ran to its own length, joining and leaving
    assert worst < 1e-4, worst
