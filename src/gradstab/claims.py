"""Executable claims: the book states a number, the notebook checks it, nbmake fails if it drifts.

Two kinds of claim. A *deterministic* claim (parity with PyTorch, a theory rate, an identity) is
one value checked with :func:`claim` or :func:`claim_between`. A claim about a *training outcome*
is a statement over several seeds, because one run near the edge of divergence takes another path
on another CPU: :func:`claim_seeds` checks that all (or at least ``k``) of the per-seed values lie
in a range and prints the seed count and the spread; :func:`claim_median` checks the median.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


class ClaimFailed(AssertionError):
    """Raised when a measured outcome no longer supports the sentence the book prints."""


def claim(holds: bool, statement: str) -> None:
    """Print ``✓ statement`` if ``holds``, else raise :class:`ClaimFailed` with the statement."""
    if not bool(holds):
        raise ClaimFailed(f"claim no longer holds: {statement}")
    print(f"✓ {statement}")


def claim_between(value: float, low: float, high: float, statement: str) -> None:
    """Claim that ``low <= value <= high``; the measured value is shown either way."""
    claim(low <= value <= high, f"{statement} (measured {value:.4g}; expected {low:.4g} to {high:.4g})")


@dataclass(frozen=True)
class Spread:
    """Summary of one quantity measured once per seed: ``n`` values, their median, mean and range."""

    values: tuple[float, ...]
    unit: str = "seeds"

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def __str__(self) -> str:
        return (f"median {self.median:.4g}, mean {self.mean:.4g}, range {self.low:.4g} to {self.high:.4g} "
                f"over {self.n} {self.unit}")


def spread(values: Sequence[float], unit: str = "seeds") -> Spread:
    """The :class:`Spread` of per-seed ``values`` (numbers, or bools counted as 1/0; nan allowed).

    ``unit`` names what was counted, for the printed line: "seeds", or "runs" when several
    settings' seeds are pooled.

    Raises ValueError if ``values`` is empty.
    """
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError("values must hold one value per seed, got an empty sequence")
    return Spread(values, unit)


def claim_seeds(values: Sequence[float | bool], statement: str, *, low: float = -math.inf,
                high: float = math.inf, k: int | None = None, unit: str = "seeds") -> Spread:
    """Claim that at least ``k`` (default: all) of the per-seed ``values`` lie in ``[low, high]``.

    ``values`` holds one number per seed, or one bool per seed (True counts as holding; leave
    ``low``/``high`` unset); ``unit`` says what they count ("runs" when several settings' seeds are
    pooled). A nan never lies in the range. The printed line gives ``k of n`` seeds,
    the range asked for and the measured spread, e.g.
    ``✓ clipping keeps the run finite: 5 of 5 seeds (range 0 to 0 ...)``. Returns the :class:`Spread`.
    Raises ValueError for an empty ``values``, ``k`` outside 1..n or ``low > high``.
    """
    flags = all(isinstance(v, bool) for v in values)
    if flags and (low != -math.inf or high != math.inf):
        raise ValueError("low and high apply to numbers; for bools leave them unset")
    if flags:
        low = high = 1.0  # True holds, False does not
    s = spread(values, unit)
    k = s.n if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= s.n:
        raise ValueError(f"k must be an integer from 1 to the number of seeds ({s.n}), got {k!r}")
    if low > high:
        raise ValueError(f"low must not exceed high, got low={low}, high={high}")
    hits = sum(low <= v <= high for v in s.values)
    bounds = "" if flags else _bounds(low, high)
    detail = f"{hits} of {s.n} {unit}" + (f" {bounds}; {s}" if bounds else "")
    claim(hits >= k, f"{statement} ({detail}{'' if k == s.n else f'; needed {k}'})")
    return s


def claim_median(values: Sequence[float], low: float, high: float, statement: str, unit: str = "seeds") -> Spread:
    """Claim that the median of the per-seed ``values`` lies in ``[low, high]``; prints the spread.

    Use it for a typical value ("about 30%") whose seeds scatter around it. Returns the :class:`Spread`.
    """
    s = spread(values, unit)
    claim(low <= s.median <= high, f"{statement} ({s}; median expected {low:.4g} to {high:.4g})")
    return s


def _bounds(low: float, high: float) -> str:
    if low == -math.inf and high == math.inf:
        return ""
    if low == -math.inf:
        return f"at most {high:.4g}"
    if high == math.inf:
        return f"at least {low:.4g}"
    return f"in [{low:.4g}, {high:.4g}]"
