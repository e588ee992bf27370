"""Monitor overhead: gs.train's step with every statistic on vs. the same step with no monitor at all.

The bare step is gs.train's hot path minus the monitor: zero_grad, forward, loss, backward,
a finiteness check of the loss, optimizer step. gs.train runs it with the GradientMonitor
(per-layer gradient norms over every parameter that requires grad, the non-finite check over them,
and optionally output-gradient hooks and update ratios).
"""
from __future__ import annotations

import statistics
import time

import common
import torch
from torch.nn import functional as F

import gradstab as gs

DEPTH, STEPS, LR = 16, 40, 0.02


def bare(data: gs.Split, steps: int, seed: int = 0) -> float:
    """Seconds of ``steps`` plain SGD steps of the same model on the same batches as gs.train."""
    model = gs.cnn(DEPTH, seed=seed).to(data.device).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses = []
    start = time.perf_counter()
    for idx in gs.batches(len(data.y_train), 64, steps, seed):
        idx = idx.to(data.device)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        losses.append(loss.detach())
        if not bool(torch.isfinite(loss)):
            break
        opt.step()
    return time.perf_counter() - start


def monitored(data: gs.Split, steps: int, **flags) -> float:
    return gs.train(gs.cnn(DEPTH), data, lr=LR, steps=steps, **flags).seconds


def run(steps: int = STEPS, repeats: int = 5) -> dict:
    dev = common.device()
    data = gs.load_digits(dev)
    cases = {"bare step (no monitor)": lambda: bare(data, steps),
             "gs.train (gradient norms)": lambda: monitored(data, steps),
             "gs.train, activations=True": lambda: monitored(data, steps, activations=True),
             "gs.train, updates=True": lambda: monitored(data, steps, updates=True),
             "gs.train, activations=True, updates=True": lambda: monitored(data, steps, activations=True,
                                                                           updates=True)}
    times = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(repeats):  # interleaved so load spikes hit every case
        for name, fn in cases.items():
            times[name].append(fn() / steps)
    base = min(times["bare step (no monitor)"])
    rows = [[name, 1e3 * min(t), 1e3 * statistics.median(t), min(t) / base] for name, t in times.items()]
    default = min(times["gs.train (gradient norms)"]) / base
    ratio = min(times["gs.train, activations=True, updates=True"]) / base
    text = "\n".join([
        f"Depth-{DEPTH} CNN (width 16), batch 64, {steps} steps per run, device {dev}, "
        f"{torch.get_num_threads()} threads; {repeats} interleaved runs, ratio of the best runs.", "",
        common.table(["step", "best ms/step", "median ms/step", "ratio to bare"], rows), "",
        f"The default monitor (gradient norms of every parameter) costs **{default:.3f}x** the bare step; "
        f"everything on **{ratio:.3f}x**.",
    ])
    return {"title": "Monitor overhead per training step", "text": text,
            "goals": [("monitor overhead (gradient norms, the default)", common.verdict(default, 1.05, True, "x")),
                      ("monitor overhead (everything on)", common.verdict(ratio, 1.05, True, "x"))]}


if __name__ == "__main__":
    common.report(run())
