import pytest
import torch
from torch import nn

from kronserve.methods import Geometry, init_tensors, preset


def test_dense_form_equals_nn_linear_with_scaling() -> None:
    g = Geometry(32, 1, 1)
    spec = preset("pfeiffer", reduction_factor=4, scaling=0.5)
    t = init_tensors(spec, g, seed=1, std=0.4)
    site = "decoder.0.ffn"
    down, up = nn.Linear(32, 8), nn.Linear(8, 32)
    with torch.no_grad():
        down.weight.copy_(t[f"{site}.down.weight"])
        down.bias.copy_(t[f"{site}.down.bias"])
        up.weight.copy_(t[f"{site}.up.weight"])
        up.bias.copy_(t[f"{site}.up.bias"])
    z = torch.randn(5, 32)
    d = spec.dense(t, site)
    got = torch.relu(z @ d.down_w + d.down_b) @ d.up_w + d.up_b
    torch.testing.assert_close(got, 0.5 * up(torch.relu(down(z))), rtol=1e-6, atol=1e-6)


def test_sites_and_leave_out() -> None:
    g = Geometry(32, 2, 2)
    houlsby = preset("houlsby", reduction_factor=4, leave_out=(0, 3))
    assert houlsby.active_sites(g) == ["encoder.1.mh", "encoder.1.ffn", "decoder.0.mh", "decoder.0.ffn"]
    assert preset("pfeiffer", reduction_factor=4).active_sites(g) == [
        "encoder.0.ffn",
        "encoder.1.ffn",
        "decoder.0.ffn",
        "decoder.1.ffn",
    ]


def test_paper_init_is_torch_linear_default() -> None:
    """As the paper's code (rabeehk/compacter seq2seq/adapters/adapter_modeling.py `Adapter`): plain nn.Linear
    down and up, left at torch's default init, so each tensor spans U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    t = init_tensors(preset("houlsby", reduction_factor=4), Geometry(256, 1, 1), seed=0)
    down, up = nn.Linear(256, 64), nn.Linear(64, 256)  # the reference: torch's own default init
    for name, ref in (
        ("down.weight", down.weight),
        ("down.bias", down.bias),
        ("up.weight", up.weight),
        ("up.bias", up.bias),
    ):
        ours = t[f"encoder.0.mh.{name}"]
        bound = (256 if name.startswith("down") else 64) ** -0.5
        assert ours.shape == ref.shape
        assert ours.abs().max().item() <= bound and ref.abs().max().item() <= bound
        assert ours.std().item() == pytest.approx(ref.std().item(), rel=0.2)
