"""The bank: a slot holds exactly the adapter last written to it (no stale weights of a bigger one), a cleared
slot adds nothing, and weights the bank's dtype cannot hold are refused without touching the slot."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kronserve.backbone import Backbone
from kronserve.bank import AdapterBank
from kronserve.errors import BankFull, InvalidAdapter
from kronserve.plan import Route
from kronserve.t5_sites import base_norms

ACTS = {"gelu_new": lambda h: F.gelu(h, approximate="tanh"), "swish": F.silu}


def bank_for(backbone: Backbone, dtype: torch.dtype = torch.float32) -> AdapterBank:
    norms = {k: v.float() for k, v in base_norms(backbone.model).items()}
    return AdapterBank(backbone.fingerprint.geometry, norms, torch.device("cpu"), dtype, capacity=2, max_slots=4)


def reference_delta(adapter, site: str, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """The Houlsby delta A(f) from the spec's dense form (checked against torch.kron in tests/methods)."""
    d = adapter.spec.dense(adapter.tensors, site)
    return ACTS[adapter.spec.activation](f @ d.down_w + d.down_b) @ d.up_w + d.up_b


def test_a_slot_serves_its_last_adapter_and_nothing_once_cleared(backbone: Backbone, adapter_for) -> None:
    bank = bank_for(backbone)
    big = adapter_for("big", "houlsby", reduction_factor=4, std=0.3)  # bottleneck 32
    small = adapter_for("small", "compacter", std=0.3)  # bottleneck 4: must not see big's columns 4..31
    site = "encoder.0.ffn"
    index = bank.site_index[site]
    x, f = torch.randn(1, 3, 128), torch.randn(1, 3, 128)
    bank.write(0, big)
    bank.write(0, small)
    got = bank.plan(Route.of([0])).delta(index, x, f)
    torch.testing.assert_close(got, reference_delta(small, site, x, f), rtol=1e-5, atol=1e-5)
    assert bank.loaded() == 1
    bank.clear(0)
    assert bank.loaded() == 0 and not bank.plan(Route.of([0])).acts_at(index)


def test_weights_the_dtype_cannot_hold_are_refused_and_the_slot_kept(backbone: Backbone, adapter_for) -> None:
    bank = bank_for(backbone, torch.float16)
    good = adapter_for("good", "houlsby", std=0.3)
    bank.write(1, good)
    bad = adapter_for("bad", "houlsby", std=0.3)
    bad.tensors["encoder.0.ffn.up.bias"][0] = 1e6  # over float16's 65504
    with pytest.raises(InvalidAdapter, match=r"not finite in torch\.float16"):
        bank.write(1, bad)
    x, f = torch.randn(1, 2, 128, dtype=torch.float16), torch.randn(1, 2, 128, dtype=torch.float16)
    index = bank.site_index["encoder.0.ffn"]
    got = bank.plan(Route.of([1])).delta(index, x, f).float()
    want = reference_delta(good, "encoder.0.ffn", x.float(), f.float())
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # still the good adapter, at float16 precision


def test_a_slot_outside_the_bank_is_refused(backbone: Backbone, adapter_for) -> None:
    with pytest.raises(BankFull, match=r"outside the bank.s 0\.\.3"):
        bank_for(backbone).write(4, adapter_for("t", "compacter"))
