"""One training loop for every chapter: seeded, device-agnostic, stops cleanly on divergence."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ._check import one_of, positive_float, positive_int
from .data import Split, batches
from .device import resolve_seed, seed_everything
from .monitor import GradientMonitor
from .norm import _BatchNorm as _ScratchBatchNorm

OPTIMIZERS = ("sgd", "adam")


@dataclass
class History:
    """What a run did. ``grad_norms`` etc. are (steps, layers) tensors, one row per step taken."""

    loss: list[float]
    layer_names: list[str]
    grad_norms: torch.Tensor
    act_grad_norms: torch.Tensor
    update_ratios: torch.Tensor
    diverged: bool = False
    diverged_step: int | None = None
    diverged_layer: str | None = None
    reason: str = ""
    test_accuracy: float = float("nan")
    train_accuracy: float = float("nan")
    seconds: float = 0.0
    config: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.loss)

    @property
    def max_grad_norm(self) -> float:
        """Largest finite per-layer gradient norm seen (nan if none was finite)."""
        finite = self.grad_norms[torch.isfinite(self.grad_norms)]
        return float(finite.max()) if finite.numel() else float("nan")

    def summary(self) -> str:
        if self.diverged:
            return f"diverged at step {self.diverged_step} in layer {self.diverged_layer} ({self.reason})"
        return f"{self.steps} steps, final loss {self.loss[-1]:.3f}, test accuracy {self.test_accuracy:.1%}"


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
    one_of("optimizer", name, OPTIMIZERS)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _clip(model: nn.Module, max_norm, clip_value, agc) -> None:
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if clip_value is not None:
        from .clip import clip_grad_value_

        clip_grad_value_(model.parameters(), clip_value)
    if agc is not None:
        from .clip import adaptive_clip_grad_, agc_parameters

        adaptive_clip_grad_(agc_parameters(model), clip_factor=agc)


def _check_args(model, lr, steps, batch_size, momentum, weight_decay, max_norm, clip_value, agc, warmup,
                loss_limit):
    positive_float("lr", lr)
    positive_int("steps", steps)
    positive_int("batch_size", batch_size, minimum=1)
    positive_float("momentum", momentum, allow_zero=True)
    positive_float("weight_decay", weight_decay, allow_zero=True)
    positive_int("warmup", warmup, minimum=0)
    if not loss_limit > 0:
        raise ValueError(f"loss_limit must be > 0 (math.inf to stop only on non-finite values), got {loss_limit!r}")
    for name, value in (("max_norm", max_norm), ("clip_value", clip_value), ("agc", agc)):
        if value is not None:
            positive_float(name, value)
    has_bn = any(isinstance(m, (nn.modules.batchnorm._BatchNorm, _ScratchBatchNorm)) for m in model.modules())
    if has_bn and batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for a model with BatchNorm in training, got {batch_size}")


def train(model: nn.Module, data: Split, *, lr: float, steps: int = 150, batch_size: int = 64,
          optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 0.0,
          max_norm: float | None = None, clip_value: float | None = None, agc: float | None = None,
          warmup: int = 0, seed: int | None = None, activations: bool = False, updates: bool = False,
          loss_limit: float = math.inf, progress: bool = False, evaluate: bool = True) -> History:
    """Train ``model`` on ``data`` with cross-entropy for ``steps`` minibatch steps.

    Remedies: ``max_norm`` (clip by global norm), ``clip_value`` (clip by value), ``agc``
    (adaptive clipping factor), ``weight_decay`` (L2 through the optimizer), ``warmup``
    (linear learning-rate warmup over that many steps). The run stops, without raising,
    at the first step whose loss or any layer's gradient is non-finite (or whose loss
    exceeds ``loss_limit``, if given); the history says which step and which layer.
    ``evaluate=False`` skips the final train/test accuracy (left as nan). The model is
    moved to ``data``'s device; the same ``seed`` gives the same history on CPU
    (``None``: :func:`~gradstab.device.base_seed`).
    """
    _check_args(model, lr, steps, batch_size, momentum, weight_decay, max_norm, clip_value, agc, warmup,
                loss_limit)
    one_of("optimizer", optimizer, OPTIMIZERS)
    seed = resolve_seed(seed)
    seed_everything(seed)
    model.to(data.device).train()
    opt = make_optimizer(model.parameters(), optimizer, lr, momentum, weight_decay)
    monitor = GradientMonitor(model, activations=activations, updates=updates)
    losses, outcome, previous = [], {}, None
    order = batches(len(data.y_train), min(batch_size, len(data.y_train)), steps, seed)
    if progress:
        from tqdm.auto import tqdm

        order = tqdm(order, total=steps, desc="training", leave=False)
    start = time.perf_counter()
    with monitor:
        for step, idx in enumerate(order):
            idx = idx.to(data.device)
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            norms = monitor.record()
            losses.append(loss.detach())
            ok = torch.isfinite(norms).all() & torch.isfinite(loss) & (loss <= loss_limit)
            if not bool(ok):  # the one host sync per step
                outcome = _diagnose(step, float(loss.detach()), norms, previous, monitor, loss_limit)
                break
            previous = norms
            _clip(model, max_norm, clip_value, agc)
            monitor.before_step()
            opt.step()
            monitor.after_step()
    seconds = time.perf_counter() - start
    return History(
        loss=[float(v) for v in losses], layer_names=monitor.names, grad_norms=monitor.history("grad"),
        act_grad_norms=monitor.history("act_grad"), update_ratios=monitor.history("update_ratio"),
        test_accuracy=accuracy(model, data.x_test, data.y_test) if evaluate else math.nan,
        train_accuracy=accuracy(model, data.x_train, data.y_train) if evaluate else math.nan, seconds=seconds,
        config=dict(lr=lr, steps=steps, batch_size=batch_size, optimizer=optimizer, momentum=momentum,
                    weight_decay=weight_decay, max_norm=max_norm, clip_value=clip_value, agc=agc,
                    warmup=warmup, seed=seed, **getattr(model, "config", {})),
        **outcome,
    )


def _diagnose(step: int, loss: float, norms: torch.Tensor, previous: torch.Tensor | None,
              monitor: GradientMonitor, loss_limit: float) -> dict:
    """Say where a run broke.

    If the loss itself is non-finite every gradient is, so the culprit is the layer whose
    gradient was largest one step earlier; if only some gradients are non-finite, the first
    such layer in model order; if the loss merely crossed ``loss_limit``, the largest gradient.
    """
    if not math.isfinite(loss):
        reason = f"loss became {loss}"
        layer = monitor.first_nonfinite(norms) if previous is None else monitor.names[int(previous.argmax())]
    elif not torch.isfinite(norms).all():
        reason, layer = "gradient became non-finite", monitor.first_nonfinite(norms)
    else:
        reason, layer = f"loss {loss:.3g} exceeded loss_limit={loss_limit:g}", monitor.names[int(norms.argmax())]
    return dict(diverged=True, diverged_step=step, diverged_layer=layer, reason=reason)
