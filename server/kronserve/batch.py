"""The decode batch: the running rows' tensors and, in the same order, the requests' inputs they belong to.

TGI keeps a batch's requests, choosers, offsets and tensors in one class (`Seq2SeqLMBatch`); so does this.
`RunningBatch` (running.py) holds the padded caches and masks; a `Member` is one input of one request,
spanning `seq.rows` consecutive rows (beams count one row each). The walk from members to rows is written
once, here: `spans` gives each member its rows, `keep` removes members and their rows together, and
`join` appends new ones atomically (if the tensors cannot be joined, the batch is as it was).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .decoding import BeamSequence, Sequence
from .jobs import Job
from .running import RunningBatch


def spans(members: list[Member]) -> Iterator[tuple[int, Member]]:
    """(first row, member) for each member in row order."""
    row = 0
    for m in members:
        yield row, m
        row += m.seq.rows


@dataclass
class Member:
    """One sequence of one input of an admitted request (an input has `n` of them): its sequence and what it
    reserves."""

    job: Job
    index: int  # the input
    seq: Sequence | BeamSequence
    reserved: int  # cached token positions it may hold at its longest (rows × (input + max new tokens))
    output: int = 0  # its place among the request's answers (index × n + which of the n), also its stream index


class DecodeBatch:
    def __init__(self) -> None:
        self.tensors: RunningBatch | None = None
        self.members: list[Member] = []

    @property
    def rows(self) -> int:
        return self.tensors.rows if self.tensors is not None else 0

    @property
    def reserved(self) -> int:
        return sum(m.reserved for m in self.members)

    def __bool__(self) -> bool:
        return bool(self.members)

    def spans(self) -> Iterator[tuple[int, Member]]:
        return spans(self.members)

    def join(self, tensors: RunningBatch, members: list[Member]) -> None:
        """Append admitted rows after the running ones; raises with this batch unchanged if they cannot join."""
        if self.tensors is None:
            self.tensors, self.members = tensors, members
            return
        self.tensors.concatenate(tensors)
        self.members = self.members + members

    def keep(self, keep: Callable[[Member], bool]) -> list[Member]:
        """Keep the members `keep` accepts (and their rows); return the others."""
        kept: list[Member] = []
        gone: list[Member] = []
        rows: list[int] = []
        for row, m in self.spans():
            if keep(m):
                kept.append(m)
                rows.extend(range(row, row + m.seq.rows))
            else:
                gone.append(m)
        if not gone:
            return gone
        if not kept:
            self.tensors, self.members = None, []
        else:
            assert self.tensors is not None
            self.tensors.filter(rows)
            self.members = kept
        return gone

    def probe(self, keep: Callable[[Member], bool]) -> RunningBatch:
        """A copy of the rows of the members `keep` accepts (for a trial step that must not touch this batch)."""
        assert self.tensors is not None
        rows = [r for row, m in self.spans() if keep(m) for r in range(row, row + m.seq.rows)]
        # New cache and layer objects over the same tensors (no copy of them): `filter` then indexes new ones.
        shared = {id(v): v for v in vars(self.tensors).values() if isinstance(v, torch.Tensor)}
        for cache in (self.tensors.cache.self_attention_cache, self.tensors.cache.cross_attention_cache):
            for layer in cache.layers:
                shared.update((id(t), t) for t in vars(layer).values() if isinstance(t, torch.Tensor))
        tensors = copy.deepcopy(self.tensors, memo=shared)
        tensors.filter(rows)
        return tensors
