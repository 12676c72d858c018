"""Per-row key/value prefixes inside T5's attention, without a copy of T5's attention module.

transformers looks a model's attention function up by name (`config._attn_implementation`, in its
`AttentionInterface`); T5's attention computes queries, keys and values (the cache already updated) and hands
them to that function. kronserve registers one that wraps the backbone's own (sdpa or eager): where the pass's
plan gives no row a prefix at a site, it calls the backbone's function unchanged, so bare and adapter batches run
exactly as before; where it does, it puts each row's prefix before its keys (after the cache update, so caches
hold real tokens only and a prefix is gathered from the device pool at every step, never copied into a row's
cache), masks each row's unused prefix columns, and builds each row's relative-position bias by its prefix's
convention (`plan.PrefixRows`, methods/prefix.py). Rows with prefixes of different lengths, and rows without
one, share the pass. A decode step (one query per row) joins the scores over the prefix and over the cache
instead of the keys themselves, so no layer copies its cache to put a prefix before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, T5ForConditionalGeneration
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.t5.modeling_t5 import T5Attention, eager_attention_forward

from .plan import PrefixRows

NAME = "kronserve_"  # + the backbone's own implementation's name


@dataclass(eq=False)
class AttentionSite:
    """What the attention function needs to know about one T5 attention module (set on it as `kronserve_site`)."""

    index: int  # its site in the backbone's order (Geometry.all_sites)
    router: Any  # t5_sites.SiteRouter: the pass's plan
    base: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]  # the backbone's own attention function
    bias: T5Attention | None  # the stack's module owning the relative position bias (None: cross-attention)


def install_prefix_attention(
    model: T5ForConditionalGeneration, attentions: list[tuple[int, T5Attention, T5Attention | None]], router: Any
) -> None:
    """Route `model`'s attention through `routed_attention`: `attentions` holds each attention module with its site
    index and the module owning its stack's position bias (None for cross-attention)."""
    own = model.config._attn_implementation or "eager"
    base = eager_attention_forward if own == "eager" else ALL_ATTENTION_FUNCTIONS[own]
    name = NAME + own
    AttentionInterface.register(name, routed_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[own])
    for index, attention, owner in attentions:
        attention.kronserve_site = AttentionSite(index, router, base, owner)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    for config in configs.values():
        config._attn_implementation = name


def routed_attention(
    module: T5Attention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    site: AttentionSite = module.kronserve_site
    plan = site.router.plan
    rows = None if plan is None else plan.prefix_at(site.index, query.shape[0])
    if rows is None:
        return site.base(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            position_bias=position_bias,
            **kwargs,
        )
    return _prefixed(site, module, rows, query, key, value, attention_mask, dropout, scaling)


def _prefixed(
    site: AttentionSite,
    module: T5Attention,
    rows: PrefixRows,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
) -> tuple[torch.Tensor, None]:
    """Attention over [each row's prefix ; its keys], query [R, H, q, d_kv], keys/values [R, H, T, d_kv]."""
    n, heads, q, d_kv = query.shape
    t = key.shape[2]
    length = 0 if rows.keys is None else rows.keys.shape[1]
    real = _visible(attention_mask, module.is_causal and q > 1, q, t, query.device).expand(n, 1, q, t)
    own = torch.arange(length, device=query.device) < rows.lengths[:, None]  # [R, P]
    visible = torch.cat([own[:, None, None, :].expand(n, 1, q, length), real], dim=-1)
    bias = _bias(site, rows, real, q, t, length).to(query.dtype)
    mask = torch.where(visible, bias, torch.finfo(query.dtype).min)
    if length and q == 1 and not module.training:
        return _two_part(query, key, value, rows, mask, scaling), None
    if length:
        key = torch.cat([_heads(rows.keys, heads, d_kv).to(key.dtype), key], dim=2)
        value = torch.cat([_heads(rows.values, heads, d_kv).to(value.dtype), value], dim=2)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


def _two_part(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rows: PrefixRows,
    mask: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """A decode step's attention without copying the cache: scores over the prefix and over the cached keys are
    joined (one query: small), and the output is the two weighted sums added. Same arithmetic as attending to the
    concatenated keys."""
    assert rows.keys is not None and rows.values is not None
    heads, d_kv = query.shape[1], query.shape[3]
    length = rows.keys.shape[1]
    prefix_k = _heads(rows.keys, heads, d_kv).to(key.dtype)
    prefix_v = _heads(rows.values, heads, d_kv).to(value.dtype)
    scale = d_kv**-0.5 if scaling is None else scaling
    scores = torch.cat([query @ prefix_k.transpose(-1, -2), query @ key.transpose(-1, -2)], dim=-1) * scale + mask
    weights = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    out = weights[..., :length] @ prefix_v + weights[..., length:] @ value  # [R, H, 1, d_kv]
    return out.transpose(1, 2).contiguous()


def _heads(prefix: torch.Tensor, heads: int, d_kv: int) -> torch.Tensor:
    """[R, P, heads·d_kv] -> [R, heads, P, d_kv], split head-major as T5 splits its keys."""
    return prefix.view(prefix.shape[0], prefix.shape[1], heads, d_kv).transpose(1, 2)


def _visible(mask: torch.Tensor | None, causal: bool, q: int, t: int, device: torch.device) -> torch.Tensor:
    """Which real keys each query sees, as bool [R or 1, 1, q, T], whatever form the backbone's mask took."""
    if mask is None:
        if not causal:
            return torch.ones(1, 1, q, t, dtype=torch.bool, device=device)
        queries = torch.arange(t - q, t, device=device)[:, None]
        return (torch.arange(t, device=device)[None, :] <= queries)[None, None]
    if mask.dtype != torch.bool:  # an additive float mask: 0 where visible, the dtype's minimum where not
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask[..., -t:].expand(mask.shape[0], 1, q, t)


def _bias(site: AttentionSite, rows: PrefixRows, real: torch.Tensor, q: int, t: int, length: int) -> torch.Tensor:
    """Each row's relative-position bias over [prefix ; keys], [R, H, q, P + T] (cross-attention: none).

    A row's bias depends only on its shifts, its left padding and whether it has one at all: for a pass of many
    queries (an admission, a score) it is computed once per distinct kind of row and handed to each row by index,
    which keeps the [R, q, P + T] intermediates of a long input to a few kinds' worth."""
    owner = site.bias
    device = real.device
    if owner is None:
        return torch.zeros(1, 1, 1, 1, device=device)
    first = real[:, 0, -1, :].long().argmax(-1)  # a left-padded row's first own key (its position 0)
    kinds = torch.stack([rows.real_shift, rows.prefix_shift, first, rows.zero_bias.long()], dim=1)
    which = None
    if q > 1:  # a decode step's query is one token: its per-row bias is small, and unique would cost more
        kinds, which = torch.unique(kinds, dim=0, return_inverse=True)
    real_shift, prefix_shift, first, zero = kinds.unbind(1)
    n = kinds.shape[0]
    queries = torch.arange(t - q, t, device=device)  # the queries are the last q of the T keys
    real_rel = torch.arange(t, device=device)[None, None, :] - queries[None, :, None] + real_shift[:, None, None]
    at = queries[None, :] - first[:, None]  # each query's position within its own row
    prefix_rel = torch.arange(length, device=device)[None, None, :] - prefix_shift[:, None, None] - at[:, :, None]
    relative = torch.cat([prefix_rel.expand(n, q, length), real_rel.expand(n, q, t)], dim=-1)
    bucket = owner._relative_position_bucket(
        relative,
        bidirectional=not owner.is_decoder,
        num_buckets=owner.relative_attention_num_buckets,
        max_distance=owner.relative_attention_max_distance,
    )
    bias = owner.relative_attention_bias(bucket).permute(0, 3, 1, 2)  # [kinds, H, q, P + T]
    bias = bias.masked_fill(zero.bool()[:, None, None, None], 0.0)
    return bias if which is None or n == 1 else bias[which]
