"""Each routed site equals a plain dense per-task reference: materialized H (torch.kron), one task at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kronserve.engine import Engine
from kronserve.formats.native import AdapterFile
from kronserve.plan import Route
from kronserve.t5_sites import install_sites

from .conftest import held_slots

ACTS = {"gelu": F.gelu, "gelu_new": lambda h: F.gelu(h, approximate="tanh"), "relu": F.relu, "swish": F.silu}

VARIANTS = [  # (task, method, overrides): every method, every placement, every activation, norms, rules
    ("compacter", "compacter", {}),
    ("compacter-fr", "compacter", {"factorized_rule": True, "rank": 2, "layer_norms": True}),
    ("cpp-pfeiffer", "compacter++", {"placement": "pfeiffer", "activation": "gelu"}),
    ("phm", "phm", {"reduction_factor": 16}),
    ("houlsby-par", "houlsby", {"placement": "parallel", "scaling": 2.0, "sites": ("mh", "cross", "ffn")}),
    ("pfeiffer", "pfeiffer", {"layer_norms": True}),
    ("phm-relu", "phm", {"activation": "relu", "reduction_factor": 8, "sites": ("cross", "ffn")}),
]


def kron_sum(rule: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return sum(torch.kron(rule[i], w[i]) for i in range(rule.shape[0]))


def reference_projection(a: AdapterFile, site: str, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [in, out], bias) of one projection, straight from the file's tensors."""
    t, p, spec = a.tensors, f"{site}.{proj}.", a.spec
    if spec.family == "bottleneck":
        return t[f"{p}weight"].T, t[f"{p}bias"]
    rp = "" if spec.shared_rule else p
    rule = t[f"{rp}phm_rule_left"] @ t[f"{rp}phm_rule_right"] if spec.factorized_rule else t[f"{rp}phm_rule"]
    w = t[f"{p}W"] if spec.rank is None else t[f"{p}W_left"] @ t[f"{p}W_right"]
    return kron_sum(rule, w), t[f"{p}b"]


def reference_site(layer, kind: str, a: AdapterFile | None, site: str, x: torch.Tensor, kv: torch.Tensor | None):
    """x + f + A(z) for one row with the task's own norm weights, computed densely."""
    inner_norm = layer.layer_norm.inner
    w = a.tensors[f"layer_norm.{site}"] if a is not None and a.spec.layer_norms else inner_norm.weight
    normed = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + inner_norm.variance_epsilon))
    if kind == "ffn":
        f = layer.DenseReluDense(normed)
    elif kind == "mh":
        f = layer.SelfAttention(normed)[0]
    else:
        f = layer.EncDecAttention(normed, key_value_states=kv)[0]
    if a is None or site not in a.spec.active_sites(a.geometry):
        return x + f
    spec = a.spec
    z = {"houlsby": f, "pfeiffer": x + f, "parallel": x}[spec.placement]
    dw, db = reference_projection(a, site, "down")
    uw, ub = reference_projection(a, site, "up")
    return x + f + spec.scaling * (ACTS[spec.activation](z @ dw + db) @ uw + ub)


@pytest.fixture
def loaded(engine: Engine, adapter_for) -> dict[str, tuple[int, AdapterFile]]:
    out = {}
    for i, (task, method, overrides) in enumerate(VARIANTS):
        a = adapter_for(task, method, seed=i, std=0.3, **overrides)
        engine.load(a)
        out[task] = (held_slots(engine, [task])[0], a)
    return out


@pytest.mark.parametrize("site", ["encoder.0.mh", "encoder.1.ffn", "decoder.0.mh", "decoder.1.cross", "decoder.0.ffn"])
def test_routed_site_equals_dense_reference_per_row(engine: Engine, loaded, site: str) -> None:
    stack, block, kind = site.split(".")
    sub = {"mh": 0, "cross": 1, "ffn": -1}[kind]
    layer = getattr(engine.backbone.model, stack).block[int(block)].layer[sub]
    rows = [*VARIANTS[::-1], (None, None, None), *VARIANTS[:3], (None, None, None)]
    tasks = [r[0] for r in rows]
    slots = [-1 if t is None else loaded[t][0] for t in tasks]
    d = engine.geometry.d_model
    x = torch.randn(len(rows), 5, d)
    kv = torch.randn(len(rows), 7, d) if kind == "cross" else None
    with torch.no_grad(), engine.router.activate(engine.device.plan(Route.of(slots))):
        args = {"key_value_states": kv} if kind == "cross" else {}
        got = layer(x, **args)
    got = got[0] if isinstance(got, tuple) else got
    with torch.no_grad():
        for b, task in enumerate(tasks):
            a = None if task is None else loaded[task][1]
            expect = reference_site(layer, kind, a, site, x[b : b + 1], None if kv is None else kv[b : b + 1])
            torch.testing.assert_close(got[b : b + 1], expect, rtol=1e-5, atol=1e-5, msg=f"row {b} task {task}")


def test_beam_rows_use_their_request_adapter(engine: Engine, loaded) -> None:
    """The decoder sees B·m rows; each request's m beams must get that request's adapter."""
    layer = engine.backbone.model.decoder.block[0].layer[-1]
    tasks = ["compacter", None, "pfeiffer"]
    slots = [-1 if t is None else loaded[t][0] for t in tasks]
    x = torch.randn(3 * 4, 2, engine.geometry.d_model)  # 3 requests x 4 beams
    with torch.no_grad(), engine.router.activate(engine.device.plan(Route.of(slots))):
        got = layer(x)
    with torch.no_grad():
        for r in range(12):
            task = tasks[r // 4]
            a = None if task is None else loaded[task][1]
            expect = reference_site(layer, "ffn", a, "decoder.0.ffn", x[r : r + 1], None)
            torch.testing.assert_close(got[r : r + 1], expect, rtol=1e-5, atol=1e-5)


def test_route_rejects_rows_that_do_not_divide(engine: Engine, loaded) -> None:
    layer = engine.backbone.model.encoder.block[0].layer[-1]
    plan = engine.device.plan(Route.of([loaded["compacter"][0]] * 3))
    with torch.no_grad(), engine.router.activate(plan), pytest.raises(RuntimeError, match="not a multiple"):
        layer(torch.randn(4, 2, engine.geometry.d_model))
    assert engine.router.plan is None  # the plan is removed even when the forward pass fails


def test_rows_without_an_adapter_add_exact_zero_even_when_the_input_overflowed(engine: Engine, loaded) -> None:
    site = engine.device.names.sites.index("encoder.0.mh")
    plan = engine.device.plan(Route.of([loaded["compacter"][0], -1, loaded["pfeiffer"][0]]))  # pfeiffer: ffn only
    x = torch.randn(3, 4, engine.geometry.d_model)
    x[1, 0, 0] = x[2, 0, 0] = float("inf")
    with torch.no_grad():
        delta = plan.delta(site, x, torch.randn_like(x))
    assert torch.count_nonzero(delta[1:]) == 0 and not torch.isnan(delta[1:]).any()
    assert torch.isfinite(delta[0]).all() and torch.count_nonzero(delta[0]) > 0


def test_sites_install_once_per_model(engine: Engine) -> None:
    """A second install would nest the sites (every adapter acting twice): refused, the model left as it was."""
    before = [type(m).__name__ for m in engine.backbone.model.modules()]
    with pytest.raises(RuntimeError, match="already installed"):
        install_sites(engine.backbone.model, engine.geometry)
    assert [type(m).__name__ for m in engine.backbone.model.modules()] == before
