"""The T5 wiring: adapter sites and routed layer norms installed once into a frozen T5.

Every T5 sublayer computes `x + dropout(sublayer(layer_norm(x)))` (self-attention, cross-attention,
feed-forward). kronserve swaps two of its children and leaves its `forward` alone, so the wiring
does not depend on the transformers version's attention signature:
- `dropout` becomes an `AdapterSite`, which returns `f + A(...)` for the batch's rows (x is captured
  by a forward pre-hook on the sublayer, since Pfeiffer and parallel placement read the residual);
- `layer_norm` (and each stack's `final_layer_norm`) becomes a `RoutedNorm` that applies per-row
  norm weights when a task in the batch carries its own;
- every attention computes through `prefix_attention.routed_attention`, which adds each row's key/value prefix.
With no plan active, or a plan of bare rows only, both return exactly what the originals return.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import T5ForConditionalGeneration

from .methods import Geometry
from .plan import SitePlan
from .prefix_attention import install_prefix_attention


class SiteRouter:
    """Hands the batch in flight's plan to every site; the only state the installed sites share."""

    def __init__(self) -> None:
        self._plan: SitePlan | None = None

    @property
    def plan(self) -> SitePlan | None:
        return self._plan

    @contextmanager
    def activate(self, plan: SitePlan) -> Iterator[None]:
        if self._plan is not None:
            raise RuntimeError("a batch plan is already active: forward passes must not overlap")
        self._plan = plan
        try:
            yield
        finally:
            self._plan = None


class AdapterSite(nn.Module):
    """`f + A(...)`: the adapter runs in the backbone's dtype (`dtype`, the device tier's), whatever dtype its inputs
    arrive in (a float16 T5 keeps `wo`, hence the residual stream after a feed-forward, in float32); the sum
    takes the sublayer output's dtype, as the stock layer's own sum does."""

    def __init__(self, index: int, router: SiteRouter, dropout: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.index, self.router, self.dropout, self.dtype = index, router, dropout, dtype
        self._residual: torch.Tensor | None = None

    def capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._residual = args[0] if args else kwargs["hidden_states"]

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        f = self.dropout(f)
        x, self._residual = self._residual, None
        plan = self.router.plan
        if plan is None or not plan.acts_at(self.index):
            return f
        return f + plan.delta(self.index, x.to(self.dtype), f.to(self.dtype))


class RoutedNorm(nn.Module):
    def __init__(self, index: int, router: SiteRouter, inner: nn.Module) -> None:
        super().__init__()
        self.index, self.router, self.inner = index, router, inner

    @property
    def weight(self) -> nn.Parameter:
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.router.plan
        if plan is None or not plan.use_norms:
            return self.inner(x)
        # T5LayerNorm's arithmetic, with the weight gathered per row.
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.inner.variance_epsilon)
        w = plan.norm_weight(self.index)  # [B, 1, d]
        if w.dtype in (torch.float16, torch.bfloat16):
            x = x.to(w.dtype)
        shape = x.shape
        return (w * x.reshape(w.shape[0], -1, shape[-1])).reshape(shape)


class RoutedLinear(nn.Module):
    """A frozen projection plus each row's LoRA update (PEFT's `x Wᵀ + s·(x Aᵀ)Bᵀ`), when a row has one; the
    update is computed in the backbone's dtype (`dtype`) and added in the projection's (float32 for a float16
    T5's `wo`)."""

    def __init__(self, index: int, router: SiteRouter, inner: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.index, self.router, self.inner, self.dtype = index, router, inner, dtype

    @property
    def weight(self) -> nn.Parameter:  # T5DenseActDense reads `wo.weight.dtype`
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        plan = self.router.plan
        if plan is None or not plan.lora_acts_at(self.index):
            return y
        return y + plan.lora_delta(self.index, x.to(self.dtype))


_INSTALLED = (AdapterSite, RoutedNorm, RoutedLinear)


def sublayers(model: T5ForConditionalGeneration) -> Iterator[tuple[str, nn.Module]]:
    """(site name, sublayer) in the backbone's site order (Geometry.all_sites)."""
    for stack_name in ("encoder", "decoder"):
        stack = getattr(model, stack_name)
        kinds = ("mh", "ffn") if stack_name == "encoder" else ("mh", "cross", "ffn")
        for i, block in enumerate(stack.block):
            for kind, layer in zip(kinds, block.layer, strict=True):
                yield f"{stack_name}.{i}.{kind}", layer


def base_norms(model: T5ForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The backbone's own norm weights by kronserve norm name (what a bare row uses)."""
    norms = {f"layer_norm.{name}": layer.layer_norm.weight for name, layer in sublayers(model)}
    for stack in ("encoder", "decoder"):
        norms[f"layer_norm.{stack}.final"] = getattr(model, stack).final_layer_norm.weight
    return {k: v.detach() for k, v in norms.items()}


def install_sites(model: T5ForConditionalGeneration, geometry: Geometry) -> SiteRouter:
    """Install an AdapterSite and a RoutedNorm in every sublayer, once, at start-up.

    A model that already has sites is refused: a second install would wrap the first sites, so every adapter
    would act twice (and two routers would each need a plan)."""
    installed = next((n for n, m in model.named_modules() if isinstance(m, _INSTALLED)), None)
    if installed is not None:
        raise RuntimeError(f"adapter sites are already installed in this model ({installed}): install them once")
    router = SiteRouter()
    dtype = model.shared.weight.dtype  # the backbone's dtype (the bank's): no module keeps the embedding in float32
    site_index = {s: i for i, s in enumerate(geometry.all_sites())}
    norm_index = {n: i for i, n in enumerate(geometry.all_norms())}
    for name, layer in sublayers(model):
        if not (hasattr(layer, "dropout") and hasattr(layer, "layer_norm")):
            raise RuntimeError(f"T5 sublayer {name} has no dropout/layer_norm: unsupported transformers layout")
        site = AdapterSite(site_index[name], router, layer.dropout, dtype)
        layer.dropout = site
        layer.register_forward_pre_hook(site.capture, with_kwargs=True)
        layer.layer_norm = RoutedNorm(norm_index[f"layer_norm.{name}"], router, layer.layer_norm)
    for stack in ("encoder", "decoder"):
        s = getattr(model, stack)
        s.final_layer_norm = RoutedNorm(norm_index[f"layer_norm.{stack}.final"], router, s.final_layer_norm)
    _install_linears(model, geometry, router, dtype)
    install_prefix_attention(model, list(_attentions(model, site_index)), router)
    return router


def _attentions(model: T5ForConditionalGeneration, site_index: dict[str, int]) -> Iterator[tuple]:
    """(site index, attention module, the module owning its stack's relative position bias or None) of each
    attention: a stack's first self-attention computes the bias its other layers reuse; cross-attention has none."""
    for name, layer in sublayers(model):
        if name.endswith(".cross"):
            yield site_index[name], layer.EncDecAttention, None
        elif name.endswith(".mh"):
            stack = getattr(model, name.split(".")[0])
            yield site_index[name], layer.SelfAttention, stack.block[0].layer[0].SelfAttention


def _install_linears(
    model: T5ForConditionalGeneration, geometry: Geometry, router: SiteRouter, dtype: torch.dtype
) -> None:
    """Wrap every projection LoRA can target (q, k, v, o of each attention; wi, wo of each feed-forward)."""
    linear_index = {name: i for i, name in enumerate(geometry.all_linears())}
    for name, layer in sublayers(model):
        if name.endswith(".ffn"):
            owner, kinds = layer.DenseReluDense, ("wi", "wo")
        else:
            owner = layer.EncDecAttention if name.endswith(".cross") else layer.SelfAttention
            kinds = ("q", "k", "v", "o")
        for kind in kinds:
            if isinstance(getattr(owner, kind, None), nn.Linear):  # gated T5 v1.1 has wi_0/wi_1: no `wi` target
                linear = RoutedLinear(linear_index[f"{name}.{kind}"], router, getattr(owner, kind), dtype)
                setattr(owner, kind, linear)
