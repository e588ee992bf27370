"""Train many learning rates and seeds of one network at once, each member exactly as `gs.train` would.

M members are stacked into one wide network: member m owns channels ``m*W .. m*W+W-1`` of every
hidden layer. Convolutions are grouped (``groups=M``), so no member sees another's channels;
BatchNorm over M*W channels is per-member BatchNorm; the M heads are one batched matmul; a SkipInit
gain is one scalar per member and block, spread over that member's channels. Every parameter of
member m lives in row m of one (M, P) matrix ``theta``, so per-member SGD (momentum, coupled weight
decay, warmup) or Adam, clipping (global norm, value, unit-wise AGC) and per-layer gradient norms are
whole-matrix operations. A member whose loss or gradient turns non-finite is retired (its row
removed) and the others go on untouched.
"""
from __future__ import annotations

import math
import multiprocessing
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from functools import cached_property

import torch
from torch import nn
from torch.nn import functional as F

from ._check import one_of, positive_float, positive_int
from .clip import agc_parameters, output_module
from .data import Split, batches
from .device import base_seed, configure_cpu, cpu_settings
from .models import CNN, cnn, mlp
from .monitor import parameter_groups
from .train import TRAIN_DEFAULTS, History, check_options, check_split, diagnosis, global_norm, run_config, train

ARCHS = {"cnn": cnn, "mlp": mlp}
BATCHED = ("steps", "batch_size", "momentum", "max_norm", "clip_value", "agc", "warmup", "weight_decay", "loss_limit",
           "evaluate", "optimizer")  # the train options the batched path reproduces (any value; optimizer by name)
ACTIVATIONS = {"relu": F.relu_, "tanh": torch.tanh_, "linear": lambda z: z}  # in place: z is always fresh


def sweep(data: Split, lrs, *, depth: int, seeds=None, steps: int = 100, batch_size: int = 64,
          momentum: float = 0.9, max_norm: float | None = None, arch: str = "cnn", **knobs) -> list[History]:
    """Train ``arch(depth, seed=s, **knobs)`` at every ``lr`` in ``lrs`` for every ``s`` in ``seeds``.

    Returns one :class:`~gradstab.train.History` per member, lrs-major then seeds (``None``: the one seed
    :func:`~gradstab.device.base_seed`), each equal (up to float
    rounding) to ``train(arch(depth, seed=s, **knobs), data, lr=lr, seed=s, ...)``. ``knobs`` are
    model knobs (width, norm, residual, ...) and may include any keyword option of
    :func:`~gradstab.train.train` (weight_decay, warmup, clip_value, agc, loss_limit, optimizer, amp,
    rollback, ...), checked as ``train`` checks them. Members are trained as one batched network when that
    covers the setting (norm "none"/"batch", no dropout, optimizer "sgd" or "adam"; any clipping, weight
    decay, warmup, loss limit, residual or skipinit; every other train option at its default), else one
    by one with :func:`~gradstab.train.train`. Per-layer columns and the diagnosis of a diverged member are
    ``train``'s: the groups of :func:`~gradstab.monitor.parameter_groups`, :func:`~gradstab.train.diagnosis`.
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
                   **{k: knobs.pop(k) for k in list(knobs) if k in TRAIN_DEFAULTS and k not in ("lr", "seed")})
    members = [(lr, seed) for lr in lrs for seed in seeds]
    models = [ARCHS[arch](depth, seed=seed, **knobs) for _, seed in members]
    if not _batchable(models[0], options):
        return [train(m, data, lr=lr, seed=seed, **options) for m, (lr, seed) in zip(models, members, strict=True)]
    options = {**TRAIN_DEFAULTS, **options}
    check_options(models[0], {**options, "lr": min(lrs)})
    check_split(data, models[0].to(data.device))
    head = output_module(models[0], data.x_train[:2]) if options["agc"] is not None else None
    return _fit(Stack(models, data.device, head), data, [lr for lr, _ in members], [s for _, s in members], options)


def sweep_grid(data: Split, depths, lrs, variants: dict[str, dict], *, steps: int = 100, seeds=None,
               batch_size: int = 64, momentum: float = 0.9, arch: str = "cnn", workers: int = 1,
               executor: Executor | None = None, **knobs) -> list[History]:
    """:func:`sweep` for every depth and every named variant (a dict of model knobs and train options).

    A variant may also be a function of the depth returning that dict (e.g. a branch scale of
    ``depth ** -0.5``); ``knobs`` are shared by all variants. A variant's own settings win, also over
    ``steps``, ``seeds``, ``batch_size`` and ``momentum``. Returns the Histories depth-major, then
    variant, then lr, then seed; each ``config`` carries ``depth``, ``lr``, ``seed`` and the
    variant's name under ``"variant"``.

    Where the (depth, variant) sweeps run, on a CPU split:

    - ``workers=1``, no ``executor`` (the default): here, one after another.
    - ``workers > 1``: spread over that many CPU processes of a pool of its own (spawned, closed
      on return).
    - ``executor``: any :class:`concurrent.futures.Executor` you own and close, e.g. a
      ``ProcessPoolExecutor`` or a Dask cluster's ``Client(...).get_executor()``. Each sweep is
      one ``executor.submit``; the split travels pickled with every job, and the results come back
      in job order whatever order the jobs finish in. If a job fails, the jobs not yet started are
      cancelled and its exception is raised here.

    In a worker (process or executor) each job first takes this process's CPU settings
    (:func:`~gradstab.device.cpu_settings`: thread count, flush-denormal), so on the same machine the
    numbers are identical to ``workers=1``. On a Dask cluster, ``Client("tcp://scheduler:8786")``
    connects to its scheduler; every worker needs gradstab and the same torch installed, and the
    numbers equal a one-process run only on workers with the same kind of CPU and thread count (across
    machines the last bits of float rounding differ; see the README's "Devices, seeds"). A split on a
    GPU always runs here, one sweep after another, whatever ``workers`` or ``executor`` say.

    Raises ValueError for an empty ``variants``, a ``workers`` below 1, an ``executor`` that is not a
    :class:`concurrent.futures.Executor`, or an ``executor`` together with ``workers > 1``.
    """
    if not variants:
        raise ValueError("variants must name at least one variant, e.g. {'plain': {}}")
    positive_int("workers", workers)
    if executor is not None and not isinstance(executor, Executor):
        raise ValueError(f"executor must be a concurrent.futures.Executor (e.g. ProcessPoolExecutor or a Dask "
                         f"Client's get_executor()) or None, got {type(executor).__name__}")
    if executor is not None and workers > 1:
        raise ValueError(f"pass either executor or workers > 1, not both (got workers={workers} and an executor): "
                         "the executor decides how many jobs run at once")
    common = dict(lrs=list(lrs), seeds=seeds, steps=steps, batch_size=batch_size, momentum=momentum, arch=arch)
    jobs = [(name, dict(depth=depth, **{**common, **knobs, **(variant(depth) if callable(variant) else variant)}))
            for depth in depths for name, variant in variants.items()]
    if data.device.type != "cpu" or (executor is None and workers == 1):
        results = [sweep(data, **job) for _, job in jobs]
    elif executor is not None:
        results = _submit_all(executor, data, [job for _, job in jobs], cpu_settings())
    else:
        context = multiprocessing.get_context("spawn")
        settings = [cpu_settings()] * len(jobs)
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = list(pool.map(_sweep_job, [data] * len(jobs), [job for _, job in jobs], settings))
    runs = []
    for (name, _), histories in zip(jobs, results, strict=True):
        for history in histories:
            history.config["variant"] = name
            runs.append(history)
    return runs


def _submit_all(executor: Executor, data: Split, jobs: list[dict], settings: dict) -> list[list[History]]:
    """Submit every job to ``executor`` and collect the results in job order; on the first failure (or an
    interrupt) cancel the jobs that have not started and raise."""
    futures = []
    try:
        for job in jobs:
            futures.append(executor.submit(_sweep_job, data, job, settings))
        return [future.result() for future in futures]
    except BaseException:
        for future in futures:
            future.cancel()
        raise


_ONE_JOB_AT_A_TIME = threading.Lock()  # per process: jobs on threads of one worker run one after another


def _sweep_job(data: Split, job: dict, settings: dict) -> list[History]:
    """One (depth, variant) sweep in a worker (a top-level function, so it pickles).

    The worker takes the parent's thread count and flush-denormal setting, so it rounds exactly as
    the parent does. ``job`` is left as it was (a thread pool passes the caller's own dict). Jobs given to
    threads of one process (a ThreadPoolExecutor, a Dask worker with several threads) run one at a time:
    building a model draws from torch's global generator, so interleaved jobs would change each other's
    weights.
    """
    job = dict(job)
    with _ONE_JOB_AT_A_TIME:  # models are drawn from the global torch generator: threads must not interleave
        configure_cpu(**settings)
        return sweep(data, job.pop("lrs"), **job)


def _batchable(model: nn.Module, options: dict) -> bool:
    """Whether :class:`Stack` reproduces ``train(model, **options)``: norm "none" or "batch", no dropout (its
    masks would come from one random stream, not from each member's own), a named sgd or adam, and every other
    train option at its default."""
    c = model.config
    rest = {k: v for k, v in options.items() if k not in BATCHED}
    return (c["norm"] in ("none", "batch") and c["dropout"] == 0 and options.get("optimizer", "sgd") in ("sgd", "adam")
            and all(v is TRAIN_DEFAULTS[k] or v == TRAIN_DEFAULTS[k] for k, v in rest.items()))


class Stack:
    """M same-shaped models as one grouped network with parameters ``theta`` of shape (M, P)."""

    def __init__(self, models: list[nn.Module], device, exclude: str | None = None):
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
        groups = parameter_groups(ref)
        self.names = [group for group, _ in groups]
        self.spans, self.owner = self._layer_spans(named, groups)
        self._named, self._exclude, self._ref = named, exclude, ref

    @cached_property
    def _units(self) -> _Units:
        """The units of adaptive gradient clipping (built on first use), the module ``exclude`` left out."""
        return _Units(self._named, {id(p) for p in agc_parameters(self._ref, exclude=self._exclude)})

    def _layer_spans(self, named, groups) -> tuple[list[tuple[int, int]], torch.Tensor]:
        """The column range of ``theta`` holding each parameter, and the index of its group (as
        :func:`~gradstab.monitor.parameter_groups` groups them, the columns of the monitor)."""
        starts = torch.tensor([0, *self.sizes]).cumsum(0).tolist()
        group_of = {name: j for j, (_, members) in enumerate(groups) for name, _ in members}
        spans = [(starts[i], starts[i + 1]) for i in range(len(named))]
        return spans, torch.tensor([group_of[name] for name, _ in named], device=self.theta.device)

    def first_nonfinite_parameter(self, g: torch.Tensor) -> str | None:
        """Name of the first parameter (model order) whose part of one member's gradient row ``g`` (P,) has inf/NaN."""
        bad = [not bool(torch.isfinite(g[a:b]).all()) for a, b in self.spans]
        return next((name for (name, _), b in zip(self._named, bad, strict=True) if b), None)

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the members (rows) listed in ``keep``."""
        self.theta = self.theta[keep]
        self.stats = {n: s[keep] for n, s in self.stats.items()}

    def layer_norms(self, g: torch.Tensor) -> torch.Tensor:
        """(M, layers) 2-norms of each member's per-layer gradient, as GradientMonitor computes them: each
        parameter's norm, in float32, then the root of the sum of their squares over the layer."""
        sq = g.square()
        norms = torch.stack([sq[:, a:b].sum(1) for a, b in self.spans], 1).sqrt().float()  # (M, parameters)
        return norms.new_zeros(len(g), len(self.names)).index_add_(1, self.owner, norms.square()).sqrt()

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
            h = h + self._branch_scale(p, i, z) * z if c["residual"] else z
        if self.conv:
            h = h.mean((2, 3))
        return torch.einsum("nmw,mkw->nmk", h.view(len(h), len(theta), -1), p["head.weight"]) + p["head.bias"]

    def _branch_scale(self, p: dict, i: int, z: torch.Tensor):
        """Block i's residual scale: the fixed ``branch_scale``, or with skipinit each member's learned gain
        ``blocks.i.alpha`` (M,) repeated over its W channels, shaped to broadcast against ``z`` (N, M*W, ...)."""
        if not self.config["skipinit"]:
            return self.config["branch_scale"]
        alpha = p[f"blocks.{i}.alpha"].repeat_interleave(self.config["width"])
        return alpha.view(-1, *[1] * (z.ndim - 2))

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


class _Units:
    """The units of adaptive gradient clipping, as :func:`~gradstab.clip.unitwise_norm` sees them.

    A unit is one output row of a weight with ndim >= 2, or a whole bias/gain/scalar; only the parameters
    of :func:`~gradstab.clip.agc_parameters` (all but the head) are clipped. The same parameter of every
    block (``blocks.i.layer.weight`` for all i) sits at equally spaced columns of ``theta``, so each such
    family is one strided view (M, copies, units, L) of a row-major (M, P) matrix: ``families`` holds
    (offset, spacing, copies, units, L) for each.
    """

    def __init__(self, named, clipped: set[int]):
        found, start = {}, 0
        for name, p in named:
            if id(p) in clipped:
                key = (name.split(".", 2)[-1] if name.startswith("blocks.") else name, tuple(p.shape))
                found.setdefault(key, []).append(start)
            start += p.numel()
        self.families = []
        for (_, shape), offsets in found.items():
            size, units = math.prod(shape), shape[0] if len(shape) >= 2 else 1
            gaps = {b - a for a, b in zip(offsets[:-1], offsets[1:], strict=True)}
            if len(gaps) <= 1:  # equally spaced (or a single copy): one view
                self.families.append((offsets[0], gaps.pop() if gaps else size, len(offsets), units, size // units))
            else:
                self.families += [(o, size, 1, units, size // units) for o in offsets]

    def _view(self, x: torch.Tensor, family) -> torch.Tensor:
        offset, spacing, copies, units, length = family
        return x.as_strided((len(x), copies, units, length), (x.stride(0), spacing, length, 1),
                            x.storage_offset() + offset)

    def clip(self, theta: torch.Tensor, g: torch.Tensor, factor: float, eps: float = 1e-3) -> torch.Tensor:
        """AGC of every member's gradient row ``g`` (M, P; clipped in place), as
        ``adaptive_clip_grad_(agc_parameters(model), factor)`` does it: a unit whose gradient norm exceeds
        ``factor * max(||weight unit||, eps)`` is scaled down to that norm."""
        theta, g = theta.contiguous(), g.contiguous()
        for family in self.families:
            grad = self._view(g, family)
            limit = torch.linalg.vector_norm(self._view(theta, family), dim=3, keepdim=True).clamp(min=eps) * factor
            norm = torch.linalg.vector_norm(grad, dim=3, keepdim=True)
            grad.mul_(torch.where(norm > limit, limit / norm.clamp(min=torch.finfo(norm.dtype).tiny), 1.0))
        return g


class _Optimizer:
    """``torch.optim.SGD`` (momentum, coupled weight decay) or ``Adam`` on every row of ``theta`` (M, P).

    Its state (SGD's momentum buffer, Adam's two moments) is (M, P) matrices; ``lrs`` (a list) and ``rates``
    (an (M,) tensor) are the live members' learning rates. Adam's step count is shared: every member alive
    has taken every step.
    """

    def __init__(self, name: str, theta: torch.Tensor, lrs: list[float], momentum: float, weight_decay: float):
        self.name, self.momentum, self.weight_decay, self.count = name, momentum, weight_decay, 0
        self.lrs, self.rates = list(lrs), torch.tensor(lrs, dtype=theta.dtype, device=theta.device)
        self.state = [torch.zeros_like(theta) for _ in range(1 if name == "sgd" else 2)]

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the members (rows) listed in ``keep``."""
        self.lrs, self.rates = [self.lrs[j] for j in keep.tolist()], self.rates[keep]
        self.state = [s[keep] for s in self.state]

    def step(self, theta: torch.Tensor, g: torch.Tensor, warm: float) -> None:
        """Update ``theta`` (M, P) in place along ``g`` (M, P; consumed), every learning rate times ``warm``."""
        if self.weight_decay:
            g = g.add_(self.weight_decay * theta)
        if self.name == "adam":
            self._adam(theta, g, warm)
        else:
            if self.momentum:  # the first step's buffer is g itself, as 0 * momentum + g
                g = self.state[0].mul_(self.momentum).add_(g)
            theta.sub_((self.rates * warm)[:, None] * g)

    def _adam(self, theta, g, warm, betas=(0.9, 0.999), eps=1e-8):
        """torch.optim.Adam's step (its single-tensor form, defaults), each row with its own step size."""
        self.count += 1
        avg, avg_sq = self.state
        avg.lerp_(g, 1 - betas[0])
        avg_sq.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        denom = (avg_sq.sqrt() / (1 - betas[1] ** self.count) ** 0.5).add_(eps)
        for row, a, d, lr in zip(theta, avg, denom, self.lrs, strict=True):  # addcdiv_ takes one scalar
            row.addcdiv_(a, d, value=-(lr * warm) / (1 - betas[0] ** self.count))


def _inputs(data: Split, order: torch.Tensor, seed_of: torch.Tensor):
    """The minibatch of every member: shared (N, C, ...) if all use one seed, else (N, M*C, ...)."""
    if len(order) == 1:
        idx = order[0]
        return data.x_train[idx], data.y_train[idx][:, None]
    idx = order[seed_of]  # (M, N)
    x = data.x_train[idx]  # (M, N, C, ...)
    return x.transpose(0, 1).flatten(1, 2), data.y_train[idx].T


def _fit(stack: Stack, data: Split, lrs, seeds, options: dict) -> list[History]:
    """Train the M members of ``stack`` (lrs and seeds: (M,)) together, as :func:`~gradstab.train.train` does
    each with ``options`` (its keyword arguments, defaults filled in)."""
    steps, limit, warmup = options["steps"], options["loss_limit"], options["warmup"]
    schedule, seed_of = _schedule(data, seeds, options["batch_size"], steps)
    opt = _Optimizer(options["optimizer"], stack.theta, lrs, options["momentum"], options["weight_decay"])
    log, alive, previous = _Log(stack, steps), torch.arange(len(lrs), device=data.device), None
    start = time.perf_counter()
    for step in range(steps):
        x, y = _inputs(data, schedule[:, step], None if seed_of is None else seed_of[alive])
        theta = stack.theta.requires_grad_()
        logits = stack.forward(theta, x, training=True)
        losses = F.cross_entropy(logits.transpose(1, 2), y.expand(-1, len(alive)), reduction="none").mean(0)
        (g,) = torch.autograd.grad(losses.sum(), theta)
        stack.theta = theta.detach()
        losses, norms = losses.detach(), stack.layer_norms(g)
        log.record(alive, losses, norms)
        ok = torch.isfinite(norms).all(1) & torch.isfinite(losses) & (losses <= limit)
        if not bool(ok.all()):  # the one host sync per step
            log.retire(stack, alive, ~ok, step, (losses, norms, g, previous), limit)
            keep = ok.nonzero().flatten()
            stack.select(keep)
            opt.select(keep)
            alive, g, norms = alive[keep], g[keep], norms[keep]
            if not len(alive):
                break
        previous = norms
        g = _clipped(stack, g, options["max_norm"], options["clip_value"], options["agc"])
        opt.step(stack.theta, g, min(1.0, (step + 1) / warmup) if warmup else 1.0)
    seconds = (time.perf_counter() - start) / len(lrs)
    log.finish(stack, alive)
    configs = [run_config({**options, "lr": lr}, seed, stack.config) for lr, seed in zip(lrs, seeds, strict=True)]
    return log.histories(stack, data, options["evaluate"], seconds, configs)


def _schedule(data: Split, seeds, batch_size: int, steps: int):
    """Minibatch indices (S, steps, N) of the S distinct seeds, and each member's row in it (M,) (None if S = 1)."""
    unique, n = sorted(set(seeds)), len(data.y_train)
    schedule = torch.stack([torch.stack(list(batches(n, min(batch_size, n), steps, s))) for s in unique])
    seed_of = torch.tensor([unique.index(s) for s in seeds], device=data.device) if len(unique) > 1 else None
    return schedule.to(data.device), seed_of


class _Log:
    """What each of M members did: per-step loss (M,) and layer-norm (M, layers) rows, nan once it retired;
    its step count and how it ended; its parameters and BatchNorm statistics when it retired or finished."""

    def __init__(self, stack: Stack, steps: int):
        m = len(stack.theta)
        self.losses, self.norms, self.taken, self.outcome = [], [], [steps] * m, [{} for _ in range(m)]
        self.theta, self.stats = stack.theta.clone(), {k: v.clone() for k, v in stack.stats.items()}

    def record(self, alive: torch.Tensor, losses: torch.Tensor, norms: torch.Tensor) -> None:
        n = len(self.taken)
        self.losses.append(losses.new_full((n,), math.nan).index_put_((alive,), losses))
        self.norms.append(norms.new_full((n, norms.shape[1]), math.nan).index_put_((alive,), norms))

    def retire(self, stack, alive, bad, step, measured, loss_limit) -> None:
        """Keep the state and the diagnosis of the rows ``bad`` (a mask over the live rows) at ``step``;
        ``measured`` holds the step's losses (M,), layer norms and gradients (M, ...) and the last norms taken."""
        losses, norms, g, previous = measured
        for j in bad.nonzero().flatten().tolist():
            m = int(alive[j])
            self.taken[m], self.theta[m] = step + 1, stack.theta[j]
            for k, v in stack.stats.items():
                self.stats[k][m] = v[j]
            prev = None if previous is None else previous[j]
            self.outcome[m] = diagnosis(step, float(losses[j]), norms[j], ~torch.isfinite(norms[j]), prev,
                                        stack.names, loss_limit)
            self.outcome[m]["diverged_parameter"] = stack.first_nonfinite_parameter(g[j])

    def finish(self, stack: Stack, alive: torch.Tensor) -> None:
        """Put every member's final state back into ``stack`` (retired members as they were when they stopped)."""
        self.theta[alive] = stack.theta
        for k, v in stack.stats.items():
            self.stats[k][alive] = v
        stack.theta, stack.stats = self.theta, self.stats

    def histories(self, stack: Stack, data: Split, evaluate: bool, seconds: float, configs) -> list[History]:
        skipped = [math.nan] * len(configs)
        test_acc = stack.accuracy(data.x_test, data.y_test).tolist() if evaluate else skipped
        train_acc = stack.accuracy(data.x_train, data.y_train).tolist() if evaluate else skipped
        losses, norms = torch.stack(self.losses).cpu(), torch.stack(self.norms).cpu()
        empty = torch.zeros(0, len(stack.names))
        return [History(loss=losses[:t, m].tolist(), layer_names=list(stack.names), grad_norms=norms[:t, m],
                        act_grad_norms=empty, update_ratios=empty, test_accuracy=test_acc[m],
                        train_accuracy=train_acc[m], seconds=seconds, config=config,
                        grad_norm=[float(global_norm(row, ~torch.isfinite(row))) for row in norms[:t, m]],
                        scale=[1.0] * t, **self.outcome[m])
                for m, (t, config) in enumerate(zip(self.taken, configs, strict=True))]


def _clipped(stack: Stack, g: torch.Tensor, max_norm: float | None, clip_value: float | None,
             agc: float | None) -> torch.Tensor:
    """Each member's gradient row clipped as train() clips: by global norm (as torch.nn.utils.clip_grad_norm_),
    then by value, then unit-wise (AGC)."""
    if max_norm is not None:
        g = g * (max_norm / (g.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
    if clip_value is not None:
        g = g.clamp(-clip_value, clip_value)
    if agc is not None:
        g = stack._units.clip(stack.theta, g, agc)
    return g
