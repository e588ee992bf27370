"""Mixed-precision training: ``torch.autocast`` plus a ``GradScaler``, unscaling before clipping.

float16 has a 5-bit exponent: values above 65504 overflow to inf and gradients below about
6e-8 underflow to 0. Loss scaling (Micikevicius et al. 2018) multiplies the loss by S before
``backward`` so small gradients survive, divides the gradients by S before the update, skips
any step whose gradients came out inf/NaN and halves S; after ``growth_interval`` clean steps
it doubles S again. bfloat16 keeps float32's 8-bit exponent and needs no scaling.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ._check import one_of, positive_float, positive_int
from .data import Split, batches
from .device import resolve_seed, seed_everything
from .train import accuracy, make_optimizer

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def autocast_dtype(device) -> str:
    """The usual autocast type for ``device``: ``"float16"`` on CUDA, ``"bfloat16"`` elsewhere."""
    return "float16" if torch.device(device).type == "cuda" else "bfloat16"


@dataclass
class AmpHistory:
    """What an :func:`amp_train` run did, one entry per step."""

    loss: list[float]
    scale: list[float]  # loss scale S in force during the step
    grad_norm: list[float]  # global gradient norm the clipper saw (scaled if not unscaled first)
    skipped: list[int]  # steps whose update the scaler skipped (inf/NaN gradients)
    test_accuracy: float = float("nan")
    seconds: float = 0.0
    config: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{len(self.loss)} steps, {len(self.skipped)} skipped, final scale {self.scale[-1]:g}, "
                f"final loss {self.loss[-1]:.3f}, test accuracy {self.test_accuracy:.1%}")


def _global_norm(model: nn.Module) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def amp_train(model: nn.Module, data: Split, *, lr: float, steps: int = 150, batch_size: int = 64,
              dtype: str | None = None, optimizer: str = "sgd", momentum: float = 0.9,
              max_norm: float | None = None, unscale_before_clip: bool = True, loss_scaling: bool = True,
              init_scale: float = 2.0**16, growth_interval: int = 2000, seed: int | None = None) -> AmpHistory:
    """Train with autocast in ``dtype`` (default :func:`autocast_dtype` of the data's device) and a GradScaler.

    The step is the documented recipe: ``scaler.scale(loss).backward()``, ``scaler.unscale_(opt)``,
    clip, ``scaler.step(opt)``, ``scaler.update()``. ``unscale_before_clip=False`` reproduces the
    classic bug of clipping the *scaled* gradients. ``loss_scaling=False`` turns the scaler off.
    Unlike :func:`~gradstab.train.train`, a non-finite step does not stop the run: the scaler skips it.
    """
    dtype = autocast_dtype(data.device) if dtype is None else one_of("dtype", dtype, tuple(DTYPES))
    positive_float("lr", lr)
    positive_int("steps", steps)
    positive_int("batch_size", batch_size)
    positive_float("init_scale", init_scale)
    positive_int("growth_interval", growth_interval)
    if max_norm is not None:
        positive_float("max_norm", max_norm)
    seed = resolve_seed(seed)
    seed_everything(seed)
    device = data.device
    model.to(device).train()
    opt = make_optimizer(model.parameters(), optimizer, lr, momentum, 0.0)
    scaler = torch.amp.GradScaler(device.type, init_scale=init_scale, growth_interval=growth_interval,
                                  enabled=loss_scaling)
    hist = AmpHistory([], [], [], [], config=dict(lr=lr, steps=steps, batch_size=batch_size, dtype=dtype,
                                                   max_norm=max_norm, unscale_before_clip=unscale_before_clip,
                                                   loss_scaling=loss_scaling, init_scale=init_scale, seed=seed))
    start = time.perf_counter()
    for step, idx in enumerate(batches(len(data.y_train), min(batch_size, len(data.y_train)), steps, seed)):
        idx = idx.to(device)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=DTYPES[dtype]):
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        scale = scaler.get_scale() if loss_scaling else 1.0
        scaler.scale(loss).backward()
        if unscale_before_clip:
            scaler.unscale_(opt)
        hist.grad_norm.append(float(_global_norm(model)))
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        scaler.step(opt)
        scaler.update()
        hist.loss.append(float(loss.detach()))
        hist.scale.append(scale)
        if loss_scaling and scaler.get_scale() < scale:
            hist.skipped.append(step)
    hist.seconds = time.perf_counter() - start
    hist.test_accuracy = accuracy(model, data.x_test, data.y_test)
    return hist


def fp16_underflow(tensors, scale: float = 1.0) -> float:
    """Fraction of the non-zero entries of ``tensors`` that become 0 when ``scale * x`` is cast to float16."""
    positive_float("scale", scale)
    values = torch.cat([t.detach().flatten().float() for t in tensors])
    nonzero = values[values != 0]
    if not nonzero.numel():
        return 0.0
    return float(((nonzero * scale).half() == 0).float().mean())
