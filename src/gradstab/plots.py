"""Figures the chapters share. Every function returns the matplotlib Figure it drew."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch
from matplotlib.colors import LogNorm

from .monitor import GradientMonitor
from .train import History


def loss_curves(histories: dict[str, History], title: str = "Training loss", ax=None):
    """Loss against step for each labelled run (log scale); a cross marks where a run diverged."""
    fig, ax = _axes(ax)
    for label, h in histories.items():
        loss = torch.tensor(h.loss)
        finite = torch.isfinite(loss)
        (line,) = ax.plot(torch.arange(len(loss))[finite], loss[finite], label=label)
        if h.diverged:
            last = int(finite.nonzero().max()) if finite.any() else 0
            ax.plot(last, float(loss[last]) if finite.any() else 1.0, "x", color=line.get_color(), ms=10, mew=2)
    ax.set(yscale="log", xlabel="training step", ylabel="cross-entropy loss (log scale)", title=title)
    ax.legend()
    return fig


ROWS = {"grad": ("grad_norms", "‖∂loss/∂θ‖ of the layer"), "act_grad": ("act_grad_norms", "‖∂loss/∂y‖ of the layer"),
        "update_ratio": ("update_ratios", "‖Δθ‖ / ‖θ‖ of the layer")}


def layer_rows(source, kind: str = "grad") -> torch.Tensor:
    """The (steps, layers) per-layer rows of ``kind`` ("grad", "act_grad", "update_ratio") that ``source`` holds:
    a :class:`~gradstab.train.History` (its ``grad_norms``, ``act_grad_norms``, ``update_ratios``) or a
    :class:`~gradstab.monitor.GradientMonitor` (its ``history(kind)``), as a float CPU tensor.

    Raises ValueError for another ``kind`` or a ``source`` that is neither."""
    if kind not in ROWS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, ROWS))}; got {kind!r}")
    if isinstance(source, GradientMonitor):
        return source.history(kind)
    rows = getattr(source, ROWS[kind][0], None)
    if not isinstance(rows, torch.Tensor):
        raise ValueError(f"expected a History or a GradientMonitor, got {type(source).__name__}")
    return rows.detach().float().cpu()


def gradient_heatmap(history, title: str = "Per-layer gradient norm", kind: str = "grad", ax=None):
    """Layers (input at the bottom) against steps, colour = the per-layer norm of ``kind`` on a log scale.

    ``history``: a History or a GradientMonitor (see :func:`layer_rows`); missing and non-finite entries
    are left blank. Raises ValueError for an unknown ``kind``."""
    values = layer_rows(history, kind).T.clone()
    fig, ax = _axes(ax)
    values[~torch.isfinite(values)] = float("nan")
    positive = values[values > 0]
    low, high = (float(positive.min()), float(positive.max())) if positive.numel() else (1e-8, 1.0)
    image = ax.imshow(values.clamp_min(low).numpy(), aspect="auto", origin="lower", cmap="magma",
                      norm=LogNorm(vmin=low, vmax=max(high, low * 10)), interpolation="nearest")
    fig.colorbar(image, ax=ax, label=f"{ROWS[kind][1]} (log scale)")
    ax.set(xlabel="training step", ylabel="layer (0 = input side)", title=title)
    return fig


def gradient_flow(histories: dict, step: int = 0, title: str | None = None, ax=None):
    """Per-layer gradient norm at one ``step`` for each labelled run, layer index on the x axis.

    Each value is a History or a GradientMonitor (see :func:`layer_rows`); a run with fewer rows shows its
    last one (a capped monitor keeps only its newest ``max_rows``). A missing layer (NaN) leaves a gap."""
    fig, ax = _axes(ax)
    for label, source in histories.items():
        rows = layer_rows(source)
        if len(rows):
            row = rows[min(step, len(rows) - 1)]
            ax.plot(range(len(row)), row.numpy(), "o-", ms=3, label=label)
    ax.set(yscale="log", xlabel="layer (0 = input side)", ylabel=f"{ROWS['grad'][1]} (log scale)",
           title=title or f"Gradient norm per layer at step {step}")
    ax.legend()
    return fig


def _axes(ax):
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
        return fig, ax
    return ax.figure, ax


def grid(n: int, width: float = 4.0, height: float = 3.2):
    """A row-major grid of ``n`` axes (at most 3 per row), spare axes hidden."""
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), layout="constrained", squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


# --- Chapter 4: the data, comparisons of remedies, depth x learning-rate phase diagrams -------------

def digits_grid(images: torch.Tensor, labels: torch.Tensor, per_class: int = 8,
                title: str = "Examples of each digit"):
    """The first ``per_class`` images of every class, one row per digit (0 at the top)."""
    if per_class < 1:
        raise ValueError(f"per_class must be an integer >= 1, got {per_class!r}")
    images, labels = images.detach().cpu().reshape(len(images), -1, *images.shape[-2:])[:, 0], labels.cpu()
    classes = labels.unique().tolist()
    fig, axes = plt.subplots(len(classes), per_class, figsize=(0.6 * per_class, 0.62 * len(classes)),
                             squeeze=False, gridspec_kw=dict(wspace=0.05, hspace=0.05))
    for row, c in zip(axes, classes, strict=True):
        picks = (labels == c).nonzero().flatten()[:per_class]
        for ax, i in zip(row, picks.tolist() + [None] * per_class, strict=False):
            if i is not None:
                ax.imshow(images[i].numpy(), cmap="gray_r", interpolation="nearest")
            ax.set(xticks=[], yticks=[])
        row[0].set_ylabel(str(c), rotation=0, ha="right", va="center")
    fig.supylabel("class (digit)")
    fig.supxlabel(f"first {per_class} examples, 8×8 pixels each")
    fig.suptitle(title)
    return fig


def class_counts(splits: dict[str, torch.Tensor], title: str = "Images per class", ax=None):
    """Grouped bars: how many labels of each class every named split holds."""
    fig, ax = _axes(ax)
    if not splits:
        raise ValueError("splits must name at least one label tensor, e.g. {'train': y_train}")
    classes = sorted(set().union(*(set(y.cpu().tolist()) for y in splits.values())))
    width = 0.8 / len(splits)
    for k, (name, y) in enumerate(splits.items()):
        counts = torch.bincount(y.cpu(), minlength=max(classes) + 1)[classes].tolist()
        ax.bar([c + (k - (len(splits) - 1) / 2) * width for c in classes], counts, width, label=name)
    ax.set(xticks=classes, xlabel="class (digit)", ylabel="number of images", title=title)
    ax.legend()
    return fig


def comparison_bars(histories: dict[str, History], title: str = "Remedies compared", axes=None):
    """Two panels per labelled run: test accuracy (bars; a cross and the step where a run diverged)
    and the largest per-layer gradient norm seen (dots, log scale)."""
    from .report import comparison_rows

    rows = comparison_rows(histories)
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.42 * len(rows) + 1.6), sharey=True, layout="constrained")
    ax_acc, ax_grad = axes
    fig = ax_acc.figure
    y = list(range(len(rows)))[::-1]
    for yi, r in zip(y, rows, strict=True):
        if r.diverged:
            ax_acc.plot(0.02, yi, "x", color="tab:red", ms=9, mew=2)
            ax_acc.text(0.06, yi, f"diverged at step {r.diverged_step}", va="center", color="tab:red", fontsize=9)
        else:
            ax_acc.barh(yi, r.test_accuracy, color="tab:blue")
            ax_acc.text(r.test_accuracy + 0.01, yi, f"{r.test_accuracy:.1%}", va="center", fontsize=9)
        ax_grad.plot(r.max_grad_norm, yi, "o", color="tab:red" if r.diverged else "tab:blue")
    ax_acc.set(yticks=y, yticklabels=[r.label for r in rows], xlim=(0, 1.15), xlabel="test accuracy (fraction)",
               title="Final test accuracy")
    ax_acc.axvline(0.1, color="gray", ls=":", lw=1)
    ax_grad.set(xscale="log", xlabel="largest layer-gradient norm (log scale)",
                title="Largest gradient norm during training")
    fig.suptitle(title)
    return fig


def phase_diagram(histories: list[History], metric: str = "loss", title: str | None = None):
    """One heatmap per variant: depth (rows) x learning rate (columns) of a sweep.

    Colour is the final training loss (``metric="loss"``, log scale, darker = higher) or the test
    accuracy (``"accuracy"``); a red cross marks a cell whose run diverged (non-finite loss or gradient).
    """
    from matplotlib.colors import LogNorm as _LogNorm
    from matplotlib.colors import Normalize

    from .report import CHANCE_LOSS, phase_grid

    grid_ = phase_grid(histories, metric)
    n = len(grid_.variants)
    cols = 2 if n == 4 else min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1.0, 3.2 * rows), sharex=True, sharey=True,
                             layout="constrained", squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    panels = list(axes.flat[:n])
    if metric == "loss":
        norm, cmap, label = _LogNorm(vmin=0.05, vmax=2 * CHANCE_LOSS), "viridis_r", "final training loss (log scale)"
    else:
        norm, cmap, label = Normalize(vmin=0.0, vmax=1.0), "viridis", "test accuracy (fraction)"
    for ax, variant, values, diverged in zip(panels, grid_.variants, grid_.values, grid_.diverged, strict=True):
        shown = values.clone() if metric == "accuracy" else values.clamp(0.05, 2 * CHANCE_LOSS)
        image = ax.imshow(shown.numpy(), origin="lower", cmap=cmap, norm=norm, aspect="auto")
        for (i, j), value in _cells(values):
            if diverged[i, j]:
                ax.plot(j, i, "x", color="tab:red", ms=14, mew=3)
            elif not math.isnan(value):
                bright = (norm(shown[i, j].item()) < 0.5) == (metric == "loss")
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if bright else "white")
        ax.set(xticks=range(len(grid_.lrs)), xticklabels=[f"{lr:g}" for lr in grid_.lrs],
               yticks=range(len(grid_.depths)), yticklabels=grid_.depths, title=variant)
    for ax in axes[-1]:
        ax.set_xlabel("learning rate (log spaced)")
    for ax in axes[:, 0]:
        ax.set_ylabel("depth (hidden blocks)")
    bar = fig.colorbar(image, ax=panels, label=label, shrink=0.9)
    if metric == "loss":
        bar.set_ticks([0.05, 0.1, 0.3, 1.0, CHANCE_LOSS], labels=["0.05", "0.1", "0.3", "1", "2.30 (chance)"])
    fig.suptitle(title or "Where training diverges (×) and where it learns")
    return fig


def _cells(values: torch.Tensor):
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            yield (i, j), float(values[i, j])
