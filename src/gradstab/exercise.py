"""The in-notebook check of an exercise whose answer is a number.

The reader writes an estimate into a cell and runs :func:`check_answer`; the expected value is the one the
notebook has just measured or computed, so the check is true on any machine. An empty answer (``None``)
only prints what to do, so the notebook runs from top to bottom unattended (as the book build and nbmake
run it).
"""
from __future__ import annotations

import math
import numbers


def check_answer(answer: float | None, expected: float, *, rel: float = 0.1, abs_tol: float = 0.0,
                 unit: str = "") -> bool | None:
    """Compare a reader's ``answer`` with the ``expected`` value and print the verdict.

    ``answer`` is a number (Python, NumPy, or a one-element tensor) or ``None`` (not attempted yet: prints how to
    answer and returns ``None``); so is ``expected``, which cannot be None.
    The answer counts as right when ``|answer - expected| <= max(rel * |expected|, abs_tol)``; ``unit`` is
    printed after the numbers. Returns True or False. Never raises for a wrong answer, so a reader's
    attempt does not stop the notebook.

    Raises ValueError when ``expected`` is not a finite number, ``answer`` is neither None nor a number,
    or ``rel``/``abs_tol`` is negative (or both are 0).
    """
    expected = _number("expected", expected)
    if not math.isfinite(expected):
        raise ValueError(f"expected must be a finite number; got {expected!r}")
    if not (rel >= 0 and abs_tol >= 0 and (rel > 0 or abs_tol > 0)):
        raise ValueError(f"rel and abs_tol must be >= 0, not both 0; got rel={rel!r}, abs_tol={abs_tol!r}")
    suffix = f" {unit}" if unit else ""
    if answer is None:
        print("Write your estimate in `answer` above and run this cell again "
              f"(it counts within {_tolerance(rel, abs_tol, suffix)}).")
        return None
    answer = _number("answer", answer)
    right = math.isfinite(answer) and abs(answer - expected) <= max(rel * abs(expected), abs_tol)
    verdict = "✓ right" if right else "✗ not yet"
    print(f"{verdict}: you said {answer:.4g}{suffix}; the notebook measured {expected:.4g}{suffix}.")
    return right


def _number(name: str, value) -> float:
    """``value`` as a float: a real number (Python, NumPy) or a one-element tensor or array; else ValueError."""
    if getattr(value, "shape", None) is not None and math.prod(value.shape) == 1:
        value = value.item()  # a 0-d or one-element torch tensor or NumPy array
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number{' or None' if name == 'answer' else ''}; got {value!r}")
    return float(value)


def _tolerance(rel: float, abs_tol: float, suffix: str) -> str:
    parts = [f"{rel:.0%} of the measured value"] if rel else []
    parts += [f"{abs_tol:g}{suffix}"] if abs_tol else []
    return " or ".join(parts)
