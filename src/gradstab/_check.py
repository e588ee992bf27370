"""Argument checks shared by the package: each raises a ValueError that names the argument."""
from __future__ import annotations

import math
from collections.abc import Iterable


def positive_int(name: str, value, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def positive_float(name: str, value, allow_zero: bool = False) -> float:
    """Return ``value`` as float if it is finite and > 0 (>= 0 with ``allow_zero``)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    bound = ">= 0" if allow_zero else "> 0"
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return x


def one_of(name: str, value, allowed: Iterable) -> object:
    """Return ``value`` if it is one of ``allowed``, else raise ValueError listing them."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value
