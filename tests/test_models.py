import math

import pytest
import torch
from torch import nn

import gradstab as gs


@pytest.mark.parametrize("depth", [1, 3, 8])
@pytest.mark.parametrize("knobs", [
    {}, {"norm": "batch"}, {"norm": "batch_scratch"}, {"norm": "layer"}, {"residual": True},
    {"residual": True, "branch_scale": 0.5}, {"residual": True, "skipinit": True}, {"init": "xavier"},
    {"init": 1.0}, {"dropout": 0.2}, {"width": 4}, {"activation": "tanh"},
])
def test_cnn_shapes(depth, knobs):
    model = gs.cnn(depth, **knobs)
    out = model(torch.randn(5, 1, 8, 8))
    assert out.shape == (5, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth + 1  # stem + one per block


def test_mlp_shapes():
    model = gs.mlp(4, width=32, norm="batch")
    assert model(torch.randn(6, 64)).shape == (6, 10)
    assert len(gs.weight_layers(model)) == 4 + 2


def test_depth_counts_blocks():
    assert len(gs.cnn(5).blocks) == 5


def test_same_seed_same_weights_and_different_seed_differs():
    a, b, c = gs.cnn(3, seed=1), gs.cnn(3, seed=1), gs.cnn(3, seed=2)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.stem[0].weight, c.stem[0].weight)


def test_model_seed_does_not_disturb_global_generator():
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    gs.cnn(2, seed=5)
    assert torch.equal(torch.rand(1), expected)


@pytest.mark.parametrize("init, std", [("he", lambda fi, fo: math.sqrt(2 / fi)),
                                       ("xavier", lambda fi, fo: math.sqrt(2 / (fi + fo))),
                                       (0.5, lambda fi, fo: 0.5 / math.sqrt(fi))])
def test_init_scales(init, std):
    layer = gs.init_weights(nn.Linear(400, 300), init)
    assert layer.weight.std().item() == pytest.approx(std(400, 300), rel=0.02)
    assert torch.count_nonzero(layer.bias) == 0


def test_bias_std_draws_biases_and_zero_keeps_them_zero():
    layer = gs.init_weights(nn.Linear(50, 4000), 1.0, bias_std=0.3)
    assert layer.bias.std().item() == pytest.approx(0.3, rel=0.05)
    assert abs(layer.bias.mean().item()) < 0.03
    model = gs.mlp(3, seed=1, activation="tanh", init=1.3, bias_std=0.2)
    assert all(b.layer.bias.std().item() > 0.1 for b in model.blocks)
    assert model.config["bias_std"] == 0.2
    plain = gs.mlp(3, seed=1, activation="tanh", init=1.3)
    assert all(torch.count_nonzero(b.layer.bias) == 0 for b in plain.blocks)


def test_residual_skipinit_starts_as_identity():
    model = gs.cnn(4, residual=True, skipinit=True)
    x = torch.randn(3, 16, 8, 8)
    assert torch.equal(model.blocks(x), x)
    assert sum(isinstance(p, nn.Parameter) for p in (b.alpha for b in model.blocks)) == 4


def test_branch_scale_scales_branch():
    model = gs.cnn(1, residual=True, branch_scale=0.0)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(model.blocks(x), x)


def test_norm_choices_build_the_right_layer():
    assert isinstance(gs.cnn(1, norm="batch").blocks[0].norm, nn.BatchNorm2d)
    assert isinstance(gs.cnn(1, norm="batch_scratch").blocks[0].norm, gs.BatchNorm2d)
    assert isinstance(gs.cnn(1, norm="layer").blocks[0].norm, nn.GroupNorm)
    assert isinstance(gs.cnn(1, dropout=0.3).blocks[0].drop, gs.Dropout)


@pytest.mark.parametrize("kwargs, name", [
    ({"depth": 0}, "depth"), ({"depth": 2.5}, "depth"), ({"depth": 2, "width": 0}, "width"),
    ({"depth": 2, "norm": "group"}, "norm"), ({"depth": 2, "init": "orthogonal"}, "init"),
    ({"depth": 2, "init": -1.0}, "init"), ({"depth": 2, "dropout": 1.0}, "dropout"),
    ({"depth": 2, "activation": "gelu"}, "activation"), ({"depth": 2, "branch_scale": -1}, "branch_scale"),
    ({"depth": 2, "bias_std": -0.1}, "bias_std"),
])
def test_bad_knobs(kwargs, name):
    with pytest.raises(ValueError, match=name):
        gs.cnn(**kwargs)


def test_bad_knob_message_lists_allowed_values():
    with pytest.raises(ValueError, match="'none', 'batch', 'batch_scratch', 'layer'"):
        gs.cnn(2, norm="group")


def test_wrong_input_shape():
    with pytest.raises(ValueError, match="input"):
        gs.cnn(2)(torch.randn(4, 3, 8, 8))
    with pytest.raises(ValueError, match="input"):
        gs.mlp(2)(torch.randn(4, 1, 8, 8))
