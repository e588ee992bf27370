"""gradstab.theory: closed forms checked against their definitions and against Monte Carlo."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradstab as gs
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


# --- mean-field theory of tanh networks -------------------------------------------------------------------------

def _scipy_mean(f, q):
    """E_z[f(sqrt(q) z)] by adaptive quadrature (scipy), independent of the Gauss–Hermite rule under test."""
    integrate = pytest.importorskip("scipy.integrate")
    density = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    return integrate.quad(lambda z: density(z) * f(math.sqrt(q) * z), -40, 40, epsabs=1e-14, limit=500)[0]


@pytest.mark.parametrize("sigma_b2, expected", [(0.05, 1.761), (0.1, 1.986)])
def test_critical_line_passes_through_the_known_points(sigma_b2, expected):
    # The two points of issue 12, computed there by an independent quadrature.
    assert theory.critical_sigma_w2(sigma_b2) == pytest.approx(expected, abs=1e-3)
    assert theory.chi1(theory.critical_sigma_w2(sigma_b2), sigma_b2) == pytest.approx(1.0, abs=1e-9)
    assert theory.depth_scale(theory.critical_sigma_w2(sigma_b2), sigma_b2) == math.inf


def test_critical_line_rises_with_bias_variance_and_starts_at_one():
    assert theory.critical_sigma_w2(0.0) == 1.0
    line = [theory.critical_sigma_w2(b) for b in (0.01, 0.05, 0.1, 0.2, 0.3)]
    assert all(a < b for a, b in zip(line, line[1:], strict=False))


@pytest.mark.parametrize("q", [0.0, 0.3, 1.0, 3.0])
def test_gaussian_mean_matches_adaptive_quadrature(q):
    sech4 = lambda u: 1 / math.cosh(u) ** 4  # noqa: E731
    assert theory.gaussian_mean(lambda u: 1 / np.cosh(u) ** 4, q) == pytest.approx(_scipy_mean(sech4, q), abs=1e-7)
    assert theory.gaussian_mean(lambda u: u**2, q) == pytest.approx(q, rel=1e-12)


def test_gaussian_mean_error_grows_beyond_q_3_as_documented():
    sech4 = lambda u: 1 / math.cosh(u) ** 4  # noqa: E731
    error = abs(theory.gaussian_mean(lambda u: 1 / np.cosh(u) ** 4, 10.0) - _scipy_mean(sech4, 10.0))
    assert 1e-5 < error < 1e-3  # "about 2e-4 at q = 10" (QUADRATURE_NODES)


@pytest.mark.parametrize("sigma_w2, sigma_b2", [(1.0, 0.05), (1.76, 0.05), (2.5, 0.1), (4.0, 0.3)])
def test_q_star_is_a_fixed_point_and_chi1_its_slope_formula(sigma_w2, sigma_b2):
    q = theory.q_star(sigma_w2, sigma_b2)
    assert theory.length_map(q, sigma_w2, sigma_b2) == pytest.approx(q, rel=1e-11)
    assert q == pytest.approx(sigma_w2 * _scipy_mean(lambda u: math.tanh(u) ** 2, q) + sigma_b2, rel=1e-7)
    expected = sigma_w2 * _scipy_mean(lambda u: 1 / math.cosh(u) ** 4, q)
    assert theory.chi1(sigma_w2, sigma_b2) == pytest.approx(expected, rel=1e-7)
    assert theory.depth_scale(sigma_w2, sigma_b2) == pytest.approx(1 / abs(math.log(expected)), rel=1e-5)


def test_without_bias_the_signal_dies_below_unit_weight_variance():
    assert theory.q_star(0.8, 0.0) == 0.0
    assert theory.chi1(0.8, 0.0) == pytest.approx(0.8)  # tanh'(0)^2 = 1
    assert theory.q_star(1.5, 0.0) > 0.1
    assert theory.length_map(0.0, 2.0, 0.07) == pytest.approx(0.07)
    assert theory.depth_scale(1.0, 0.0) == math.inf


def test_chi1_and_q_star_match_a_wide_random_tanh_network():
    """Monte Carlo: width 1000, 40 layers; the last 20 layers' mean square and gradient growth vs theory."""
    sigma_w2, sigma_b2, width = 2.5, 0.1, 1000
    model = gs.mlp(40, width=width, in_features=width, activation="tanh", init=math.sqrt(sigma_w2),
                   bias_std=math.sqrt(sigma_b2), seed=3).double()
    x = torch.randn(8, width, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    layers = [b.layer for b in model.blocks][20:]
    profile = gs.signal_profile(model, x, layers=layers, seed=1)
    assert float(profile.forward.pow(2).mean()) == pytest.approx(theory.q_star(sigma_w2, sigma_b2), rel=0.03)
    assert profile.backward_growth**2 == pytest.approx(theory.chi1(sigma_w2, sigma_b2), rel=0.03)


@pytest.mark.parametrize("call, name", [
    (lambda: theory.critical_gain("sigmoid"), "activation"),
    (lambda: theory.variance_factor(-1.0), "gain"),
    (lambda: theory.variance_factor(1.0, "gelu"), "activation"),
    (lambda: theory.init_gain("orthogonal", 4, 4), "init"),
    (lambda: theory.init_gain("he", 0, 4), "fan_in"),
    (lambda: theory.residual_variance_factor(-0.5), "branch_scale"),
    (lambda: theory.recurrence_norm(0.0, 5), "rho"),
    (lambda: theory.recurrence_norm(1.0, -1), "steps"),
    (lambda: theory.chi1(0.0, 0.05), "sigma_w2"),
    (lambda: theory.q_star(1.0, -0.1), "sigma_b2"),
    (lambda: theory.length_map(-1.0, 1.0, 0.1), "q"),
    (lambda: theory.critical_sigma_w2(-0.05), "sigma_b2"),
    (lambda: theory.q_star(1.0001, 0.0, max_layers=5), "max_layers"),
    (lambda: theory.q_star(1.5, 0.1, tol=-1.0), "tol"),
])
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
