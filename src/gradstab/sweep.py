"""Train many learning rates and seeds of one network at once, each member exactly as `gs.train` would.

M members are stacked into one wide network: member m owns channels ``m*W .. m*W+W-1`` of every
hidden layer. Convolutions are grouped (``groups=M``), so no member sees another's channels;
BatchNorm over M*W channels is per-member BatchNorm; the M heads are one batched matmul. Every
parameter of member m lives in row m of one (M, P) matrix ``theta``, so per-member SGD with
momentum, global-norm clipping and per-layer gradient norms are whole-matrix operations. A member
whose loss or gradient turns non-finite is retired (its row removed) and the others go on untouched.
"""
from __future__ import annotations

import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from torch import nn
from torch.nn import functional as F

from ._check import one_of, positive_float, positive_int
from .data import Split, batches
from .device import base_seed
from .models import CNN, cnn, mlp
from .monitor import weight_layers
from .train import History, _check_args, _diagnose, train

ARCHS = {"cnn": cnn, "mlp": mlp}
TRAIN_OPTIONS = ("optimizer", "weight_decay", "clip_value", "agc", "warmup", "loss_limit", "activations", "updates",
                 "evaluate")
ACTIVATIONS = {"relu": F.relu_, "tanh": torch.tanh_, "linear": lambda z: z}  # in place: z is always fresh


def sweep(data: Split, lrs, *, depth: int, seeds=None, steps: int = 100, batch_size: int = 64,
          momentum: float = 0.9, max_norm: float | None = None, arch: str = "cnn", **knobs) -> list[History]:
    """Train ``arch(depth, seed=s, **knobs)`` with SGD at every ``lr`` in ``lrs`` for every ``s`` in ``seeds``.

    Returns one :class:`~gradstab.train.History` per member, lrs-major then seeds (``None``: the one seed
    :func:`~gradstab.device.base_seed`), each equal (up to float
    rounding) to ``train(arch(depth, seed=s, **knobs), data, lr=lr, seed=s, ...)``. ``knobs`` are
    model knobs (width, norm, residual, ...) and may include train options (weight_decay, warmup,
    clip_value, loss_limit, agc, optimizer, activations, updates, evaluate). Members are trained as one
    batched network when that covers the setting (norm "none"/"batch", no skipinit, no dropout,
    SGD, no agc, no activation or update statistics), else one by one with :func:`~gradstab.train.train`.
    Each History's ``seconds`` is the batched run's time divided by the number of members.
    """
    one_of("arch", arch, tuple(ARCHS))
    positive_int("depth", depth)
    lrs, seeds = list(lrs), [base_seed()] if seeds is None else list(seeds)
    if not lrs:
        raise ValueError("lrs must hold at least one learning rate, got an empty sequence")
    if not seeds:
        raise ValueError("seeds must hold at least one seed, got an empty sequence")
    for lr in lrs:
        positive_float("lr", lr)
    for seed in seeds:
        positive_int("seeds", seed, minimum=0)
    options = dict(steps=steps, batch_size=batch_size, momentum=momentum, max_norm=max_norm,
                   **{k: knobs.pop(k) for k in TRAIN_OPTIONS if k in knobs})
    members = [(lr, seed) for lr in lrs for seed in seeds]
    models = [ARCHS[arch](depth, seed=seed, **knobs) for _, seed in members]
    if not _batchable(models[0], options):
        return [train(m, data, lr=lr, seed=seed, **options) for m, (lr, seed) in zip(models, members, strict=True)]
    defaults = dict(optimizer="sgd", weight_decay=0.0, clip_value=None, agc=None, warmup=0, loss_limit=math.inf)
    evaluate = options.pop("evaluate", True)
    options = {**defaults, **{k: v for k, v in options.items() if k not in ("activations", "updates")}}
    _check_args(models[0], min(lrs), *(options[k] for k in (
        "steps", "batch_size", "momentum", "weight_decay", "max_norm", "clip_value", "agc", "warmup", "loss_limit")))
    with torch.no_grad():
        models[0].eval()(data.x_train[:2].cpu())  # the model's own check of the input shape
    return _fit(Stack(models, data.device), data, [lr for lr, _ in members], [s for _, s in members],
                evaluate=evaluate, **options)


def sweep_grid(data: Split, depths, lrs, variants: dict[str, dict], *, steps: int = 100, seeds=None,
               batch_size: int = 64, momentum: float = 0.9, arch: str = "cnn", workers: int = 1,
               **knobs) -> list[History]:
    """:func:`sweep` for every depth and every named variant (a dict of model knobs and train options).

    A variant may also be a function of the depth returning that dict (e.g. a branch scale of
    ``depth ** -0.5``); ``knobs`` are shared by all variants (a variant's own win). Returns the
    Histories depth-major, then variant, then lr, then seed; each ``config`` carries ``depth``,
    ``lr``, ``seed`` and the variant's name under ``"variant"``.

    ``workers > 1`` spreads the (depth, variant) sweeps over that many CPU processes. Each runs
    on the same number of threads as this one, so the numbers are identical to ``workers=1``;
    on a GPU the sweeps always run here, one after another.
    """
    if not variants:
        raise ValueError("variants must name at least one variant, e.g. {'plain': {}}")
    positive_int("workers", workers)
    common = dict(lrs=list(lrs), seeds=seeds, steps=steps, batch_size=batch_size, momentum=momentum, arch=arch)
    jobs = [(name, dict(depth=depth, **common, **{**knobs, **(variant(depth) if callable(variant) else variant)}))
            for depth in depths for name, variant in variants.items()]
    if workers == 1 or data.device.type != "cpu":
        results = [sweep(data, **job) for _, job in jobs]
    else:
        context = multiprocessing.get_context("spawn")
        threads = [torch.get_num_threads()] * len(jobs)
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = list(pool.map(_sweep_job, [data] * len(jobs), [job for _, job in jobs], threads))
    runs = []
    for (name, _), histories in zip(jobs, results, strict=True):
        for history in histories:
            history.config["variant"] = name
            runs.append(history)
    return runs


def _sweep_job(data: Split, job: dict, threads: int) -> list[History]:
    """One (depth, variant) sweep in a worker process (a top-level function, so it pickles).

    The thread count is set here, after the worker has imported gradstab (whose import applies
    ``$GRADSTAB_THREADS``), so the worker rounds exactly as the parent does.
    """
    torch.set_num_threads(threads)
    return sweep(data, job.pop("lrs"), **job)


def _batchable(model: nn.Module, options: dict) -> bool:
    c = model.config
    return (c["norm"] in ("none", "batch") and not c["skipinit"] and c["dropout"] == 0
            and options.get("optimizer", "sgd") == "sgd" and options.get("agc") is None
            and not options.get("activations") and not options.get("updates"))


class Stack:
    """M same-shaped models as one grouped network with parameters ``theta`` of shape (M, P)."""

    def __init__(self, models: list[nn.Module], device):
        ref = models[0]
        self.config, self.conv = ref.config, isinstance(ref, CNN)
        named = list(ref.named_parameters())
        self.shapes = {name: p.shape for name, p in named}
        self.sizes = [p.numel() for _, p in named]
        self.theta = torch.stack([torch.cat([p.detach().flatten() for p in m.parameters()]) for m in models])
        self.theta = self.theta.to(device)
        stats = [n for n, _ in ref.named_buffers() if n.endswith(("running_mean", "running_var"))]
        self.stats = {n: torch.stack([m.get_buffer(n) for m in models]).to(device) for n in stats}
        bn = next((m for m in ref.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)), None)
        self.bn = (bn.momentum, bn.eps) if bn is not None else None
        self.names = [name for name, _ in weight_layers(ref)]
        self.spans = self._layer_spans(named)

    def _layer_spans(self, named) -> list[list[tuple[int, int]]]:
        """For each weight layer, the column ranges of ``theta`` holding its parameters."""
        starts = torch.tensor([0, *self.sizes]).cumsum(0).tolist()
        owner = [name.rsplit(".", 1)[0] for name, _ in named]
        return [[(starts[i], starts[i + 1]) for i, o in enumerate(owner) if o == layer] for layer in self.names]

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the members (rows) listed in ``keep``."""
        self.theta = self.theta[keep]
        self.stats = {n: s[keep] for n, s in self.stats.items()}

    def layer_norms(self, g: torch.Tensor) -> torch.Tensor:
        """(M, layers) 2-norms of each member's per-layer gradient, as GradientMonitor computes them."""
        sq = g.square()
        return torch.stack([sum(sq[:, a:b].sum(1) for a, b in spans) for spans in self.spans], 1).sqrt()

    def params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        cols = theta.split(self.sizes, dim=1)
        return {name: c.reshape(len(theta), *shape) for (name, shape), c in zip(self.shapes.items(), cols, strict=True)}

    def forward(self, theta: torch.Tensor, x: torch.Tensor, training: bool) -> torch.Tensor:
        """Logits (N, M, classes); ``x`` is shared (N, C, ...) or per-member (N, M*C, ...)."""
        p, c, act = self.params(theta), self.config, ACTIVATIONS[self.config["activation"]]
        h = act(self._map(x, p["stem.0.weight"], p["stem.0.bias"]))
        for i in range(c["depth"]):
            z = self._map(h, p[f"blocks.{i}.layer.weight"], p.get(f"blocks.{i}.layer.bias"))
            if self.bn is not None:
                z = F.batch_norm(z, self.stats[f"blocks.{i}.norm.running_mean"].view(-1),
                                 self.stats[f"blocks.{i}.norm.running_var"].view(-1),
                                 p[f"blocks.{i}.norm.weight"].reshape(-1), p[f"blocks.{i}.norm.bias"].reshape(-1),
                                 training, *self.bn)
            z = act(z)
            h = h + c["branch_scale"] * z if c["residual"] else z
        if self.conv:
            h = h.mean((2, 3))
        return torch.einsum("nmw,mkw->nmk", h.view(len(h), len(theta), -1), p["head.weight"]) + p["head.bias"]

    def _map(self, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """Each member's conv (or linear) map; ``w`` is (M, out, in, ...), ``h`` holds 1 or M groups of ``in``."""
        m, n_out, n_in = w.shape[:3]
        groups = h.shape[1] // n_in
        b = None if b is None else b.reshape(-1)
        if self.conv:
            return F.conv2d(h, w.reshape(m * n_out, *w.shape[2:]), b, padding=1, groups=groups)
        if groups == 1:
            return F.linear(h, w.reshape(m * n_out, n_in), b)
        z = torch.einsum("nmi,moi->nmo", h.view(len(h), m, n_in), w).reshape(len(h), -1)
        return z if b is None else z + b

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Per-member fraction of ``x`` classified as ``y`` (eval mode: BatchNorm uses running statistics)."""
        right = sum((self.forward(self.theta, xc, False).argmax(2) == yc[:, None]).sum(0)
                    for xc, yc in zip(x.split(chunk), y.split(chunk), strict=True))
        return right.float() / len(y)


class _Names:
    """The two attributes of a GradientMonitor that :func:`train._diagnose` reads."""

    def __init__(self, names):
        self.names = names

    def first_nonfinite(self, norms):
        bad = (~torch.isfinite(norms)).nonzero()
        return self.names[int(bad[0])] if len(bad) else None


def _inputs(data: Split, order: torch.Tensor, seed_of: torch.Tensor):
    """The minibatch of every member: shared (N, C, ...) if all use one seed, else (N, M*C, ...)."""
    if len(order) == 1:
        idx = order[0]
        return data.x_train[idx], data.y_train[idx][:, None]
    idx = order[seed_of]  # (M, N)
    x = data.x_train[idx]  # (M, N, C, ...)
    return x.transpose(0, 1).flatten(1, 2), data.y_train[idx].T


def _fit(stack: Stack, data: Split, lrs, seeds, *, steps, batch_size, momentum, max_norm, optimizer,
         weight_decay, clip_value, agc, warmup, loss_limit, evaluate) -> list[History]:
    torch.set_flush_denormal(True)
    dev, n_members, n_layers = data.device, len(lrs), len(stack.names)
    unique = sorted(set(seeds))
    n = len(data.y_train)
    schedule = torch.stack([torch.stack(list(batches(n, min(batch_size, n), steps, s))) for s in unique]).to(dev)
    seed_of = torch.tensor([unique.index(s) for s in seeds], device=dev)
    lr = torch.tensor(lrs, dtype=stack.theta.dtype, device=dev)
    alive = torch.arange(n_members, device=dev)
    buf, previous = torch.zeros_like(stack.theta), None
    final_theta, final_stats = stack.theta.clone(), {k: v.clone() for k, v in stack.stats.items()}
    loss_rows, norm_rows = [], []
    taken, outcome = [steps] * n_members, [{} for _ in range(n_members)]
    labels = _Names(stack.names)
    start = time.perf_counter()
    for step in range(steps):
        x, y = _inputs(data, schedule[:, step], seed_of[alive] if len(unique) > 1 else None)
        theta = stack.theta.requires_grad_()
        logits = stack.forward(theta, x, training=True)
        losses = F.cross_entropy(logits.transpose(1, 2), y.expand(-1, len(alive)), reduction="none").mean(0)
        (g,) = torch.autograd.grad(losses.sum(), theta)
        stack.theta = theta.detach()
        losses, norms = losses.detach(), stack.layer_norms(g)
        loss_rows.append(losses.new_full((n_members,), math.nan).index_put_((alive,), losses))
        norm_rows.append(norms.new_full((n_members, n_layers), math.nan).index_put_((alive,), norms))
        ok = torch.isfinite(norms).all(1) & torch.isfinite(losses) & (losses <= loss_limit)
        if not bool(ok.all()):  # the one host sync per step
            for j in (~ok).nonzero().flatten().tolist():
                m = int(alive[j])
                taken[m], final_theta[m] = step + 1, stack.theta[j]
                for k, v in stack.stats.items():
                    final_stats[k][m] = v[j]
                prev = None if previous is None else previous[j]
                outcome[m] = _diagnose(step, float(losses[j]), norms[j], prev, labels, loss_limit)
            keep = ok.nonzero().flatten()
            stack.select(keep)
            alive, g, buf, norms = alive[keep], g[keep], buf[keep], norms[keep]
            if not len(alive):
                break
        previous = norms
        g = _clipped(g, max_norm, clip_value)
        if weight_decay:
            g = g + weight_decay * stack.theta
        buf = buf.mul_(momentum).add_(g) if momentum else g
        rate = lr[alive] * (min(1.0, (step + 1) / warmup) if warmup else 1.0)
        stack.theta = stack.theta - rate[:, None] * buf
    seconds = (time.perf_counter() - start) / n_members
    final_theta[alive] = stack.theta
    for k, v in stack.stats.items():
        final_stats[k][alive] = v
    stack.theta, stack.stats = final_theta, final_stats
    skipped = [math.nan] * n_members
    test_acc = stack.accuracy(data.x_test, data.y_test).tolist() if evaluate else skipped
    train_acc = stack.accuracy(data.x_train, data.y_train).tolist() if evaluate else skipped
    loss_rows, norm_rows = torch.stack(loss_rows).cpu(), torch.stack(norm_rows).cpu()
    config = dict(steps=steps, batch_size=batch_size, optimizer=optimizer, momentum=momentum,
                  weight_decay=weight_decay, max_norm=max_norm, clip_value=clip_value, agc=agc, warmup=warmup)
    empty = torch.zeros(0, n_layers)
    return [History(loss=loss_rows[: taken[m], m].tolist(), layer_names=list(stack.names),
                    grad_norms=norm_rows[: taken[m], m], act_grad_norms=empty, update_ratios=empty,
                    test_accuracy=test_acc[m], train_accuracy=train_acc[m], seconds=seconds,
                    config=dict(lr=lrs[m], **config, seed=seeds[m], **stack.config), **outcome[m])
            for m in range(n_members)]


def _clipped(g: torch.Tensor, max_norm: float | None, clip_value: float | None) -> torch.Tensor:
    """Per-member clipping by global norm (as torch.nn.utils.clip_grad_norm_), then by value."""
    if max_norm is not None:
        g = g * (max_norm / (g.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
    if clip_value is not None:
        g = g.clamp(-clip_value, clip_value)
    return g
