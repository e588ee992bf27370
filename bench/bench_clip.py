"""Clipping cost: gs.clip_grad_norm_ / gs.clip_grad_value_ against torch.nn.utils' own, on 300 gradients.

The gradients are those of a plausible network: 100 blocks of a conv or linear weight, its bias and a
norm gain, widths 16 to 256 (about 3.3 M numbers). Each timed run is a loop of calls; the two
implementations alternate run by run so that load spikes hit both, and the ratio compares their best runs.
``max_norm`` is large, so nothing is actually shrunk, but both still multiply every gradient (neither
branches on the norm, to avoid a host sync).
"""
from __future__ import annotations

import statistics
import time

import common
import torch

import gradstab as gs

BLOCKS, CALLS = 100, 50
WIDTHS = (16, 32, 64, 128, 256)


def gradients(dev: torch.device) -> list[torch.nn.Parameter]:
    """300 parameters with gradients: per block a weight (conv 3x3 or linear, alternating), a bias, a gain."""
    g = torch.Generator().manual_seed(0)
    shapes = []
    for i in range(BLOCKS):
        c_in, c_out = WIDTHS[i % len(WIDTHS)], WIDTHS[(i + 1) % len(WIDTHS)]
        shapes += [(c_out, c_in, 3, 3) if i % 2 == 0 else (c_out, c_in), (c_out,), (c_out,)]
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g).to(dev))
        p.grad = torch.randn(shape, generator=g).to(dev)
        params.append(p)
    return params


def per_call(fn, params, dev: torch.device) -> float:
    """Seconds per call of ``fn(params)``, over ``CALLS`` calls."""
    common.sync(dev)
    start = time.perf_counter()
    for _ in range(CALLS):
        fn(params)
    common.sync(dev)
    return (time.perf_counter() - start) / CALLS


def run(repeats: int = 15) -> dict:
    dev = common.device()
    params = gradients(dev)
    n = sum(p.numel() for p in params)
    cases = {
        "norm": {"torch": lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1e9),
                 "gradstab": lambda ps: gs.clip_grad_norm_(ps, 1e9)},
        "value": {"torch": lambda ps: torch.nn.utils.clip_grad_value_(ps, 1e9),
                  "gradstab": lambda ps: gs.clip_grad_value_(ps, 1e9)},
    }
    times = {(kind, who): [] for kind, fns in cases.items() for who in fns}
    for fns in cases.values():
        for fn in fns.values():
            fn(params)  # warm-up
    for _ in range(repeats):  # interleaved
        for kind, fns in cases.items():
            for who, fn in fns.items():
                times[kind, who].append(per_call(fn, params, dev))
    ratio = {kind: min(times[kind, "gradstab"]) / min(times[kind, "torch"]) for kind in cases}
    rows = [[f"clip_grad_{kind}_", who, 1e3 * min(t), 1e3 * statistics.median(t),
             ratio[kind] if who == "gradstab" else 1.0]
            for (kind, who), t in times.items()]
    text = "\n".join([
        f"{len(params)} gradients ({n / 1e6:.1f} M numbers, float32), device {dev}, "
        f"{torch.get_num_threads()} threads; {repeats} interleaved runs of {CALLS} calls, ratio of the best runs.",
        "",
        common.table(["function", "implementation", "best ms/call", "median ms/call", "ratio to torch"], rows),
        "",
        f"gs.clip_grad_norm_ costs **{ratio['norm']:.3f}x** torch's.",
    ])
    return {"title": "Gradient clipping against torch.nn.utils", "text": text,
            "goals": [("clip_grad_norm_ vs torch's", common.verdict(ratio["norm"], 1.1, True, "x"))]}


if __name__ == "__main__":
    common.report(run())
