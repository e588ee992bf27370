"""Regularizers: L2/L1 penalties, decoupled weight decay and inverted dropout."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ._check import positive_float

__all__ = ["Dropout", "decay_parameters", "decoupled_weight_decay_", "l1_penalty", "l2_penalty"]

TensorOrTensors = Tensor | Iterable[Tensor]


def _as_list(parameters: TensorOrTensors) -> list[Tensor]:
    if isinstance(parameters, Tensor):
        return [parameters]
    return list(parameters)


def l2_penalty(parameters: TensorOrTensors, weight_decay: float) -> Tensor:
    """``weight_decay / 2 * sum_p ||p||^2``.

    Its gradient is ``weight_decay * p``, so adding it to the loss reproduces
    ``torch.optim.SGD(weight_decay=weight_decay)``.
    """
    weight_decay = positive_float("weight_decay", weight_decay, allow_zero=True)
    params = _as_list(parameters)
    if not params:
        return torch.tensor(0.0)
    return 0.5 * weight_decay * sum(p.pow(2).sum() for p in params)


def l1_penalty(parameters: TensorOrTensors, strength: float) -> Tensor:
    """``strength * sum_p sum_j |p_j|``; gradient ``strength * sign(p)``."""
    strength = positive_float("strength", strength, allow_zero=True)
    params = _as_list(parameters)
    if not params:
        return torch.tensor(0.0)
    return strength * sum(p.abs().sum() for p in params)


@torch.no_grad()
def decoupled_weight_decay_(parameters: TensorOrTensors, lr: float, weight_decay: float) -> None:
    """In place ``p <- p * (1 - lr * weight_decay)`` for every parameter that has a ``.grad``
    (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", arXiv:1711.05101).

    Calling this before an ``Adam(weight_decay=0)`` step equals one ``AdamW`` step, which also leaves a
    parameter without a gradient (frozen, or unused this step) untouched. ``lr`` >= 0 (0, e.g. the first
    step of a warmup, decays nothing) and ``weight_decay`` >= 0 are plain numbers; ValueError otherwise,
    before any change.
    """
    lr = positive_float("lr", lr, allow_zero=True)
    weight_decay = positive_float("weight_decay", weight_decay, allow_zero=True)
    factor = 1.0 - lr * weight_decay
    for p in _as_list(parameters):
        if p.grad is not None:
            p.mul_(factor)


class Dropout(nn.Module):
    """Inverted dropout, a drop-in for ``torch.nn.Dropout(p, inplace)`` (Srivastava et al. 2014, JMLR 15).

    In training, ``y = x * mask / (1 - p)`` with ``mask ~ Bernoulli(1 - p)`` per element, so ``E[y] = x``;
    the mask is drawn and scaled as torch does on the CPU, so with the same seed the output is torch's,
    bit for bit. ``p = 1`` gives ``x * 0`` (NaN and inf become NaN, as in torch); in eval mode or with
    ``p = 0`` the input itself is returned. Any shape and float dtype; ``inplace=True`` overwrites ``x``.
    ValueError unless ``0 <= p <= 1``.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        self.p = float(p)
        self.inplace = bool(inplace)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.numel() == 0:
            return x
        if self.p == 1.0:
            noise = torch.zeros_like(x)
        else:
            keep = 1.0 - self.p
            noise = torch.empty_like(x).bernoulli_(keep).div_(keep)
        return x.mul_(noise) if self.inplace else x * noise

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"


def decay_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split ``model.parameters()`` into ``(decay, no_decay)``.

    ``decay``: tensors with ``ndim >= 2`` (Linear / conv weights); ``no_decay``: the rest
    (biases, norm gains/shifts). Typical use::

        decay, no_decay = decay_parameters(model)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=1e-3)
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return decay, no_decay
