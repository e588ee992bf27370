"""Closed-form predictions for how a signal's scale changes from layer to layer at initialization.

Each function states the formula it returns; the chapters draw these beside measurements
made with :mod:`gradstab.probe`. Conventions: a layer's weights are N(0, g^2 / fan_in), so
``g`` is the *gain*; "factor" means the ratio of a root-mean-square (an amplitude), and
"variance factor" the ratio of a mean square.
"""
from __future__ import annotations

import math

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
