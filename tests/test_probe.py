"""gradstab.probe: measurements at initialization, checked on cases with known answers."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradstab as gs
from gradstab import theory
from gradstab.probe import gradient_through_time, growth_per_layer, linear_gradient_norms, signal_profile


def batch(n=256, features=64, seed=0):
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed))


def test_growth_per_layer_recovers_a_geometric_rate():
    norms = 3.0 * 1.25 ** torch.arange(20.0)
    assert growth_per_layer(norms) == pytest.approx(1.25)
    assert growth_per_layer(norms.flip(0)) == pytest.approx(0.8)
    assert growth_per_layer([5.0, 5.0, 5.0]) == pytest.approx(1.0)


@pytest.mark.parametrize("norms", [[1.0], [1.0, 0.0], [1.0, float("nan")], [1.0, -2.0]])
def test_growth_per_layer_rejects_unusable_norms(norms):
    with pytest.raises(ValueError, match="norms"):
        growth_per_layer(norms)


@pytest.mark.parametrize("gain", [1.0, math.sqrt(2), 2.0])
def test_relu_mlp_signal_follows_gain_over_sqrt2(gain):
    net = gs.mlp(30, init=gain, width=256)
    profile = signal_profile(net, batch(), layers=list(net.blocks))
    expected = theory.signal_factor(gain)
    # finite width (256) leaves a few per cent of noise in the fitted rate
    assert profile.forward_growth == pytest.approx(expected, rel=0.05)
    assert profile.backward_growth == pytest.approx(expected, rel=0.05)


def test_bn_relu_gradient_grows_toward_the_input():
    net = gs.mlp(40, init="he", width=256, norm="batch").train()
    profile = signal_profile(net, batch(), layers=list(net.blocks))
    assert profile.forward_growth == pytest.approx(1.0, abs=0.01)  # BN fixes the forward scale
    assert profile.backward_growth == pytest.approx(theory.BN_RELU_GRADIENT_GROWTH, rel=0.05)


def test_signal_profile_defaults_and_leaves_grads_alone():
    net = gs.mlp(3, width=16)
    profile = signal_profile(net, batch(8))
    assert profile.names == [name for name, _ in gs.weight_layers(net)]
    assert len(profile.forward) == len(profile.backward) == 5
    assert all(p.grad is None for p in net.parameters())
    assert (profile.backward > 0).all()


def test_signal_profile_backward_is_the_jacobian_product():
    # one linear layer y = W x: the gradient at the layer output is the seeded direction itself
    net = nn.Sequential(nn.Linear(4, 3))
    x = batch(5, 4)
    profile = signal_profile(net, x, seed=3)
    direction = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    assert float(profile.backward[0]) == pytest.approx(float(direction.pow(2).mean().sqrt()))
    assert float(profile.forward[0]) == pytest.approx(float(net(x).detach().pow(2).mean().sqrt()))


def test_signal_profile_rejects_foreign_layers():
    net = gs.mlp(2, width=8)
    with pytest.raises(ValueError, match="layers"):
        signal_profile(net, batch(4), layers=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="layers"):
        signal_profile(net, batch(4), layers=[])


@pytest.mark.parametrize("rho", [0.9, 1.0, 1.1])
def test_scaled_orthogonal_recurrence_is_exactly_rho_to_the_t(rho):
    h, steps = 32, 40
    q, _ = torch.linalg.qr(torch.randn(h, h, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    norms = linear_gradient_norms([rho * q] * steps)
    assert norms.shape == (steps + 1,)
    torch.testing.assert_close(norms, theory.recurrence_norm(rho, steps, math.sqrt(h)), rtol=1e-10, atol=0)


def test_linear_gradient_norms_equals_explicit_matrix_product():
    gen = torch.Generator().manual_seed(2)
    ws = [torch.randn(6, 6, generator=gen, dtype=torch.float64) for _ in range(4)]
    g = torch.randn(6, generator=gen, dtype=torch.float64)
    norms = linear_gradient_norms(ws, grad=g)
    v = g.clone()
    for k, w in enumerate(reversed(ws), start=1):
        v = w.T @ v
        assert float(norms[k]) == pytest.approx(float(v.norm()))


def test_linear_gradient_norms_rejects_bad_shapes():
    with pytest.raises(ValueError, match="weights"):
        linear_gradient_norms([torch.eye(3), torch.eye(4)])
    with pytest.raises(ValueError, match="weights"):
        linear_gradient_norms([])
    with pytest.raises(ValueError, match="grad"):
        linear_gradient_norms([torch.eye(3)], grad=torch.ones(4))


def test_gradient_through_time_grows_for_large_recurrent_weights():
    x = torch.randn(8, 60, 4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    rnn = nn.RNN(4, 32, batch_first=True)
    small = gradient_through_time(rnn, x)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(4)
    large = gradient_through_time(rnn, x)
    assert small.shape == (60,)
    assert float(small[0] / small[-1]) < 1e-3   # vanishes back through time
    assert float(large[0] / large[-1]) > 1e3    # explodes back through time


def test_gradient_through_time_checks_its_inputs():
    with pytest.raises(ValueError, match="rnn"):
        gradient_through_time(nn.RNN(4, 8), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="x"):
        gradient_through_time(nn.LSTM(4, 8, batch_first=True), torch.zeros(2, 3, 5))
