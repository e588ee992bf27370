"""Figures the chapters share. Every function returns the matplotlib Figure it drew."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch
from matplotlib.colors import LogNorm

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


def gradient_heatmap(history: History, title: str = "Per-layer gradient norm", kind: str = "grad", ax=None):
    """Layers (input at the bottom) against steps, colour = gradient norm on a log scale."""
    fig, ax = _axes(ax)
    norms = history.grad_norms if kind == "grad" else history.act_grad_norms
    values = norms.T.clone()
    values[~torch.isfinite(values)] = float("nan")
    positive = values[values > 0]
    low, high = (float(positive.min()), float(positive.max())) if positive.numel() else (1e-8, 1.0)
    image = ax.imshow(values.clamp_min(low), aspect="auto", origin="lower", cmap="magma",
                      norm=LogNorm(vmin=low, vmax=max(high, low * 10)), interpolation="nearest")
    fig.colorbar(image, ax=ax, label="‖gradient‖ (log scale)")
    ax.set(xlabel="training step", ylabel="layer (0 = input side)", title=title)
    return fig


def gradient_flow(histories: dict[str, History], step: int = 0, title: str | None = None, ax=None):
    """Per-layer gradient norm at one ``step`` for each labelled run, layer index on the x axis."""
    fig, ax = _axes(ax)
    for label, h in histories.items():
        row = h.grad_norms[min(step, h.steps - 1)]
        ax.plot(range(len(row)), row, "o-", ms=3, label=label)
    ax.set(yscale="log", xlabel="layer (0 = input side)", ylabel="‖∂loss/∂θ‖ of the layer (log scale)",
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
