"""Held-out check of gradstab under FSDP2 on a model the book never uses: a small conv net with LayerNorm
over (channels, height, width), a bias-free convolution and a module that the forward never calls.

Two gloo processes (through :func:`gradstab.run_distributed`, with this file as the worker's file) shard
the net with ``fully_shard`` per block and at the root, each on its own batch. On every rank the monitor's
per-layer numbers (weight gradients, output gradients, update ratios) and the gradients after
``gs.clip_grad_norm_`` and ``gs.adaptive_clip_grad_`` must equal one process on the union of the batches,
to 1e-5 in float32; the oracle here is PyTorch's own norm (``torch.nn.utils.get_total_norm``).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradstab as gs

CH, SIDE, CLASSES, BATCH, WORLD = 3, 5, 3, 4, 2


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, CH, 3, padding=1), nn.LayerNorm([CH, SIDE, SIDE]), nn.GELU())
        self.body = nn.Sequential(nn.Conv2d(CH, CH, 3, padding=1, bias=False), nn.LayerNorm([CH, SIDE, SIDE]),
                                  nn.GELU())
        self.unused = nn.Linear(4, 4)  # never called: no gradient (a NaN column in the monitor)
        self.head = nn.Linear(CH * SIDE * SIDE, CLASSES)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).flatten(1))


def make_net() -> ConvNet:
    torch.manual_seed(7)
    net = ConvNet()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.0)
    return net


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(31 * step + rank)
    return torch.randn(BATCH, 2, SIDE, SIDE, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def union(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(batch(r, step) for r in range(WORLD)), strict=True)
    return torch.cat(xs), torch.cat(ys)


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run(net: nn.Module, get_batch, steps: int = 2) -> dict:
    """Two SGD steps, monitored; on the last, the gradients after norm clipping and after AGC too."""
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    out = {}
    with gs.GradientMonitor(net, activations=True, updates=True) as mon:
        for t in range(steps):
            opt.zero_grad(set_to_none=True)
            x, y = get_batch(t)
            F.cross_entropy(net(x), y).backward()
            mon.record()
            out["norm"] = float(gs.clip_grad_norm_(net.parameters(), 0.5))
            out["clipped"] = {n: full(p.grad).clone() for n, p in net.named_parameters() if p.grad is not None}
            gs.adaptive_clip_grad_([p for p in net.parameters() if p.grad is not None], clip_factor=0.02)
            out["agc"] = {n: full(p.grad).clone() for n, p in net.named_parameters() if p.grad is not None}
            mon.before_step()
            opt.step()
            mon.after_step()
    out.update(names=mon.names, **{kind: mon.history(kind) for kind in ("grad", "act_grad", "update_ratio")})
    return out


def sharded_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    net = make_net()
    fully_shard(net.stem)
    fully_shard(net.body)
    fully_shard(net)
    return run(net, lambda t: batch(rank, t))


def test_fsdp2_matches_one_process_on_a_conv_net_with_layernorm():
    want_net = make_net()
    want = run(want_net, union)
    x, y = union(0)  # the oracle for the first step's per-layer norms: PyTorch's own total norm per group
    oracle = make_net()
    F.cross_entropy(oracle(x), y).backward()
    per_group = {}
    for name, module in oracle.named_modules():
        grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
        if list(module.parameters(recurse=False)):
            per_group[name] = float(torch.nn.utils.get_total_norm(grads)) if grads else math.nan
    assert want["names"] == list(per_group)
    torch.testing.assert_close(want["grad"][0], torch.tensor(list(per_group.values())), equal_nan=True)

    results = gs.run_distributed(f"{__file__}:sharded_worker", WORLD, timeout=90)
    for got in results:
        assert got["names"] == want["names"]
        for kind in ("grad", "act_grad", "update_ratio"):
            torch.testing.assert_close(got[kind], want[kind], rtol=1e-5, atol=1e-6, equal_nan=True,
                                       msg=lambda m, k=kind: f"{k}: {m}")
        assert math.isclose(got["norm"], want["norm"], rel_tol=1e-5)
        for key in ("clipped", "agc"):
            assert got[key].keys() == want[key].keys()
            for name in want[key]:
                torch.testing.assert_close(got[key][name], want[key][name], rtol=1e-5, atol=1e-6)
    unused = want["names"].index("unused")
    assert torch.isnan(results[0]["grad"][:, unused]).all()


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
