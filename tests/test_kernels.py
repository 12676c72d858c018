"""Every fast path against the row-by-row reference (PHM: the dense H it materializes): random rows, dtypes."""

import pytest
import torch
import torch.nn.functional as F

from kronserve.kernels import ReferenceKernels, TorchKernels, select_kernels

FAST = [TorchKernels(), select_kernels(torch.device("cpu"))]
TOLERANCES = [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)]


def _close(got: torch.Tensor, expect: torch.Tensor, tol: float) -> None:
    """Tolerance is relative to the output's scale: bf16 rounds both paths differently."""
    scale = expect.abs().max().item()
    assert (got.double() - expect.double()).abs().max().item() <= tol * scale


@pytest.mark.parametrize("fast", FAST, ids=lambda k: k.name)
@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
def test_bottleneck_fast_path_matches_reference(fast, dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator().manual_seed(0)
    slots, b, m, d, k = 6, 9, 5, 32, 8
    bank = [torch.randn(slots, *s, generator=g).to(dtype) for s in ((d, k), (k,), (k, d), (d,))]
    rows = torch.randint(0, slots, (b,), generator=g)
    gathered = [t[rows] for t in bank]
    z = torch.randn(b, m, d, generator=g).to(dtype)
    for act in (F.gelu, F.relu):
        _close(fast.bottleneck(z, *gathered, act), ReferenceKernels().bottleneck(z, *gathered, act), tol)


@pytest.mark.parametrize("fast", FAST, ids=lambda k: k.name)
@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
@pytest.mark.parametrize("rank", [1, 3, None], ids=["rank1", "rank3", "dense"])
def test_phm_from_factors_matches_the_materialized_h(fast, dtype: torch.dtype, tol: float, rank: int | None) -> None:
    g = torch.Generator().manual_seed(2)
    b, m, n, fan_in, fan_out = 4, 5, 4, 32, 16
    x = torch.randn(b, m, fan_in, generator=g).to(dtype)
    rule, bias = torch.randn(b, n, n, n, generator=g).to(dtype), torch.randn(b, fan_out, generator=g).to(dtype)
    if rank is None:
        w = (torch.randn(b, n, fan_in // n, fan_out // n, generator=g).to(dtype),)
    else:
        w = (
            torch.randn(b, n, fan_in // n, rank, generator=g).to(dtype),
            torch.randn(b, n, rank, fan_out // n, generator=g).to(dtype),
        )
    _close(fast.phm(x, rule, w, bias), ReferenceKernels().phm(x, rule, w, bias), 4 * tol)


@pytest.mark.parametrize("fast", FAST, ids=lambda k: k.name)
@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
def test_lora_fast_path_matches_reference(fast, dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator().manual_seed(1)
    slots, b, m, fan_in, r, fan_out = 5, 7, 3, 24, 4, 40
    a_bank = torch.randn(slots, fan_in, r, generator=g).to(dtype)
    b_bank = torch.randn(slots, r, fan_out, generator=g).to(dtype)
    rows = torch.randint(0, slots, (b,), generator=g)
    x = torch.randn(b, m, fan_in, generator=g).to(dtype)
    _close(fast.lora(x, a_bank[rows], b_bank[rows]), ReferenceKernels().lora(x, a_bank[rows], b_bank[rows]), tol)


@pytest.mark.parametrize("kernels", [*FAST, ReferenceKernels()], ids=lambda k: k.name)
def test_zero_weights_give_exact_zero(kernels) -> None:
    z = torch.randn(3, 4, 16)
    zeros = [torch.zeros(3, 16, 4), torch.zeros(3, 4), torch.zeros(3, 4, 16), torch.zeros(3, 16)]
    for act in (F.gelu, F.relu, F.silu, lambda h: F.gelu(h, approximate="tanh")):
        assert torch.count_nonzero(kernels.bottleneck(z, *zeros, act)) == 0
    assert torch.count_nonzero(kernels.lora(z, torch.zeros(3, 16, 2), torch.zeros(3, 2, 8))) == 0
