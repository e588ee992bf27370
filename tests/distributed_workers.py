"""Per-rank code for tests/test_distributed.py (importable by name in the spawned processes).

Every worker runs on one rank of a 2-process gloo group started by :func:`gradstab.run_distributed`
and returns plain data (lists of floats, CPU tensors) to compare with one process in the parent.
The same model builders and data are used by the single-process references in the test file.
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import gradstab as gs

IN, HIDDEN, CLASSES, BATCH = 6, 10, 5, 8  # CLASSES=5 and HIDDEN=10 shard unevenly over 2 ranks


class Block(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.norm = nn.LayerNorm(n_out)

    def forward(self, x):
        return torch.tanh(self.norm(self.linear(x)))


class Net(nn.Module):
    """Two blocks (Linear + LayerNorm + tanh) and a linear head; big init so clipping bites."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(IN, HIDDEN), Block(HIDDEN, HIDDEN)])
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    model = Net()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # large weights: large gradients, so a max_norm of 1 clips
    return model


def batch(rank: int, step: int = 0, size: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch at ``step``: the union over ranks is ``union(step)``."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(size, IN, generator=g), torch.randint(0, CLASSES, (size,), generator=g)


def union(world: int, step: int = 0, size: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(batch(r, step, size) for r in range(world)), strict=True)
    return torch.cat(xs), torch.cat(ys)


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def ddp(model: nn.Module) -> nn.Module:
    return nn.parallel.DistributedDataParallel(model)


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as a full CPU tensor, by the unwrapped model's parameter name."""
    inner = gs.distributed.unwrap(model)
    return {n: gs.distributed.full_tensor(p.grad).detach().clone() for n, p in inner.named_parameters()}


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    inner = gs.distributed.unwrap(model)
    return {n: gs.distributed.full_tensor(p.detach()).clone() for n, p in inner.named_parameters()}


# -- launcher tests ---------------------------------------------------------------------------------------
def echo(rank: int, world_size: int, offset: float = 0.0) -> dict:
    t = torch.tensor([rank + offset])
    dist.all_reduce(t)
    return {"rank": rank, "world": world_size, "sum": float(t), "threads": torch.get_num_threads(),
            "pid": os.getpid(), "tensor": torch.arange(3) * rank}


def fail_on_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one fails on purpose")
    time.sleep(60)


def sleep_forever(rank: int, world_size: int, pidfile: str) -> None:
    with open(f"{pidfile}.{rank}", "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


# -- gradstab under DDP and FSDP2 -------------------------------------------------------------------------
def clip_step(rank: int, world_size: int, mode: str, max_norm: float = 1.0, lr: float = 0.1) -> dict:
    """One clipped SGD step on this rank's batch under DDP or FSDP2: norms, clipped gradients, new weights."""
    model = make_model()
    model = ddp(model) if mode == "ddp" else shard(model)
    x, y = batch(rank)
    F.cross_entropy(model(x), y).backward()
    out = {}
    if mode == "fsdp2":
        local = [p.grad.to_local() for p in model.parameters()]
        out["shard_norm"] = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in local])))
        saved = [p.grad.detach().clone() for p in model.parameters()]
        out["torch_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        torch_clipped = full_grads(model)
        for p, g in zip(model.parameters(), saved, strict=True):
            p.grad = g
    out["norm"] = float(gs.clip_grad_norm_(model.parameters(), max_norm))
    out["grads"] = full_grads(model)
    if mode == "fsdp2":
        out["torch_grads"] = torch_clipped
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(lr * p.grad)
    out["params"] = full_params(model)
    return out


def accumulate(rank: int, world_size: int, micro: int = 3, max_norm: float = 1.0, lr: float = 0.1,
               per_micro: bool = False) -> dict:
    """DDP with ``no_sync`` over ``micro`` micro-batches; clip once at the end, or (wrongly) after each."""
    model = ddp(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for k in range(micro):
        x, y = batch(rank, step=k)
        last = k == micro - 1
        ctx = model.no_sync() if not last else _null()
        with ctx:
            (F.cross_entropy(model(x), y) / micro).backward()
        if per_micro:
            gs.clip_grad_norm_(model.parameters(), max_norm)  # the bug: clips partial (and local) sums
    norm = float(gs.clip_grad_norm_(model.parameters(), max_norm))
    opt.step()
    return {"norm": norm, "params": full_params(model)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def agc_step(rank: int, world_size: int, mode: str, clip_factor: float = 0.01) -> dict:
    model = make_model()
    model = ddp(model) if mode == "ddp" else shard(model)
    x, y = batch(rank)
    F.cross_entropy(model(x), y).backward()
    before = full_grads(model)
    gs.adaptive_clip_grad_(list(model.parameters()), clip_factor=clip_factor)
    return {"before": before, "grads": full_grads(model)}


def monitored_sgd(model: nn.Module, batch_of_step, steps: int, lr: float) -> gs.GradientMonitor:
    """SGD with clipping at 1.0, every step recorded by a GradientMonitor; on a rank or on one process."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with gs.GradientMonitor(model, activations=True, updates=True) as mon:
        for t in range(steps):
            opt.zero_grad(set_to_none=True)
            x, y = batch_of_step(t)
            F.cross_entropy(model(x), y).backward()
            mon.record()
            gs.clip_grad_norm_(model.parameters(), 1.0)
            mon.before_step()
            opt.step()
            mon.after_step()
    return mon


def monitor_steps(rank: int, world_size: int, mode: str, steps: int = 2, lr: float = 0.1) -> dict:
    model = make_model()
    model = ddp(model) if mode == "ddp" else shard(model)
    mon = monitored_sgd(model, lambda t: batch(rank, step=t), steps, lr)
    logged = mon.log_dict()
    return {"names": mon.names, "grad": mon.history("grad"), "act_grad": mon.history("act_grad"),
            "update_ratio": mon.history("update_ratio"), "log": logged}


def train_run(rank: int, world_size: int, mode: str, steps: int = 3, **options) -> dict:
    """gs.train on this rank's own batches (a list of batches) under DDP or FSDP2."""
    model = make_model()
    model = ddp(model) if mode == "ddp" else shard(model)
    data = [batch(rank, step=t) for t in range(steps * options.get("accumulate", 1))]
    h = gs.train(model, data, lr=0.1, steps=steps, batch_size=BATCH, momentum=0.0, seed=0,
                 activations=True, updates=True, **options)
    return {"loss": h.loss, "grad_norm": h.grad_norm, "grad_norms": h.grad_norms, "names": h.layer_names,
            "act_grad_norms": h.act_grad_norms, "update_ratios": h.update_ratios, "params": full_params(model),
            "diverged": h.diverged}


def partial_monitor(rank: int, world_size: int) -> dict:
    """FSDP2 on the blocks only: the head's parameters stay plain tensors beside the blocks' DTensors."""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for block in model.blocks:
        fully_shard(block)
    x, y = batch(rank)
    with gs.GradientMonitor(model, activations=True, updates=True) as mon:
        F.cross_entropy(model(x), y).backward()
        mon.record()
        norm = float(gs.clip_grad_norm_(model.parameters(), 1.0))
        gs.adaptive_clip_grad_(list(model.parameters()))
        mon.before_step()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.1 * p.grad)
        mon.after_step()
    return {"grad": mon.history("grad"), "update_ratio": mon.history("update_ratio"), "norm": norm}


def diagnose_flags(rank: int, world_size: int, mode: str) -> dict:
    model = make_model()
    model = ddp(model) if mode == "ddp" else shard(model)
    d = gs.diagnose(model, batch(rank))
    return {"parallel": d.parallel, "text": str(d), "grad_norm": [h.grad_norm for h in d.layers],
            "update_ratio": d.update_ratio}


def everything(rank: int, world_size: int, mode: str) -> dict:
    """All the DDP (or FSDP2) checks of the test file in one launch (each launch costs seconds)."""
    out = {"clip": clip_step(rank, world_size, mode), "agc": agc_step(rank, world_size, mode),
           "monitor": monitor_steps(rank, world_size, mode), "train": train_run(rank, world_size, mode),
           "train_clip": train_run(rank, world_size, mode, max_norm=1.0)}
    out["train_accumulate"] = train_run(rank, world_size, mode, max_norm=1.0, accumulate=2)
    if mode == "fsdp2":
        out["partial"] = partial_monitor(rank, world_size)
    if mode == "ddp":
        out["accumulate"] = accumulate(rank, world_size)
        out["accumulate_per_micro"] = accumulate(rank, world_size, per_micro=True)
    try:
        out["diagnose"] = diagnose_flags(rank, world_size, mode)
    except Exception as exc:  # reported, so the other checks still run
        out["diagnose"] = {"error": repr(exc)}
    return out


def train_fsdp_float16(rank: int, world: int) -> None:
    """gs.train with float16 loss scaling on an FSDP2 model: refused with a ValueError before training."""
    x = torch.randn(BATCH, IN, generator=torch.Generator().manual_seed(rank))
    y = torch.randint(0, CLASSES, (BATCH,), generator=torch.Generator().manual_seed(rank))
    gs.train(shard(Net()), [(x, y)], lr=0.1, steps=1, amp="float16", evaluate=False)

