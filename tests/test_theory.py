"""gradstab.theory: closed forms checked against their definitions and against Monte Carlo."""
from __future__ import annotations

import math

import pytest
import torch

from gradstab import theory


def test_relu_critical_gain_is_sqrt2():
    assert theory.critical_gain("relu") == pytest.approx(math.sqrt(2))
    assert theory.RELU_CRITICAL_GAIN == pytest.approx(math.sqrt(2))
    assert theory.critical_gain("linear") == 1.0
    assert theory.variance_factor(theory.critical_gain("relu")) == pytest.approx(1.0)


@pytest.mark.parametrize("gain", [0.5, 1.0, math.sqrt(2), 2.0])
def test_variance_factor_is_gain_squared_over_two_for_relu(gain):
    assert theory.variance_factor(gain) == pytest.approx(gain**2 / 2)
    assert theory.signal_factor(gain) == pytest.approx(gain / math.sqrt(2))
    assert theory.variance_factor(gain, "linear") == pytest.approx(gain**2)


def test_variance_factor_matches_monte_carlo_relu_layer():
    gen = torch.Generator().manual_seed(0)
    n, gain = 512, 1.7
    x = torch.randn(2048, n, generator=gen, dtype=torch.float64)
    w = torch.randn(n, n, generator=gen, dtype=torch.float64) * gain / math.sqrt(n)
    y = torch.relu(x @ w.T)
    # mean square of relu(Wx) over that of x: g^2 / 2
    ratio = float(y.pow(2).mean() / x.pow(2).mean())
    assert ratio == pytest.approx(theory.variance_factor(gain), rel=0.03)


def test_bn_relu_growth_constant():
    assert theory.BN_RELU_GRADIENT_GROWTH == pytest.approx(math.sqrt(math.pi / (math.pi - 1)))
    assert theory.BN_RELU_GRADIENT_GROWTH == pytest.approx(1.2112, abs=1e-4)


def test_init_gain():
    assert theory.init_gain("he", 64, 64) == pytest.approx(math.sqrt(2))
    assert theory.init_gain("xavier", 256, 256) == pytest.approx(1.0)
    assert theory.init_gain("xavier", 64, 192) == pytest.approx(math.sqrt(2 * 64 / 256))
    assert theory.init_gain(1.3, 5, 7) == 1.3
    # Xavier in a square ReLU layer shrinks the signal by 1/sqrt(2) per layer
    assert theory.signal_factor(theory.init_gain("xavier", 256, 256)) == pytest.approx(1 / math.sqrt(2))


def test_residual_variance_factor():
    assert theory.residual_variance_factor() == 2.0
    assert theory.residual_variance_factor(0.0) == 1.0
    depth = 32
    total = theory.residual_variance_factor(1 / math.sqrt(depth)) ** depth
    assert total < math.e


def test_recurrence_norm():
    r = theory.recurrence_norm(1.1, 50, start=8.0)
    assert r.shape == (51,)
    assert float(r[0]) == 8.0
    assert float(r[-1]) == pytest.approx(8.0 * 1.1**50)


@pytest.mark.parametrize("call, name", [
    (lambda: theory.critical_gain("sigmoid"), "activation"),
    (lambda: theory.variance_factor(-1.0), "gain"),
    (lambda: theory.variance_factor(1.0, "gelu"), "activation"),
    (lambda: theory.init_gain("orthogonal", 4, 4), "init"),
    (lambda: theory.init_gain("he", 0, 4), "fan_in"),
    (lambda: theory.residual_variance_factor(-0.5), "branch_scale"),
    (lambda: theory.recurrence_norm(0.0, 5), "rho"),
    (lambda: theory.recurrence_norm(1.0, -1), "steps"),
])
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
