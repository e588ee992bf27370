"""Summaries of training runs: comparison tables (plain Markdown, no pandas) and phase grids.

A *run* is a :class:`~gradstab.train.History`. Tables compare labelled runs; a phase grid
arranges the runs of a sweep by (variant, depth, learning rate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._check import one_of, positive_int
from .train import History

METRICS = ("loss", "accuracy")
CHANCE_LOSS = math.log(10)  # cross-entropy of a uniform guess over the 10 digit classes


def final_loss(history: History, last: int = 10) -> float:
    """Mean training loss over the ``last`` steps of a run (``nan`` if it diverged or has no steps).

    Averaging a few minibatches smooths the noise of a single one.
    """
    positive_int("last", last)
    if history.diverged or not history.loss:
        return math.nan
    tail = history.loss[-last:]
    return sum(tail) / len(tail)


@dataclass(frozen=True)
class Row:
    """One line of a comparison: what a labelled run achieved."""

    label: str
    test_accuracy: float
    max_grad_norm: float
    diverged: bool
    diverged_step: int | None
    seconds: float


def comparison_rows(histories: dict[str, History]) -> list[Row]:
    """One :class:`Row` per labelled run, in the order given."""
    if not histories:
        raise ValueError("histories must hold at least one labelled run, e.g. {'baseline': history}")
    return [Row(label, h.test_accuracy, h.max_grad_norm, h.diverged, h.diverged_step, h.seconds)
            for label, h in histories.items()]


def best_run(histories: dict[str, History]) -> str:
    """Label of the run with the highest test accuracy among those that did not diverge."""
    finished = [r for r in comparison_rows(histories) if not r.diverged and math.isfinite(r.test_accuracy)]
    if not finished:
        raise ValueError("every run in histories diverged; there is no best run")
    return max(finished, key=lambda r: r.test_accuracy).label


def markdown_table(header, rows) -> str:
    """A Markdown table with one header row: ``header`` and each row are sequences of cells, shown with
    ``str``; a ``|`` inside a cell is escaped. Raises ValueError if a row's length differs from the header's."""
    header = list(header)
    rows = [list(row) for row in rows]
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"rows[{i}] has {len(row)} cells; the header has {len(header)}")

    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(row) for row in rows])


def comparison_table(histories: dict[str, History]) -> str:
    """A Markdown table: test accuracy, largest layer-gradient norm, divergence and wall time per run.

    A diverged run's accuracy is shown as a dash: its weights are not finite, so its
    predictions mean nothing.
    """
    lines = ["| configuration | test accuracy | largest layer-gradient norm | diverged | wall time (s) |",
             "|---|---:|---:|---|---:|"]
    for r in comparison_rows(histories):
        accuracy = "—" if r.diverged else f"{r.test_accuracy:.1%}"
        diverged = f"yes, at step {r.diverged_step}" if r.diverged else "no"
        label = r.label.replace("|", "\\|")
        lines.append(f"| {label} | {accuracy} | {r.max_grad_norm:.3g} | {diverged} | {r.seconds:.2f} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class PhaseGrid:
    """Runs of a sweep arranged as ``values[variant, depth, lr]``; ``diverged`` has the same shape.

    A cell with no run is ``nan`` in ``values`` and False in ``diverged``.
    """

    variants: list[str]
    depths: list[int]
    lrs: list[float]
    values: torch.Tensor
    diverged: torch.Tensor
    metric: str

    def cell(self, variant: str, depth: int, lr: float) -> tuple[float, bool]:
        """(value, diverged) of one cell."""
        index = (self.variants.index(variant), self.depths.index(depth), self.lrs.index(lr))
        return float(self.values[index]), bool(self.diverged[index])


def phase_grid(histories: list[History], metric: str = "loss") -> PhaseGrid:
    """Arrange sweep runs (each ``config`` has ``variant``, ``depth`` and ``lr``) into a :class:`PhaseGrid`.

    ``metric``: ``"loss"`` (:func:`final_loss`, training loss at the end) or ``"accuracy"``
    (test accuracy). Several seeds of one cell are averaged; the cell counts as diverged
    if any seed diverged. Diverged runs contribute ``nan``.
    """
    one_of("metric", metric, METRICS)
    if not histories:
        raise ValueError("histories must hold at least one run from a sweep")
    for h in histories:
        missing = [k for k in ("variant", "depth", "lr") if k not in h.config]
        if missing:
            raise ValueError(f"every history's config needs 'variant', 'depth' and 'lr'; one lacks {missing}")
    variants = list(dict.fromkeys(h.config["variant"] for h in histories))
    depths = sorted({h.config["depth"] for h in histories})
    lrs = sorted({h.config["lr"] for h in histories})
    total = torch.zeros(len(variants), len(depths), len(lrs), dtype=torch.float64)
    count = torch.zeros_like(total)
    diverged = torch.zeros(total.shape, dtype=torch.bool)
    for h in histories:
        i = (variants.index(h.config["variant"]), depths.index(h.config["depth"]), lrs.index(h.config["lr"]))
        value = final_loss(h) if metric == "loss" else (math.nan if h.diverged else h.test_accuracy)
        total[i] += value
        count[i] += 1
        diverged[i] |= h.diverged
    values = torch.where(count > 0, total / count.clamp_min(1), torch.nan)
    return PhaseGrid(variants, depths, lrs, values, diverged, metric)
