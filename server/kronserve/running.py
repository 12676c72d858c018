"""The running batch: every decoding row's caches in one padded tensor per layer (TGI's `Seq2SeqLMBatch`).

T5's self-attention bias depends only on key − query distance, so rows whose caches have different
lengths share one tensor by **left padding** plus a mask: every row's query sits at the shared last
position and its own keys keep their distances to it, so each row attends exactly as it would alone.
Cross-attention has no position bias: its keys/values (computed once, at admission) are right-padded
to the longest input and masked. Rows join (`concatenate`), leave (`filter`, trimming columns that
became all padding) and, for beam search, swap caches (`reorder`) between steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, EncoderDecoderCache


@dataclass
class RunningBatch:
    cache: EncoderDecoderCache
    decoder_mask: torch.Tensor  # [R, T] long: 1 on a row's own cached tokens, 0 on its left padding
    encoder_mask: torch.Tensor  # [R, S] long: 1 on the row's input tokens, 0 on right padding
    next_tokens: torch.Tensor  # [R] long: each row's decoder input at the next step
    slots: list[int]  # [R] bank slot of each row (-1: bare backbone)
    encoder_dtype: torch.dtype  # of the encoder's output (float32 under a float16 T5 whose `wo` stays float32)

    @property
    def rows(self) -> int:
        return len(self.slots)

    def concatenate(self, other: RunningBatch) -> None:
        """Append `other`'s rows (after this batch's), padding both sides' caches to common lengths.

        Atomic: every joined tensor is built before any is assigned, so if one cannot be (out of memory), this
        batch is unchanged and only `other`'s rows are lost."""
        t = max(self.decoder_mask.shape[1], other.decoder_mask.shape[1])
        s = max(self.encoder_mask.shape[1], other.encoder_mask.shape[1])
        mine_self, theirs_self = _layers(self.cache.self_attention_cache), _layers(other.cache.self_attention_cache)
        mine_cross, theirs_cross = _layers(self.cache.cross_attention_cache), _layers(other.cache.cross_attention_cache)
        joined_self = [
            (
                torch.cat([_pad_left(a.keys, t), _pad_left(b.keys, t)]),
                torch.cat([_pad_left(a.values, t), _pad_left(b.values, t)]),
            )
            for a, b in zip(mine_self, theirs_self, strict=True)
        ]
        joined_cross = [
            (
                torch.cat([_pad_right(a.keys, s), _pad_right(b.keys, s)]),
                torch.cat([_pad_right(a.values, s), _pad_right(b.values, s)]),
            )
            for a, b in zip(mine_cross, theirs_cross, strict=True)
        ]
        decoder_mask = torch.cat([_pad_left(self.decoder_mask, t, 1), _pad_left(other.decoder_mask, t, 1)])
        encoder_mask = torch.cat([_pad_right(self.encoder_mask, s, 1), _pad_right(other.encoder_mask, s, 1)])
        next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        for layer, (keys, values) in zip(mine_self, joined_self, strict=True):
            layer.keys, layer.values = keys, values
        for layer, (keys, values) in zip(mine_cross, joined_cross, strict=True):
            layer.keys, layer.values = keys, values
        self.decoder_mask, self.encoder_mask, self.next_tokens = decoder_mask, encoder_mask, next_tokens
        self.slots = self.slots + other.slots

    def undo_partial_step(self) -> None:
        """After a decoder step that raised: drop the position it appended to the layers it reached, so every
        layer's cache is again as long as `decoder_mask` (the step is then retried or its rows leave)."""
        width = self.decoder_mask.shape[1]
        for layer in _layers(self.cache.self_attention_cache):
            if layer.keys is not None and layer.keys.dim() == 4 and layer.keys.shape[2] > width:
                layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]

    def filter(self, keep: list[int]) -> None:
        """Keep only rows `keep` (in that order), then drop columns that are padding on every kept row."""
        index = torch.tensor(keep, dtype=torch.long, device=self.next_tokens.device)
        decoder_mask, encoder_mask = self.decoder_mask[index], self.encoder_mask[index]
        first = int(decoder_mask.any(0).long().argmax())  # left padding shared by every kept row
        last = int(encoder_mask.any(0).nonzero().max()) + 1  # right padding shared by every kept row
        for layer in _layers(self.cache.self_attention_cache):
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]
        for layer in _layers(self.cache.cross_attention_cache):
            layer.keys, layer.values = layer.keys[index, :, :last], layer.values[index, :, :last]
        self.decoder_mask, self.encoder_mask = decoder_mask[:, first:], encoder_mask[:, :last]
        self.next_tokens = self.next_tokens[index]
        self.slots = [self.slots[i] for i in keep]

    def reorder(self, order: list[int]) -> None:
        """Row i continues row order[i]'s self-attention cache (beams of one input: same input, same length)."""
        index = torch.tensor(order, dtype=torch.long, device=self.next_tokens.device)
        for layer in _layers(self.cache.self_attention_cache):
            layer.keys, layer.values = layer.keys[index], layer.values[index]


def empty_cache() -> EncoderDecoderCache:
    return EncoderDecoderCache(DynamicCache(), DynamicCache())


def _layers(cache: DynamicCache) -> list:
    return list(cache.layers)


def _pad_left(t: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
    return F.pad(t, pad)


def _pad_right(t: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, missing]
    return F.pad(t, pad)
