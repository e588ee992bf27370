"""Held-out recomputation of the edge of chaos, independent of gradstab.theory's method.

gradstab finds q* by fixed-point iteration, Gaussian means by Gauss–Hermite quadrature and the critical
line by bisection. Here: adaptive quadrature (scipy.integrate.quad) on the Gaussian density, q* as the
root of q - length_map(q) by Brent's method, and the critical weight variance as the root of chi1 - 1,
also by Brent's method, over bias variances the book never states.
"""
from __future__ import annotations

import math

import pytest

from gradstab import theory

integrate = pytest.importorskip("scipy.integrate")
optimize = pytest.importorskip("scipy.optimize")


def _mean(f, q: float) -> float:
    s = math.sqrt(q)
    return integrate.quad(lambda z: math.exp(-z * z / 2) * f(s * z), -40, 40, epsabs=1e-14, limit=500)[0] / math.sqrt(
        2 * math.pi)


def _q_star(sigma_w2: float, sigma_b2: float) -> float:
    return optimize.brentq(lambda q: sigma_w2 * _mean(lambda u: math.tanh(u) ** 2, q) + sigma_b2 - q,
                           1e-12, sigma_w2 + sigma_b2 + 1, xtol=1e-14)


def _chi1(sigma_w2: float, sigma_b2: float) -> float:
    return sigma_w2 * _mean(lambda u: 1 / math.cosh(u) ** 4, _q_star(sigma_w2, sigma_b2))


@pytest.mark.parametrize("sigma_b2", [0.02, 0.07, 0.15, 0.25])
def test_critical_line_recomputed_independently(sigma_b2):
    critical = optimize.brentq(lambda w: _chi1(w, sigma_b2) - 1, 1.0, 4.0, xtol=1e-12)
    assert theory.critical_sigma_w2(sigma_b2) == pytest.approx(critical, abs=1e-6)


@pytest.mark.parametrize("sigma_w2, sigma_b2", [(1.3, 0.02), (2.2, 0.15), (3.1, 0.25)])
def test_chi1_off_the_line_recomputed_independently(sigma_w2, sigma_b2):
    assert theory.chi1(sigma_w2, sigma_b2) == pytest.approx(_chi1(sigma_w2, sigma_b2), rel=1e-6)
