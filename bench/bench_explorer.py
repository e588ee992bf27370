"""Live explorer latency: seconds from a slider setting to the redrawn figure (gs.explore.LiveExplorer)."""
from __future__ import annotations

import importlib
import itertools

import common
import torch

import gradstab as gs

DEPTHS, LRS = (1, 4, 8, 16), (0.003, 0.03, 0.3)


def settings() -> list[dict]:
    """Depths x learning rates, with the remedies toggled in turn (plain, BN, residual, clipping)."""
    toggles = itertools.cycle([{}, {"batchnorm": True}, {"residual": True}, {"clip": True}])
    off = {"batchnorm": False, "residual": False, "clip": False}
    return [{"depth": d, "lr": lr, **off, **next(toggles)} for d in DEPTHS for lr in LRS]


def run() -> dict:
    title = "Live explorer update latency"
    try:
        explore = importlib.import_module("gradstab.explore")
        live_explorer, measure_latency = explore.live_explorer, explore.measure_latency
        importlib.import_module("ipywidgets")
    except (ImportError, AttributeError) as exc:
        line = f"skipped: gradstab.explore.live_explorer/measure_latency or ipywidgets not available ({exc})"
        return {"title": title, "text": line, "goals": [("explorer median latency", line)]}
    dev = common.device()
    explorer = live_explorer(gs.load_digits(dev))
    explorer.update(**settings()[0])  # warm-up
    chosen = settings()
    result = measure_latency(explorer, chosen)
    rows = [[s["depth"], s["lr"], "+".join(k for k in ("batchnorm", "residual", "clip") if s[k]) or "plain", t]
            for s, t in zip(chosen, result["times"], strict=True)]
    text = "\n".join([
        f"{len(chosen)} settings through `LiveExplorer.update` (retrain + redraw, no debounce), device {dev}, "
        f"{torch.get_num_threads()} threads.", "",
        common.table(["depth", "lr", "variant", "seconds"], rows), "",
        f"Median **{result['median']:.2f} s**, worst {result['worst']:.2f} s.",
    ])
    return {"title": title, "text": text,
            "goals": [("explorer median latency", common.verdict(result["median"], 1.0, True, " s"))]}


if __name__ == "__main__":
    common.report(run())
