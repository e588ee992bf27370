"""Figures the chapters share, and the book's one figure style. Every plotting function returns the
matplotlib Figure it drew.

:func:`use_book_style` (called by every notebook's setup cell) makes figures SVG with text kept as text,
sized so that type stays at least 9 px at the book's column width. :func:`color` gives every
configuration one colour across the whole book, and :func:`clip_axis` draws exploding curves on a clipped
axis with a marker where a value leaves the chart.
"""
from __future__ import annotations

import math
import re

import matplotlib as mpl
import matplotlib.pyplot as plt
import torch
from matplotlib.colors import LogNorm

from .monitor import GradientMonitor
from .train import History

#: The book's rcParams, with a light grid and SVG text kept as text. Type is sized so that the smallest
#: glyphs (the exponents of log-axis labels, 0.7 of the tick size) stay at 9 px or more in the book's
#: 784 px column for figures up to 10 inches wide.
BOOK_STYLE = {
    "figure.figsize": (6.4, 3.8), "figure.dpi": 100, "savefig.dpi": 200, "figure.autolayout": False,
    "font.size": 12, "axes.titlesize": 13, "axes.labelsize": 12, "xtick.labelsize": 12, "ytick.labelsize": 12,
    "legend.fontsize": 11, "legend.framealpha": 0.85, "figure.titlesize": 14,
    "axes.grid": True, "grid.alpha": 0.25, "axes.spines.top": False, "axes.spines.right": False,
    "lines.linewidth": 1.8, "svg.fonttype": "none", "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Noto Sans CJK SC", "Arial", "sans-serif"],
}

#: One colour per configuration, the same in every figure of the book. :func:`color` matches a label
#: against these keywords in order, so "batchnorm + clip" gets BatchNorm's colour.
PALETTE = (
    ("plain", "#d62728"), ("no clip", "#d62728"), ("without", "#d62728"), ("no remedy", "#d62728"),
    ("baseline", "#d62728"), ("unclipped", "#d62728"),
    ("skipinit", "#bcbd22"), ("batchnorm", "#2ca02c"), ("batch norm", "#2ca02c"), ("bn", "#2ca02c"),
    ("layernorm", "#17becf"), ("layer norm", "#17becf"), ("residual", "#9467bd"),
    ("agc", "#8c564b"), ("value", "#e377c2"), ("clip", "#1f77b4"), ("warmup", "#ff7f0e"),
    ("adam", "#7f7f7f"), ("dropout", "#aec7e8"), ("l2", "#ffbb78"), ("weight decay", "#ffbb78"),
)
#: Colours for labels that name no configuration (a model family, a data set), none of them in ``PALETTE``.
OTHER_COLORS = ("#393b79", "#1b6b5f", "#8c6d31", "#843c39", "#7b4173", "#5a6b7b")


def use_book_style() -> None:
    """Apply ``BOOK_STYLE`` to matplotlib and, inside a Jupyter kernel, show figures as SVG.

    Idempotent; changes only matplotlib's settings (call it from a notebook's setup cell)."""
    mpl.rcParams.update(BOOK_STYLE)
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:  # plain Python: nothing to configure for inline display
        return
    if get_ipython() is not None:
        set_matplotlib_formats("svg")


def color(label: str) -> str:
    """The book's colour for the configuration a ``label`` names (matched case-insensitively against
    ``PALETTE``'s keywords in order); a label matching none gets a fixed colour derived from its text."""
    text = label.lower()
    words = re.sub(r"[^\w]+", " ", text).split()
    for keyword, value in PALETTE:
        if keyword in words or (len(keyword) > 3 and keyword in text):
            return value
    return OTHER_COLORS[sum(map(ord, label)) % len(OTHER_COLORS)]


def clip_axis(ax, top: float, bottom: float | None = None, label: str = "off the chart") -> int:
    """Limit ``ax``'s y axis to ``[bottom, top]`` and mark every plotted point above ``top`` with a
    triangle on the top edge in its line's colour (values below ``bottom`` get one on the bottom edge).

    Returns the number of points marked. A legend entry ``label`` explains the triangles when any are drawn.
    Call it after plotting every line. Raises ValueError if ``bottom >= top``."""
    if bottom is not None and bottom >= top:
        raise ValueError(f"bottom must be below top; got bottom={bottom!r}, top={top!r}")
    marked = 0
    for line in list(ax.get_lines()):
        if not line.get_transform().contains_branch(ax.transData):
            continue  # axvline/axhline: drawn partly in axes coordinates, never off the chart
        x, y = (torch.as_tensor(v, dtype=torch.float64) for v in line.get_data())
        high = y > top
        low = y < bottom if bottom is not None else torch.zeros_like(high)
        for mask, edge, marker in ((high, top, "^"), (low, bottom, "v")):
            if bool(mask.any()):
                ax.plot(x[mask].numpy(), [edge] * int(mask.sum()), marker, color=line.get_color(), ms=7,
                        clip_on=False, zorder=5, linestyle="none")
                marked += int(mask.sum())
    if bottom is None:  # keep the current bottom, unless every point lay above the top
        bottom = ax.get_ylim()[0]
        if bottom >= top:
            bottom = top / 10 if ax.get_yscale() == "log" else top - 1
    ax.set_ylim(bottom, top)
    if marked:
        ax.plot([], [], "^", color="gray", linestyle="none", label=label)
        ax.legend()
    return marked


def label_colors(labels) -> dict[str, str]:
    """The book's :func:`color` for each label; labels that share a configuration's colour (say three
    residual variants) get shades of it, from dark to light, so they stay apart and keep their hue."""
    labels = list(labels)
    base = {label: color(label) for label in labels}
    groups: dict[str, list[str]] = {}
    for label in labels:
        groups.setdefault(base[label], []).append(label)
    shaded = {}
    for value, members in groups.items():
        for k, label in enumerate(members):
            shaded[label] = value if len(members) == 1 else _shade(value, -0.35 + 0.7 * k / (len(members) - 1))
    return shaded


def _shade(value: str, amount: float) -> str:
    """``value`` mixed with black (``amount`` < 0) or white (``amount`` > 0) by ``|amount|``."""
    rgb = mpl.colors.to_rgb(value)
    target = 1.0 if amount > 0 else 0.0
    return mpl.colors.to_hex([c + (target - c) * abs(amount) for c in rgb])


def loss_curves(histories: dict[str, History], title: str = "Training loss", ax=None, top: float | None = None):
    """Loss against step for each labelled run (log scale); a cross marks where a run diverged.

    Runs get the book's colours (:func:`label_colors`). ``top`` clips the y axis there and marks the
    points above it (:func:`clip_axis`)."""
    fig, ax = _axes(ax)
    colors = label_colors(histories)
    for label, h in histories.items():
        loss = torch.tensor(h.loss)
        finite = torch.isfinite(loss)
        (line,) = ax.plot(torch.arange(len(loss))[finite], loss[finite], label=label, color=colors[label])
        if h.diverged:
            last = int(finite.nonzero().max()) if finite.any() else 0
            ax.plot(last, float(loss[last]) if finite.any() else 1.0, "x", color=line.get_color(), ms=10, mew=2)
    ax.set(yscale="log", xlabel="training step", ylabel="cross-entropy loss (log scale)", title=title)
    ax.legend()
    if top is not None:
        clip_axis(ax, top)
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


def gradient_heatmap(history, title: str = "Per-layer gradient norm", kind: str = "grad", ax=None,
                     vmin: float | None = None, vmax: float | None = None):
    """Layers (input at the bottom) against steps, colour = the per-layer norm of ``kind`` on a log scale.

    ``history``: a History or a GradientMonitor (see :func:`layer_rows`); missing and non-finite entries
    are left blank. ``vmin``/``vmax`` fix the colour scale, so that figures meant to be compared share one
    (default: this run's own positive range). Raises ValueError for an unknown ``kind``, or for limits
    that are not positive and finite or not in order."""
    for name, limit in (("vmin", vmin), ("vmax", vmax)):
        if limit is not None and not (math.isfinite(limit) and limit > 0):
            raise ValueError(f"{name} must be a finite number > 0 (the colour scale is logarithmic); got {limit!r}")
    if vmin is not None and vmax is not None and vmin >= vmax:
        raise ValueError(f"vmin must be below vmax; got vmin={vmin!r}, vmax={vmax!r}")
    values = layer_rows(history, kind).T.clone()
    values[~torch.isfinite(values)] = float("nan")
    positive = values[values > 0]
    low, high = (float(positive.min()), float(positive.max())) if positive.numel() else (1e-8, 1.0)
    low = vmin if vmin is not None else min(low, vmax / 10) if vmax is not None else low
    high = vmax if vmax is not None else max(high, low * 10)
    fig, ax = _axes(ax)
    image = ax.imshow(values.clamp_min(low).numpy(), aspect="auto", origin="lower", cmap="magma",
                      norm=LogNorm(vmin=low, vmax=high), interpolation="nearest")
    fig.colorbar(image, ax=ax, label=f"{ROWS[kind][1]} (log scale)")
    ax.set(xlabel="training step", ylabel="layer (0 = input side)", title=title)
    return fig


def gradient_flow(histories: dict, step: int = 0, title: str | None = None, ax=None):
    """Per-layer gradient norm at one ``step`` for each labelled run, layer index on the x axis.

    Each value is a History or a GradientMonitor (see :func:`layer_rows`); a run with fewer rows shows its
    last one (a capped monitor keeps only its newest ``max_rows``). A missing layer (NaN) leaves a gap."""
    fig, ax = _axes(ax)
    colors = label_colors(histories)
    for label, source in histories.items():
        rows = layer_rows(source)
        if len(rows):
            row = rows[min(step, len(rows) - 1)]
            ax.plot(range(len(row)), row.numpy(), "o-", ms=3, label=label, color=colors[label])
    ax.set(yscale="log", xlabel="layer (0 = input side)", ylabel=f"{ROWS['grad'][1]} (log scale)",
           title=title or f"Gradient norm per layer at step {step}")
    ax.legend()
    return fig


def _axes(ax):
    if ax is None:
        fig, ax = plt.subplots(layout="constrained")
        return fig, ax
    return ax.figure, ax


def grid(n: int, width: float = 3.4, height: float = 2.9):
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
            ax_acc.text(0.06, yi, f"diverged at step {r.diverged_step}", va="center", color="tab:red", fontsize="small")
        else:
            ax_acc.barh(yi, r.test_accuracy, color="tab:blue")
            ax_acc.text(r.test_accuracy + 0.01, yi, f"{r.test_accuracy:.1%}", va="center", fontsize="small")
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
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small",
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
