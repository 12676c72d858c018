"""The gathered fast path against the row-by-row reference, random slots, mixed activations, dtypes."""

import pytest
import torch
import torch.nn.functional as F

from kronserve.kernels import routed_bottleneck, routed_bottleneck_reference


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
def test_fast_path_matches_reference(dtype: torch.dtype, tol: float) -> None:
    """Tolerance is relative to the output's scale: bf16 rounds both paths differently."""
    g = torch.Generator().manual_seed(0)
    slots, b, m, d, k = 6, 9, 5, 32, 8
    bank = [torch.randn(slots, *s, generator=g).to(dtype) for s in ((d, k), (k,), (k, d), (d,))]
    rows = torch.randint(0, slots, (b,), generator=g)
    gathered = [t[rows] for t in bank]
    z = torch.randn(b, m, d, generator=g).to(dtype)
    relu_rows = torch.rand(b, generator=g) > 0.5
    acts = [(F.gelu, None), (F.relu, relu_rows.view(-1, 1, 1))]
    got = routed_bottleneck(z, *gathered, acts)
    expect = routed_bottleneck_reference(z, *gathered, acts)
    scale = expect.abs().max().item()
    assert (got.double() - expect.double()).abs().max().item() <= tol * scale


def test_zero_weights_give_exact_zero() -> None:
    z = torch.randn(3, 4, 16)
    zeros = [torch.zeros(3, 16, 4), torch.zeros(3, 4), torch.zeros(3, 4, 16), torch.zeros(3, 16)]
    for act in (F.gelu, F.relu, F.silu, lambda h: F.gelu(h, approximate="tanh")):
        assert torch.count_nonzero(routed_bottleneck(z, *zeros, [(act, None)])) == 0
