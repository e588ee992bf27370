"""Closed-form predictions for how a signal's scale changes from layer to layer at initialization.

Each function states the formula it returns; the chapters draw these beside measurements
made with :mod:`gradstab.probe`. Conventions: a layer's weights are N(0, g^2 / fan_in), so
``g`` is the *gain*; "factor" means the ratio of a root-mean-square (an amplitude), and
"variance factor" the ratio of a mean square.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ._check import one_of, positive_float, positive_int

#: The gain at which a ReLU layer preserves the mean square of its input (He et al. 2015).
RELU_CRITICAL_GAIN = math.sqrt(2.0)

#: Per-layer growth, toward the input, of the gradient of a deep BN-ReLU network at
#: initialization: sqrt(pi / (pi - 1)) ~ 1.2112 (Yang et al. 2019).
BN_RELU_GRADIENT_GROWTH = math.sqrt(math.pi / (math.pi - 1.0))

# E[phi(z)^2] / E[z^2] for z ~ N(0, q) as q -> 0: the fraction of its input's mean square that
# the activation passes on (tanh is linear near 0, so its small-signal value is 1).
_PASS_FRACTION = {"relu": 0.5, "linear": 1.0, "tanh": 1.0}


def critical_gain(activation: str = "relu") -> float:
    """The gain g that keeps the mean square constant across layers: sqrt(2) for ReLU, 1 for linear/tanh.

    For tanh (zero biases) this is the small-signal value: tanh'(0) = 1.
    """
    one_of("activation", activation, tuple(_PASS_FRACTION))
    return 1.0 / math.sqrt(_PASS_FRACTION[activation])


def variance_factor(gain: float, activation: str = "relu") -> float:
    """Per-layer change of the mean square, forward or backward: g^2 / 2 for ReLU, g^2 for linear.

    After L layers the mean square is multiplied by ``variance_factor(g) ** L``.
    """
    positive_float("gain", gain)
    one_of("activation", activation, tuple(_PASS_FRACTION))
    return gain**2 * _PASS_FRACTION[activation]


def signal_factor(gain: float, activation: str = "relu") -> float:
    """Per-layer change of the signal's amplitude (root mean square): sqrt(variance_factor), g / sqrt(2) for ReLU."""
    return math.sqrt(variance_factor(gain, activation))


def init_gain(init, fan_in: int, fan_out: int) -> float:
    """The gain g (weights N(0, g^2/fan_in)) that an initialization scheme amounts to.

    ``"he"``: sqrt(2); ``"xavier"`` (Glorot & Bengio 2010, variance 2/(fan_in+fan_out)):
    sqrt(2 fan_in / (fan_in + fan_out)), i.e. 1 for a square layer; a number: itself.
    """
    positive_int("fan_in", fan_in)
    positive_int("fan_out", fan_out)
    if isinstance(init, str):
        one_of("init", init, ("he", "xavier"))
        return RELU_CRITICAL_GAIN if init == "he" else math.sqrt(2 * fan_in / (fan_in + fan_out))
    return positive_float("init", init)


def residual_variance_factor(branch_scale: float = 1.0) -> float:
    """Per-block mean-square factor of ``x + a * f(x)`` when f preserves the mean square and is uncorrelated with x.

    Returns 1 + a^2: 2 for an unscaled sum, so L blocks multiply the mean square by 2^L;
    with a = 1/sqrt(L) the total is (1 + 1/L)^L < e.
    """
    a = positive_float("branch_scale", branch_scale, allow_zero=True)
    return 1.0 + a**2


def recurrence_norm(rho: float, steps: int, start: float = 1.0) -> torch.Tensor:
    """rho^t * start for t = 0..steps: the gradient norm t steps back through h_t = W h_{t-1}.

    Exact when every singular value of W equals rho (W = rho * orthogonal); for any W
    with spectral radius rho, the norm's growth *rate* tends to rho as t grows.
    """
    positive_float("rho", rho)
    positive_int("steps", steps, minimum=0)
    return start * torch.tensor(rho, dtype=torch.float64) ** torch.arange(steps + 1, dtype=torch.float64)


# --- Mean-field signal propagation in a wide random tanh network (Poole et al. 2016; Schoenholz et al. 2017) ---
# Layer l: h_l = W_l tanh(h_{l-1}) + b_l with W_l ~ N(0, sigma_w2 / fan_in) and b_l ~ N(0, sigma_b2); in
# gradstab that is gs.mlp(..., activation="tanh", init=sqrt(sigma_w2), bias_std=sqrt(sigma_b2)). As the
# width grows, the pre-activations of one input become Gaussian with a per-unit mean square q_l, and
# Gaussian expectations E_z[f(z)], z ~ N(0, 1), are all this theory needs.

#: Gauss–Hermite nodes for E_z[f(sqrt(q) z)]. For tanh the error is below 1e-7 up to q = 3 (sigma_w2 up to about
#: 5) and grows beyond, to about 2e-4 at q = 10, as tanh' narrows against the Gaussian (tests/test_theory.py).
QUADRATURE_NODES = 201
_Z, _W = np.polynomial.hermite_e.hermegauss(QUADRATURE_NODES)  # weight exp(-z^2 / 2): probabilists' Hermite
_W = _W / _W.sum()


def gaussian_mean(f, q: float) -> float:
    """E_z[f(sqrt(q) z)] for z ~ N(0, 1), by Gauss–Hermite quadrature (``f`` maps a NumPy array elementwise).

    ``q`` (>= 0) is the variance of the argument. Exact for polynomials of degree below 2 * QUADRATURE_NODES;
    for smooth bounded ``f`` whose features are much narrower than sqrt(q) it loses accuracy (see
    ``QUADRATURE_NODES``).
    """
    q = positive_float("q", q, allow_zero=True)
    return float(np.dot(_W, f(math.sqrt(q) * _Z)))


def _sech2(u: np.ndarray) -> np.ndarray:
    return 1.0 / np.cosh(np.clip(u, -350.0, 350.0)) ** 2  # tanh'(u); clipped so cosh does not overflow


def _variances(sigma_w2: float, sigma_b2: float) -> tuple[float, float]:
    return positive_float("sigma_w2", sigma_w2), positive_float("sigma_b2", sigma_b2, allow_zero=True)


def length_map(q: float, sigma_w2: float, sigma_b2: float) -> float:
    """One layer of the length map: q_{l+1} = sigma_w2 * E_z[tanh(sqrt(q_l) z)^2] + sigma_b2 (Poole et al. 2016, eq. 3).

    ``q`` is the mean square of a pre-activation unit (dimensionless); returns the next layer's.
    Raises ValueError for q < 0, sigma_w2 <= 0 or sigma_b2 < 0.
    """
    sigma_w2, sigma_b2 = _variances(sigma_w2, sigma_b2)
    return sigma_w2 * gaussian_mean(lambda u: np.tanh(u) ** 2, q) + sigma_b2


def q_star(sigma_w2: float, sigma_b2: float, tol: float = 1e-13, max_layers: int = 100_000) -> float:
    """The fixed point q* = length_map(q*) that the pre-activations' mean square settles to with depth.

    Found by fixed-point iteration from q = sigma_w2 + sigma_b2 (what a deep network does, layer by layer),
    until one step changes q by less than ``tol`` (relative). With sigma_b2 = 0 and sigma_w2 <= 1 the only
    fixed point is 0 (the signal dies out) and 0.0 is returned at once. Raises ValueError if the iteration
    has not converged after ``max_layers`` steps (only possible right at sigma_b2 = 0, sigma_w2 -> 1).
    """
    sigma_w2, sigma_b2 = _variances(sigma_w2, sigma_b2)
    positive_float("tol", tol)
    if sigma_b2 == 0 and sigma_w2 <= 1:
        return 0.0
    q = sigma_w2 + sigma_b2
    for _ in range(positive_int("max_layers", max_layers)):
        q_next = length_map(q, sigma_w2, sigma_b2)
        if abs(q_next - q) <= tol * q_next:
            return q_next
        q = q_next
    raise ValueError(f"q* did not converge in max_layers={max_layers} steps (sigma_w2={sigma_w2}, "
                     f"sigma_b2={sigma_b2}); raise max_layers")


def chi1(sigma_w2: float, sigma_b2: float) -> float:
    """chi_1 = sigma_w2 * E_z[tanh'(sqrt(q*) z)^2]: the per-layer factor of the backpropagated gradient's mean
    square at the fixed point (Poole et al. 2016; Schoenholz et al. 2017, eq. 9).

    chi_1 < 1: ordered phase, gradients vanish toward the input; chi_1 > 1: chaotic phase, they explode;
    chi_1 = 1: the critical line, the edge of chaos. Dimensionless.
    """
    return _variances(sigma_w2, sigma_b2)[0] * gaussian_mean(lambda u: _sech2(u) ** 2, q_star(sigma_w2, sigma_b2))


def depth_scale(sigma_w2: float, sigma_b2: float) -> float:
    """``xi = 1 / |ln chi_1|``: the number of layers over which the gradient's mean square changes by a factor e.

    Infinite on the critical line, and wherever ``|ln chi_1| < 1e-9`` (xi above 1e9 layers): closer to the line
    than that the quadrature's rounding decides the value, and a point returned by
    :func:`critical_sigma_w2` lies there. Schoenholz et al. (2017) found networks trainable up to about
    6 xi (their xi is the depth scale of input correlations, which equals this one in the ordered phase).
    """
    log_chi = abs(math.log(chi1(sigma_w2, sigma_b2)))
    return math.inf if log_chi < 1e-9 else 1.0 / log_chi


def critical_sigma_w2(sigma_b2: float, tol: float = 1e-12) -> float:
    """The weight variance on the critical line chi_1(sigma_w2, sigma_b2) = 1, for a bias variance sigma_b2 >= 0.

    Found by bisection on sigma_w2 >= 1 (chi_1 < 1 at sigma_w2 = 1 and grows with sigma_w2), to ``tol``
    (absolute). Examples: 1 at sigma_b2 = 0; about 1.761 at 0.05 and 1.986 at 0.1.
    """
    sigma_b2 = positive_float("sigma_b2", sigma_b2, allow_zero=True)
    positive_float("tol", tol)
    if sigma_b2 == 0:
        return 1.0
    low, high = 1.0, 2.0
    while chi1(high, sigma_b2) < 1:
        low, high = high, 2 * high
    while high - low > tol:
        mid = 0.5 * (low + high)
        low, high = (mid, high) if chi1(mid, sigma_b2) < 1 else (low, mid)
    return 0.5 * (low + high)
