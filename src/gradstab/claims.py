"""Executable claims: the book states a number, the notebook checks it, nbmake fails if it drifts."""
from __future__ import annotations


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
