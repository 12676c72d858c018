"""PHM family: the Kronecker math against torch.kron, parameter counts against the paper, validation."""

import pytest
import torch

from kronserve.errors import InvalidSpec
from kronserve.methods import Geometry, init_tensors, parse_spec, preset
from kronserve.methods.phm import phm_matrix

T5_BASE = Geometry(d_model=768, num_layers=12, num_decoder_layers=12)


def kron_sum(rule: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return sum(torch.kron(rule[i], w[i]) for i in range(rule.shape[0]))


def test_phm_matrix_is_the_sum_of_kronecker_products() -> None:
    g = torch.Generator().manual_seed(1)
    rule, w = (
        torch.randn(4, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(4, 5, 3, generator=g, dtype=torch.float64),
    )
    torch.testing.assert_close(phm_matrix(rule, w), kron_sum(rule, w), rtol=0, atol=1e-12)


def test_factorized_einsum_of_design_md_matches_kron() -> None:
    """DESIGN.md's serving identity: x @ Σ kron(C_i, s_i t_i) == einsum over the compact factors."""
    g = torch.Generator().manual_seed(2)
    n, d, k, r, b = 4, 16, 8, 2, 3
    c = torch.randn(n, n, n, generator=g, dtype=torch.float64)
    s = torch.randn(n, d // n, r, generator=g, dtype=torch.float64)
    t = torch.randn(n, r, k // n, generator=g, dtype=torch.float64)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    via_factors = torch.einsum("iak,bap,ipr,irq->bkq", c, x.reshape(b, n, d // n), s, t).reshape(b, k)
    torch.testing.assert_close(x @ phm_matrix(c, s @ t), via_factors, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("method", "params"),
    [("compacter", 114_112), ("compacter++", 57_088)],
)
def test_param_counts_match_the_paper_for_t5_base(method: str, params: int) -> None:
    spec = preset(method, reduction_factor=32, phm_dim=4, rank=1)
    assert spec.param_count(T5_BASE) == params
    # The paper's trainable count adds the T5 layer norms it trains with the adapters: 62 x 768.
    with_norms = preset(method, reduction_factor=32, phm_dim=4, rank=1, layer_norms=True)
    assert with_norms.param_count(T5_BASE) - params == 47_616


def test_compacter_per_adapter_count_is_2r_plus_1_times_d_plus_k() -> None:
    spec = preset("compacter", reduction_factor=32, phm_dim=4, rank=3)
    d, k = 768, 24
    assert spec.param_count(T5_BASE) == 48 * (2 * 3 + 1) * (d + k) + 4**3


def test_shared_rule_is_one_tensor_and_phm_adapter_has_one_per_layer() -> None:
    shapes = preset("compacter").tensor_shapes(T5_BASE)
    assert [n for n in shapes if "phm_rule" in n] == ["phm_rule"]
    phm = preset("phm").tensor_shapes(T5_BASE)
    assert len([n for n in phm if n.endswith("phm_rule")]) == 2 * 48
    assert phm["encoder.0.mh.down.W"] == (4, 192, 6)


def test_factorized_rule_materializes_as_left_times_right() -> None:
    g = Geometry(64, 1, 1)
    spec = preset("compacter", reduction_factor=4, factorized_rule=True)
    t = init_tensors(spec, g, seed=3, std=0.5)
    assert t["phm_rule_left"].shape == (4, 4, 1) and t["phm_rule_right"].shape == (4, 1, 4)
    dense = spec.dense(t, "encoder.0.ffn")
    rule = t["phm_rule_left"] @ t["phm_rule_right"]
    expect = kron_sum(rule, t["encoder.0.ffn.down.W_left"] @ t["encoder.0.ffn.down.W_right"])
    torch.testing.assert_close(dense.down_w, expect, rtol=1e-6, atol=1e-6)


def test_paper_init_scales() -> None:
    """As the paper's code (rabeehk/compacter seq2seq/, configs/compacter.json): shared rule ~ N(0, 1e-4), each
    W factor slice torch.nn.init.xavier_uniform_(gain=sqrt(2)) (hypercomplex/inits.py), biases zero."""
    g = Geometry(768, 2, 2)
    t = init_tensors(preset("compacter"), g, seed=0)
    assert t["phm_rule"].std().item() == pytest.approx(1e-4, rel=0.3)
    assert torch.count_nonzero(t["encoder.0.mh.down.b"]) == 0
    w = t["encoder.0.mh.down.W_left"]  # 4 slices of (192, 1)
    reference = torch.nn.init.xavier_uniform_(torch.empty(192, 1), gain=2**0.5)
    bound = 2**0.5 * (6 / 193) ** 0.5
    assert reference.abs().max().item() <= bound and w.abs().max().item() <= bound
    assert w.abs().max().item() > 0.95 * bound and w.std().item() == pytest.approx(bound / 3**0.5, rel=0.15)


def test_phm_adapter_init_and_preset_follow_the_paper() -> None:
    """PHM-Adapter (configs/phm_adapters.json): n = 12 where the sizes allow, per-layer rules ~ N(0, 0.01)
    (hypercomplex/layers.py PHMLinear.reset_parameters, c_init normal)."""
    base, small = Geometry(768, 2, 2), Geometry(512, 2, 2)
    assert preset("phm", base).phm_dim == 12  # d 768, bottleneck 24
    assert preset("phm", small).phm_dim == 8  # d 512, bottleneck 16: 12 does not divide
    assert preset("phm", base, phm_dim=4).phm_dim == 4 and preset("phm").phm_dim == 4  # asked for, or no sizes
    t = init_tensors(preset("phm", base), base, seed=0)
    assert t["encoder.0.mh.down.phm_rule"].std().item() == pytest.approx(0.01, rel=0.3)
    assert t["encoder.0.mh.down.W"].shape == (12, 64, 2)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"phm_dim": 5}, "phm_dim 5 does not divide d_model"),
        ({"reduction_factor": 7}, "reduction_factor 7 does not divide"),
        ({"reduction_factor": 64}, "does not divide the bottleneck size"),
        ({"leave_out": (0, 99)}, "leave_out has layer indices outside"),
    ],
)
def test_spec_errors_name_the_field(overrides: dict, needle: str) -> None:
    with pytest.raises(InvalidSpec, match=needle):
        preset("compacter", **overrides).check_geometry(Geometry(128, 2, 2))


def test_parse_spec_names_bad_fields() -> None:
    good = preset("compacter").model_dump()
    with pytest.raises(InvalidSpec, match="activation"):
        parse_spec({**good, "activation": "tanh"})
    with pytest.raises(InvalidSpec, match="method"):
        parse_spec({**good, "method": "ia3"})
    with pytest.raises(InvalidSpec, match="bogus"):
        parse_spec({**good, "bogus": 1})
    with pytest.raises(InvalidSpec, match="sites"):
        parse_spec({**good, "sites": ["ffn", "ffn"]})
