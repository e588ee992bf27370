"""The training loop of gradstab, for the book's networks and for any PyTorch model.

One loop: forward, backward (over ``accumulate`` micro-batches), measure every parameter's gradient,
decide (take the step, skip it, roll back, or stop), clip, step. The remedies are pieces the loop
calls, each a few lines: :class:`Clipper` (norm, value, AGC), :class:`~gradstab.amp.LossScaler`
(autocast and a GradScaler), :class:`~gradstab.guard.Guard` (skip non-finite steps, roll back after
spikes) and :class:`Schedule` (warmup and an optional scheduler). A run ends in a :class:`History`.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ._check import one_of, positive_float, positive_int
from .amp import LossScaler
from .clip import adaptive_clip_grad_, agc_parameters, clip_grad_value_, output_module
from .data import Split, training_batches
from .device import resolve_seed, seed_everything
from .distributed import data_parallel_group, is_ddp, is_sharded, mean_over_ranks, reshard
from .guard import ACCEPT, ROLLBACK, SKIP, STOP, Event, Guard
from .monitor import GradientMonitor
from .norm import _BatchNorm as _ScratchBatchNorm

OPTIMIZERS = ("sgd", "adam", "adamw")
IGNORE_INDEX = -100  # cross-entropy's default ignore_index


@dataclass
class History:
    """What a run did. ``grad_norms``, ``act_grad_norms`` and ``update_ratios`` are (steps, layers) CPU
    tensors (one row per training step, one column per parameter group of
    :func:`~gradstab.monitor.parameter_groups`); ``loss``, ``grad_norm`` (global 2-norm of all gradients
    before clipping) and ``scale`` (the loss scale in force, 1.0 without one) hold one float per step.
    ``events`` are the guard's and the loss scaler's interventions (:class:`~gradstab.guard.Event`).
    """

    loss: list[float] = field(repr=False)
    layer_names: list[str] = field(repr=False)
    grad_norms: torch.Tensor = field(repr=False)
    act_grad_norms: torch.Tensor = field(repr=False)
    update_ratios: torch.Tensor = field(repr=False)
    diverged: bool = False
    diverged_step: int | None = None
    diverged_layer: str | None = None
    reason: str = ""
    test_accuracy: float = float("nan")
    train_accuracy: float = float("nan")
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    diverged_parameter: str | None = None
    grad_norm: list[float] = field(default_factory=list, repr=False)
    scale: list[float] = field(default_factory=list, repr=False)
    events: list[Event] = field(default_factory=list, repr=False)

    @property
    def steps(self) -> int:
        return len(self.loss)

    @property
    def max_grad_norm(self) -> float:
        """Largest finite per-layer gradient norm seen (nan if none was finite)."""
        finite = self.grad_norms[torch.isfinite(self.grad_norms)]
        return float(finite.max()) if finite.numel() else float("nan")

    def steps_where(self, kind: str) -> list[int]:
        """Steps of the events of ``kind`` (``"skip"`` or ``"rollback"``)."""
        return [e.step for e in self.events if e.kind == kind]

    @property
    def skipped(self) -> list[int]:
        """The steps whose update was not applied (skipped by the guard or by the loss scaler)."""
        return self.steps_where("skip")

    @property
    def rollbacks(self) -> list[int]:
        """The steps at which the guard restored a checkpoint."""
        return self.steps_where("rollback")

    def _interventions(self) -> str:
        c = self.config
        guarded = c.get("skip_nonfinite") or c.get("rollback") or c.get("amp")
        text = f", {len(self.skipped)} skipped" if guarded else ""
        text += f", {_count(len(self.rollbacks), 'rollback')}" if c.get("rollback") else ""
        return text + (f", final scale {self.scale[-1]:g}" if c.get("amp") and self.scale else "")

    def _where(self) -> str:
        """Where it broke, saying what ``diverged_layer`` means in this case (see :func:`diagnosis`)."""
        layer, parameter = self.diverged_layer, self.diverged_parameter
        first = f"first non-finite gradient in layer {layer}" + (f", parameter {parameter}" if parameter else "")
        if self.reason.startswith("gradient") or (self.reason.startswith("loss became") and self.diverged_step == 0):
            return first
        where = ("largest gradient one step earlier" if self.reason.startswith("loss became") else
                 "largest gradient") + f" in layer {layer}"
        return where + (f"; first non-finite gradient in parameter {parameter}" if parameter else "")

    def summary(self) -> str:
        """One line: where it diverged, or steps, interventions, final loss and test accuracy."""
        if self.diverged:
            return f"diverged at step {self.diverged_step} ({self.reason}); {self._where()}"
        final = f"final loss {self.loss[-1]:.3f}" if self.loss else "no steps"
        tested = "" if math.isnan(self.test_accuracy) else f", test accuracy {self.test_accuracy:.1%}"
        return f"{self.steps} steps{self._interventions()}, {final}{tested}"

    def report(self) -> str:
        """One line per intervention, then the outcome."""
        lines = [str(e) for e in self.events]
        outcome = f"{self.steps} steps, {len(self.skipped)} skipped, {_count(len(self.rollbacks), 'rollback')}, "
        lines.append(outcome + (self.summary() if self.diverged else f"test accuracy {self.test_accuracy:.1%}"))
        return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    """``"1 rollback"``, ``"2 rollbacks"``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` classified as ``y``, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        return float((model(x).argmax(dim=1) == y).float().mean())
    finally:
        model.train(was_training)


def make_optimizer(params, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` (with ``momentum``), ``Adam`` or ``AdamW`` by name; ``weight_decay`` is torch's
    (coupled L2 for SGD and Adam, decoupled for AdamW, Loshchilov & Hutter 2019)."""
    one_of("optimizer", name, OPTIMIZERS)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return (torch.optim.Adam if name == "adam" else torch.optim.AdamW)(params, lr=lr, weight_decay=weight_decay)


def build_optimizer(spec, model: nn.Module, lr, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer ``train`` uses: a name of ``OPTIMIZERS`` (needs ``lr``), an instance over the
    model's parameters, or a factory ``params -> Optimizer`` (both set their own learning rates, so ``lr``
    must be left out). Raises ValueError otherwise."""
    if isinstance(spec, str):  # check_options has made sure of lr
        return make_optimizer(model.parameters(), spec, lr, momentum, weight_decay)
    if lr is not None:
        raise ValueError("lr must be left out when optimizer is an instance or a factory: its param groups "
                         "carry the learning rate")
    opt = spec if isinstance(spec, torch.optim.Optimizer) else spec(model.parameters()) if callable(spec) else None
    if not isinstance(opt, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, a torch.optim.Optimizer or a function "
                         f"params -> Optimizer; got {spec!r}")
    mine = {id(p) for p in model.parameters()}
    if any(id(p) not in mine for g in opt.param_groups for p in g["params"]):
        raise ValueError("optimizer holds parameters that are not the model's")
    return opt


def _optimizer_name(spec) -> str:
    """The name a History's config gives the optimizer: the name, the instance's class, or the factory's name."""
    if isinstance(spec, str):
        return spec
    return type(spec).__name__ if isinstance(spec, torch.optim.Optimizer) else getattr(spec, "__name__", "factory")


class Clipper:
    """The clipping of one step, in the order norm, value, AGC (each optional), on the gradients in ``.grad``.

    ``max_norm``: ``torch.nn.utils.clip_grad_norm_`` over all parameters; ``clip_value``:
    :func:`~gradstab.clip.clip_grad_value_`; ``agc``: :func:`~gradstab.clip.adaptive_clip_grad_` with that
    clip factor over :func:`~gradstab.clip.agc_parameters` of the model, leaving out ``exclude`` (the
    module producing the output, as Brock et al. 2021 advise).
    """

    def __init__(self, model: nn.Module, max_norm=None, clip_value=None, agc=None, exclude=None):
        self.params = [p for p in model.parameters() if p.requires_grad]
        sparse = [name for name, m in model.named_modules() if getattr(m, "sparse", False) is True]
        for option, value in (("max_norm", max_norm), ("agc", agc)):
            if value is not None and sparse:
                raise ValueError(f"{option} cannot clip the sparse gradients of {', '.join(sparse)} (torch's norms "
                                 f"are not defined for them); use sparse=False there, or clip_value")
        self.max_norm, self.clip_value, self.agc = max_norm, clip_value, agc
        self.agc_params = agc_parameters(model, exclude=exclude) if agc is not None else []

    def __call__(self) -> None:
        if self.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        if self.clip_value is not None:
            clip_grad_value_(self.params, self.clip_value)
        if self.agc is not None:
            adaptive_clip_grad_(self.agc_params, clip_factor=self.agc)


class Schedule:
    """The learning rate of each step: the optimizer's own (as ``scheduler`` sets it), times the linear
    warmup factor min(1, (t + 1) / warmup) of step t (Goyal et al. 2017), times the guard's backoff.

    The warmup factor is applied for the step only and never written into the optimizer, so it composes
    with any scheduler. ``scheduler`` is an ``LRScheduler`` on the optimizer, or a factory
    ``optimizer -> LRScheduler``; it is stepped once after every update that was applied (a skipped or
    rolled-back step does not advance it; ``ReduceLROnPlateau`` gets the step's loss).
    """

    def __init__(self, opt: torch.optim.Optimizer, warmup: int = 0, scheduler=None):
        self.opt, self.warmup = opt, warmup
        self.scheduler = scheduler(opt) if callable(scheduler) and not hasattr(scheduler, "step") else scheduler
        if self.scheduler is not None and not hasattr(self.scheduler, "step"):
            raise ValueError(f"scheduler must be an LRScheduler or a function optimizer -> LRScheduler, "
                             f"got {scheduler!r}")
        if self.scheduler is not None and getattr(self.scheduler, "optimizer", None) is not opt:
            raise ValueError("scheduler must be an LRScheduler of this run's optimizer, or a function "
                             "optimizer -> LRScheduler (needed with a named optimizer)")

    def factor(self, t: int) -> float:
        """The warmup factor of step ``t`` (0-based): min(1, (t + 1) / warmup), 1 without warmup."""
        return min(1.0, (t + 1) / self.warmup) if self.warmup else 1.0

    def step(self, factor: float, step: Callable[[], bool]) -> bool:
        """Run ``step()`` (the optimizer's step) with every group's lr times ``factor``; return its result."""
        if factor == 1.0:
            return step()
        saved = [g["lr"] for g in self.opt.param_groups]
        for g, lr in zip(self.opt.param_groups, saved, strict=True):
            g["lr"] = lr * factor
        try:
            return step()
        finally:
            for g, lr in zip(self.opt.param_groups, saved, strict=True):
                g["lr"] = lr

    def advance(self, loss: torch.Tensor) -> None:
        """Step the scheduler after an applied update (``ReduceLROnPlateau`` gets ``loss``)."""
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(float(loss))
        elif self.scheduler is not None:
            self.scheduler.step()


# -- checks ---------------------------------------------------------------------------------------
def check_options(model: nn.Module, options: dict) -> None:
    """Raise ValueError, naming the argument, for any bad number among ``train``'s ``options``."""
    if options.get("lr") is not None:
        positive_float("lr", options["lr"])
    elif isinstance(options.get("optimizer"), str):
        raise ValueError(f"lr is required with optimizer={options['optimizer']!r} (a learning rate > 0)")
    for name in ("steps", "batch_size", "accumulate"):
        positive_int(name, options[name])
    positive_int("warmup", options["warmup"], minimum=0)
    positive_float("momentum", options["momentum"], allow_zero=True)
    positive_float("weight_decay", options["weight_decay"], allow_zero=True)
    if not options["loss_limit"] > 0:
        raise ValueError(f"loss_limit must be > 0 (math.inf to stop only on non-finite values), "
                         f"got {options['loss_limit']!r}")
    for name in ("max_norm", "clip_value", "agc"):
        if options[name] is not None:
            positive_float(name, options[name])
    has_bn = any(isinstance(m, (nn.modules.batchnorm._BatchNorm, _ScratchBatchNorm)) for m in model.modules())
    if has_bn and options["batch_size"] < 2:
        raise ValueError(f"batch_size must be >= 2 for a model with BatchNorm in training, got {options['batch_size']}")


def check_split(data: Split, model: nn.Module | None = None, loss_fn=None, autocast=None) -> None:
    """Raise ValueError naming the field if a Split's inputs and labels differ in length or device, or
    (given ``model``) if :func:`check_batch` fails on its training or test set."""
    for x, y in (("x_train", "y_train"), ("x_test", "y_test")):
        a, b = getattr(data, x), getattr(data, y)
        if len(a) != len(b):
            raise ValueError(f"data.{x} has {len(a)} rows but data.{y} has {len(b)}; they must match")
    for name in ("y_train", "x_test", "y_test"):
        if getattr(data, name).device != data.device:
            raise ValueError(f"data.{name} is on {getattr(data, name).device} but data.x_train on {data.device}; "
                             f"put every field on one device (data.to(device))")
    if not len(data.y_train):
        raise ValueError("data.x_train holds no examples")
    for test, like in (("x_test", "x_train"), ("y_test", "y_train")):
        a, b = getattr(data, test), getattr(data, like)
        if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
            raise ValueError(f"data.{test} has rows of shape {tuple(a.shape[1:])} and dtype {a.dtype}, but "
                             f"data.{like} has {tuple(b.shape[1:])} and {b.dtype}; they must match")
    if model is not None:
        out = check_batch(model, data.x_train, data.y_train, loss_fn, ("data.x_train", "data.y_train"), autocast)
        if loss_fn is None and not data.y_test.is_floating_point():
            _check_label_range(data.y_test, out.shape[1], "data.y_test")


def _expected_input(model: nn.Module) -> str:
    """What the model's first layer takes, in words ('' if no layer says)."""
    for name, m in model.named_modules():
        for attr, what in (("in_features", "input features"), ("in_channels", "input channels"),
                           ("input_size", "input features per time step"), ("num_embeddings", "token ids below")):
            if isinstance(getattr(m, attr, None), int):
                return f"; its first layer {name or type(m).__name__} expects {getattr(m, attr)} {what}"
    return ""


def _probe_output(model: nn.Module, x: torch.Tensor, x_name: str, autocast) -> torch.Tensor:
    """The model's output on ``x`` (eval mode, no gradient; the mode is restored), or a ValueError naming
    ``x_name`` with its shape and dtype and what the model expects."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast():
            return model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        dtypes = sorted({str(p.dtype) for p in model.parameters()})
        raise ValueError(f"{x_name} (shape {tuple(x.shape)}, {x.dtype}) does not fit the model: {error}"
                         f"{_expected_input(model)}; its parameters are {', '.join(dtypes)}") from error
    finally:
        model.train(was_training)


def _check_class_targets(out: torch.Tensor, y: torch.Tensor, y_name: str) -> None:
    """Cross-entropy's targets ``y`` (N, ...) for outputs like ``out`` (its first rows): int64 class indices
    (N, d...) in [0, C), or float class probabilities (N, C, d...)."""
    if out.ndim < 2:
        raise ValueError(f"cross-entropy needs model outputs of shape (N, C) (C classes), got {tuple(out.shape)}; "
                         f"pass loss_fn= for other outputs")
    classes, n = out.shape[1], len(y)
    indices, probabilities = (n, *out.shape[2:]), (n, *out.shape[1:])
    need = (f"cross-entropy needs int64 class indices of shape {indices} in [0, {classes}) or float class "
            f"probabilities of shape {probabilities}")
    if classes == 1:
        raise ValueError(f"the model outputs a single value per example (shape {tuple(out.shape)}): cross-entropy "
                         f"over one class is always 0, so nothing would train; pass loss_fn= (e.g. "
                         f"F.mse_loss for regression, F.binary_cross_entropy_with_logits for two classes)")
    if y.is_floating_point():
        if tuple(y.shape) != probabilities:
            raise ValueError(f"{y_name} holds float values of shape {tuple(y.shape)}, but {need} "
                             f"(for class labels use y.long(); for regression pass loss_fn=)")
        return
    if y.dtype != torch.int64 or tuple(y.shape) != indices:
        raise ValueError(f"{y_name} has dtype {y.dtype} and shape {tuple(y.shape)}, but {need}")


def check_class_targets(out: torch.Tensor, y: torch.Tensor, y_name: str) -> None:
    """Raise ValueError naming ``y_name`` unless ``y`` suits cross-entropy on outputs like ``out`` (its first
    rows, (N, C, ...)): int64 class indices (N, ...) in [0, C) (``IGNORE_INDEX`` allowed), or float class
    probabilities (N, C, ...); a single output per example (C = 1) is refused."""
    _check_class_targets(out, y, y_name)
    if not y.is_floating_point():
        _check_label_range(y, out.shape[1], y_name)


def _check_label_range(y: torch.Tensor, classes: int, y_name: str) -> None:
    valid = y[y != IGNORE_INDEX]
    if valid.numel() and not (int(valid.min()) >= 0 and int(valid.max()) < classes):
        raise ValueError(f"{y_name} holds class indices from {int(valid.min())} to {int(valid.max())}, but the "
                         f"model outputs {classes} classes: they must lie in [0, {classes})")


def _check_loss(loss_fn, out: torch.Tensor, y: torch.Tensor, y_name: str) -> None:
    """Call ``loss_fn`` once; a failure, a warning (e.g. broadcasting mismatched shapes) or a result that is
    neither a scalar nor per-example losses becomes a ValueError naming ``y_name``."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            loss = loss_fn(out, y)
    except (RuntimeError, ValueError, TypeError, IndexError, UserWarning) as error:
        raise ValueError(f"loss_fn fails on the model's output (shape {tuple(out.shape)}) and {y_name} "
                         f"(shape {tuple(y.shape)}, {y.dtype}): {error}") from error
    if not isinstance(loss, torch.Tensor) or not loss.is_floating_point() or (
            loss.ndim and loss.shape[0] != len(out)):
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a float scalar or per-example losses of shape ({len(out)}, ...); "
                         f"got {shape}")


def check_batch(model: nn.Module, x, y, loss_fn=None, names=("data.x", "data.y"), autocast=None) -> torch.Tensor:
    """Check one batch against the model and the loss before training; return the model's output on it.

    ``x`` and ``y`` must be tensors with as many rows; the model must run on ``x`` (a failure, e.g. a
    feature-count or dtype mismatch, is re-raised as ValueError naming ``names[0]`` and what the model's
    first layer expects); the targets must suit the loss (see :func:`check_class_targets` for cross-entropy;
    any other ``loss_fn`` is called once). Raises ValueError naming the field.
    """
    from contextlib import nullcontext

    x_name, y_name = names
    for value, name in ((x, x_name), (y, y_name)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if len(x) != len(y):
        raise ValueError(f"{x_name} has {len(x)} rows but {y_name} has {len(y)}; they must match")
    out = _probe_output(model, x[:2], x_name, autocast or nullcontext)
    if loss_fn is None:
        check_class_targets(out, y, y_name)
    else:
        _check_loss(loss_fn, out, y[:2], y_name)
    return out


# -- the loop -----------------------------------------------------------------------------------------
def _loss(loss_fn, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean loss, per-example losses or None): cross-entropy by default; a ``loss_fn`` result with a batch
    dimension is averaged (its rows are the per-example losses)."""
    if loss_fn is None:
        return F.cross_entropy(out, y), None
    loss = loss_fn(out, y)
    if loss.ndim == 0:
        return loss, None
    return loss.mean(), loss.detach().flatten(1).mean(1) if loss.ndim > 1 else loss.detach()


@dataclass
class _Seen:
    """What one step's micro-batches produced, kept to name a suspect example if the step is judged bad."""

    cross_entropy: bool
    outputs: list = field(default_factory=list)  # (output, targets, rows, per-example losses or None)

    def suspect(self) -> int | None:
        """The example with the largest (or a non-finite) loss: its training-set row for a Split, else its
        position in the step's batch (micro-batches in order). None if the loss_fn gave only a scalar."""
        losses, rows, offset = [], [], 0
        for out, y, idx, per in self.outputs:
            if per is None and not self.cross_entropy:
                return None
            losses.append(F.cross_entropy(out.float(), y, reduction="none") if per is None else per)
            rows.append(idx if idx is not None else torch.arange(offset, offset + len(y), device=y.device))
            offset += len(y)
        losses = torch.nan_to_num(torch.cat(losses).float(), nan=math.inf)
        return int(torch.cat(rows)[losses.argmax()])


class _Step:
    """Forward and backward of one training step over its micro-batches, with the loss scaler's autocast."""

    def __init__(self, model, loss_fn, scaler: LossScaler):
        self.model, self.loss_fn, self.scaler = model, loss_fn, scaler
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ddp = is_ddp(model)  # DDP: all-reduce only the last micro-batch's gradients (no_sync before)

    def __call__(self, micro, backward: bool = True) -> tuple[torch.Tensor, _Seen]:
        """Zero the gradients, then forward (and backward) every micro-batch; return the step's mean loss
        (0-dim, the mean of the micro-batch losses) and what it saw."""
        seen, losses = _Seen(self.loss_fn is None), []
        for p in self.params:  # zero_grad(set_to_none=True), without walking the modules every step
            p.grad = None
        for k, (x, y, rows) in enumerate(micro):
            defer = self.ddp and backward and k < len(micro) - 1
            with self.model.no_sync() if defer else contextlib.nullcontext():
                with torch.set_grad_enabled(backward), self.scaler.autocast():
                    out = self.model(x)
                    loss, per = _loss(self.loss_fn, out, y)
                if backward:
                    self.scaler.backward(loss if len(micro) == 1 else loss / len(micro))
            losses.append(loss.detach())
            seen.outputs.append((out.detach(), y, rows, per))
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean(), seen


def diagnosis(step: int, loss: float, norms: torch.Tensor, nonfinite: torch.Tensor, previous: torch.Tensor | None,
              names: list[str], loss_limit: float) -> dict:
    """Say where a run broke (the History fields ``diverged``, ``diverged_step``, ``diverged_layer``, ``reason``).

    ``norms`` (layers,) are this step's per-layer gradient norms, ``nonfinite`` (layers,) bool marks the
    layers whose gradient is inf/NaN, ``previous`` the norms of the last step taken. If the loss itself is
    non-finite every gradient is, so the culprit is the layer whose gradient was largest one step earlier
    (the first non-finite one at the first step); if only some gradients are non-finite, the first such
    layer in model order; if the loss merely crossed ``loss_limit``, the layer with the largest gradient.
    """
    def first(mask):
        bad = mask.nonzero()
        return names[int(bad[0])] if len(bad) else None

    def largest(row):
        return names[int(torch.nan_to_num(row, nan=-math.inf).argmax())]

    if not math.isfinite(loss):
        reason, layer = f"loss became {loss}", first(nonfinite) if previous is None else largest(previous)
    elif bool(nonfinite.any()):
        reason, layer = "gradient became non-finite", first(nonfinite)
    else:
        reason, layer = f"loss {loss:.3g} exceeded loss_limit={loss_limit:g}", largest(norms)
    return dict(diverged=True, diverged_step=step, diverged_layer=layer, reason=reason)


def global_norm(norms: torch.Tensor, nonfinite: torch.Tensor) -> torch.Tensor:
    """The 2-norm of all gradients from per-layer norms (..., layers): sqrt(sum of squares) over the last
    dimension, layers without a gradient (nan but not ``nonfinite``) left out; no host sync."""
    missing = torch.isnan(norms) & ~nonfinite
    return torch.where(missing, 0.0, norms).square().sum(-1).sqrt()


class _Log:
    """The per-step lists of a run (tensors until the end, so that logging costs no host sync)."""

    def __init__(self):
        self.loss, self.nonfinite, self.scale, self.events, self.outcome = [], [], [], [], {}

    def step(self, loss: torch.Tensor, nonfinite: torch.Tensor, scale: float, action: str) -> None:
        self.loss.append(torch.full_like(loss, math.nan) if action == SKIP else loss)
        self.nonfinite.append(nonfinite)
        self.scale.append(scale)

    def losses(self) -> list[float]:
        return torch.stack(self.loss).float().cpu().tolist() if self.loss else []

    def grad_norm(self, norms: torch.Tensor) -> list[float]:
        """Global gradient norm of each step, from the monitor's (steps, layers) history ``norms``."""
        if not self.nonfinite:
            return []
        return global_norm(norms, torch.stack(self.nonfinite).cpu()).tolist()


@dataclass
class _Run:
    """The pieces of one run, assembled by :func:`train`."""

    model: nn.Module
    opt: torch.optim.Optimizer
    step: _Step
    monitor: GradientMonitor
    clip: Clipper
    scaler: LossScaler
    guard: Guard
    schedule: Schedule
    loss_limit: float
    group: object = None  # the data-parallel process group (DDP, FSDP2), else None

    def train(self, batches: Iterator, steps: int, accumulate: int, progress: bool) -> _Log:
        log, previous = _Log(), None
        with self.monitor:
            for t in _steps(steps, progress):
                norms, action = self._one(t, [next(batches) for _ in range(accumulate)], log, previous)
                if action == STOP:
                    break
                previous = norms if action == ACCEPT else previous
            else:
                self._final_check(steps, batches, accumulate, log)
        return log

    def _one(self, t: int, micro, log: _Log, previous) -> tuple[torch.Tensor, str]:
        scale = self.scaler.scale
        loss, seen = self.step(micro)
        if self.group is not None:  # the loss of the union of the ranks' batches: every rank judges the same
            loss = mean_over_ranks(loss, self.group)
        self.scaler.unscale(self.opt)
        norms = self.monitor.record()
        nonfinite = self.monitor.nonfinite(norms)
        bad = _bad_loss(loss, self.loss_limit)
        if not self.scaler.enabled:  # with a loss scaler, inf/NaN gradients are its to skip
            bad = bad | nonfinite.any()
        action, reason = self.guard.judge(t, loss, bad)
        log.step(loss, nonfinite, scale, action)
        if action == STOP:
            log.outcome = diagnosis(t, float(loss), norms, nonfinite, previous, self.monitor.names, self.loss_limit)
            log.outcome["diverged_parameter"] = self.monitor.first_nonfinite_parameter()
        elif action != ACCEPT:
            log.events.append(Event(t, action, reason, seen.suspect(), self.guard.carry_out(action)))
        else:
            self._update(t, loss, scale, log)
        return norms, action

    def _update(self, t: int, loss: torch.Tensor, scale: float, log: _Log) -> None:
        self.clip()
        self.monitor.before_step()
        factor = self.schedule.factor(t) * self.guard.lr_factor
        applied = self.schedule.step(factor, lambda: self.scaler.step(self.opt, scale))
        self.monitor.after_step()
        if applied:
            self.schedule.advance(loss)
            self.guard.accept(t)
        else:
            log.events.append(Event(t, SKIP, f"loss scaler: inf/NaN gradient at scale {scale:g}, scale lowered"))

    def _final_check(self, steps: int, batches: Iterator, accumulate: int, log: _Log) -> None:
        """After the last step, one more batch without an update (rollback guard only): damage done by the
        final steps is caught too; an event at step ``steps`` is that check."""
        if not self.guard.rollback:
            return
        loss, seen = self.step([next(batches) for _ in range(accumulate)], backward=False)
        if self.group is not None:  # every rank judges the loss of the union of the batches, as in _one
            loss = mean_over_ranks(loss, self.group)
        action, reason = self.guard.judge(steps, loss, _bad_loss(loss, self.loss_limit), final=True)
        if action == ROLLBACK:
            log.events.append(Event(steps, action, reason, seen.suspect(), self.guard.carry_out(action)))


def _bad_loss(loss: torch.Tensor, limit: float) -> torch.Tensor:
    """True (0-dim) if ``loss`` is inf/NaN or above ``limit``."""
    bad = ~torch.isfinite(loss)
    return bad if limit == math.inf else bad | (loss > limit)


def _steps(steps: int, progress: bool):
    if not progress:
        return range(steps)
    from tqdm.auto import tqdm

    return tqdm(range(steps), desc="training", leave=False)


def _evaluate(model: nn.Module, data, loss_fn, evaluate: bool) -> dict:
    """Test and train accuracy for a Split of class labels (nan otherwise, or without ``evaluate``)."""
    if not (evaluate and isinstance(data, Split) and loss_fn is None and not data.y_train.is_floating_point()):
        return dict(test_accuracy=math.nan, train_accuracy=math.nan)
    return dict(test_accuracy=accuracy(model, data.x_test, data.y_test),
                train_accuracy=accuracy(model, data.x_train, data.y_train))


def run_config(options: dict, seed: int, model_config: dict) -> dict:
    """The ``config`` of a History: the options that shape a run, the seed and the model's own ``config``."""
    keys = ("lr", "steps", "batch_size", "optimizer", "momentum", "weight_decay", "max_norm", "clip_value", "agc",
            "warmup", "accumulate", "amp", "skip_nonfinite", "rollback")
    config = {k: options[k] for k in keys}
    config["optimizer"] = _optimizer_name(options["optimizer"])
    return dict(config, seed=seed, **model_config)


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def train(model: nn.Module, data, *, lr: float | None = None, steps: int = 150, batch_size: int = 64,
          loss_fn: Callable | None = None, optimizer="sgd", momentum: float = 0.9, weight_decay: float = 0.0,
          scheduler=None, accumulate: int = 1, max_norm: float | None = None, clip_value: float | None = None,
          agc: float | None = None, warmup: int = 0, amp: str | None = None, loss_scaling: bool | None = None,
          init_scale: float = 2.0**16, growth_interval: int = 2000, unscale_before_clip: bool = True,
          skip_nonfinite: bool = False, rollback: bool = False, spike_factor: float = 3.0, spike_window: int = 20,
          checkpoint_every: int = 10, keep: int = 3, patience: int = 3, lr_backoff: float = 1.0,
          seed: int | None = None, activations: bool = False, updates: bool = False,
          loss_limit: float = math.inf, progress: bool = False, evaluate: bool = True) -> History:
    """Train ``model`` on ``data`` for ``steps`` optimizer steps; return what happened as a :class:`History`.

    Data: a :class:`~gradstab.data.Split` (the model is moved to its device; minibatches of ``batch_size``
    rows from seeded permutations, see :func:`~gradstab.data.batches`; test and train accuracy at the end),
    or any iterable of ``(x, y)`` tensor batches such as a ``torch.utils.data.DataLoader`` (re-iterated when
    exhausted; each batch moved to the model's device; accuracy left nan). Checked before the first step:
    lengths, devices, the model on the first rows (a feature-count or dtype mismatch names ``data.x``) and
    the targets against the loss (cross-entropy: int64 class indices (N,) in [0, C) or float probabilities
    (N, C)). ``loss_fn(output, y)``: a scalar, or per-example losses (averaged); default cross-entropy.

    Optimizer: ``"sgd"`` (``momentum``), ``"adam"``, ``"adamw"`` with ``lr`` and ``weight_decay``; or a
    ``torch.optim.Optimizer`` instance or factory ``params -> Optimizer`` (then ``lr`` is left out).
    ``scheduler``: an LRScheduler of that instance, or a factory ``optimizer -> LRScheduler``; stepped once
    per applied update. ``warmup``: linear warmup over that many steps, multiplying whatever the optimizer and
    scheduler set. ``accumulate``: micro-batches of ``batch_size`` per step, each loss divided by
    ``accumulate``; the check and the clipping happen once, after the last micro-batch.

    Remedies (:class:`Clipper`, in this order): ``max_norm`` (global norm), ``clip_value``, ``agc`` (unit-wise
    adaptive clipping factor, leaving out the module that produces the output, found by
    :func:`~gradstab.clip.output_module` on the first batch). ``amp``: autocast to ``"float16"`` or
    ``"bfloat16"`` with a GradScaler (``loss_scaling``; default on for float16 only; ``init_scale``,
    ``growth_interval``); gradients are unscaled before they are measured and clipped, unless
    ``unscale_before_clip=False`` (the classic bug). Guards (:class:`~gradstab.guard.Guard`):
    ``skip_nonfinite`` skips steps with a non-finite loss or gradient, ``rollback`` restores the last
    checkpoint after a loss spike or ``patience`` bad steps in a row (see :func:`~gradstab.guard.guarded_train`
    for ``spike_factor``, ``spike_window``, ``checkpoint_every``, ``keep``, ``lr_backoff``).

    Without a guard the run stops, without raising, at the first step whose loss or any gradient is
    non-finite (with a loss scaler: whose loss is; inf/NaN gradients are the scaler's to skip) or whose loss
    exceeds ``loss_limit``; the update of that step is not applied, and the History names the step, a
    layer (parameter group) and the first parameter whose gradient is non-finite. The layer is the first
    one with a non-finite gradient when the gradients broke first (or at step 0); when the loss itself
    became non-finite later, every gradient is, so it is the layer whose gradient was largest one step
    earlier; when the loss crossed ``loss_limit``, the one with the largest gradient (``History.summary()``
    says which). ``activations``/``updates`` record output-gradient norms and
    update-to-weight ratios (:class:`~gradstab.monitor.GradientMonitor`); ``evaluate=False`` skips the final
    accuracy. The same ``seed`` (``None``: :func:`~gradstab.device.base_seed`) gives the same history on one
    machine. Under DDP or FSDP2, call it on every rank with that rank's own batches (equal sizes): the
    loss is averaged over the ranks (one all-reduce per step), so every rank logs and judges the loss and
    gradients of one process training on the union of the ranks' batches; with ``accumulate`` a DDP model
    all-reduces only at the last micro-batch (``no_sync`` before); float16 loss scaling on an FSDP2 model is refused
    (each rank's scaler would see only its shards). Raises ValueError, naming the argument or
    the data field, for bad input. The data check runs
    the model once on two examples in eval mode without gradient (forward hooks see that call).
    """
    options = {k: v for k, v in locals().items() if k not in ("model", "data")}
    check_options(model, options)
    seed = resolve_seed(seed)
    if isinstance(data, Split):
        check_split(data)
        model.to(data.device)
    model.train()
    scaler = LossScaler(amp, _device_of(model), loss_scaling, init_scale, growth_interval, unscale_before_clip)
    if scaler.enabled and is_sharded(model):
        raise ValueError("amp with loss_scaling on a sharded (FSDP2) model is not supported: each rank's GradScaler "
                         "checks only its own shards for inf/NaN, so the ranks could skip different steps; use "
                         "amp='bfloat16' (no loss scaling) or loss_scaling=False")
    seed_everything(seed)
    batches, (x, y) = training_batches(data, batch_size, seed, _device_of(model))
    if isinstance(data, Split):
        check_split(data, model, loss_fn, scaler.autocast)
    else:
        check_batch(model, x, y, loss_fn, ("data.x", "data.y"), scaler.autocast)
    reshard(model)
    opt = build_optimizer(optimizer, model, lr, momentum, weight_decay)
    schedule = Schedule(opt, warmup, scheduler)
    guard = Guard(model, opt, skip_nonfinite, rollback, spike_factor, spike_window, checkpoint_every, keep, patience,
                  lr_backoff, loss_limit, schedule.scheduler)
    head = output_module(model, x[:2]) if agc is not None else None  # AGC leaves the classifier out
    reshard(model)  # FSDP2: the check passes above may leave the root unsharded, with plain-tensor parameters
    run = _Run(model, opt, _Step(model, loss_fn, scaler),
               GradientMonitor(model, activations=activations, updates=updates),
               Clipper(model, max_norm, clip_value, agc, head), scaler, guard, schedule, loss_limit,
               data_parallel_group(model))
    start = time.perf_counter()
    log = run.train(batches, steps, accumulate, progress)
    seconds = time.perf_counter() - start
    monitor, norms = run.monitor, run.monitor.history("grad")
    return History(
        loss=log.losses(), layer_names=list(monitor.names), grad_norms=norms,
        act_grad_norms=monitor.history("act_grad"), update_ratios=monitor.history("update_ratio"),
        seconds=seconds, config=run_config(options, seed, getattr(model, "config", {})),
        grad_norm=log.grad_norm(norms), scale=[float(s) for s in log.scale], events=log.events,
        **_evaluate(model, data, loss_fn, evaluate),
        **log.outcome)


TRAIN_DEFAULTS = {name: p.default for name, p in inspect.signature(train).parameters.items()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY}
