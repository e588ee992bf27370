"""Helpers for the held-out suite, written from the shared contracts only (not from the implementation).

The grouping oracle is :func:`gradstab.monitor.parameter_groups`, the contract every other part names its
layers and parameters by; the numbers are checked against PyTorch's own (``torch.nn.utils.get_total_norm``).
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from gradstab.monitor import parameter_groups


class NanGradient:
    """Forward hook on the root model that adds ``where(False, sqrt(-1 - |p|), 0).sum()`` to its output.

    The term is 0 in the forward pass, so the loss stays finite, but the untaken ``sqrt`` branch makes the
    gradient of parameter ``p`` all-NaN (pytorch/pytorch#68425). The parameter is looked up by name at each
    call, so the hook keeps working on a deep copy of the model.
    """

    def __init__(self, name: str):
        self.name = name

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        p = module.get_parameter(self.name)
        never = torch.zeros((), dtype=torch.bool, device=p.device)
        return output + torch.where(never, torch.sqrt(-1.0 - p.abs()), 0.0).sum().to(output.dtype)


def inject_nan(model: nn.Module, name: str):
    """Make the gradient of ``model.get_parameter(name)`` NaN while leaving the loss finite."""
    return model.register_forward_hook(NanGradient(name))


def owner_of(model: nn.Module, param: torch.Tensor) -> tuple[str, str]:
    """``(group, qualified parameter name)`` under which the contract reports ``param``."""
    for group, members in parameter_groups(model):
        for name, p in members:
            if p is param:
                return group, name
    raise AssertionError("parameter not in parameter_groups(model)")


def group_names(model: nn.Module) -> list[str]:
    return [group for group, _ in parameter_groups(model)]


def expected_group_norms(model: nn.Module) -> torch.Tensor:
    """Per-group sqrt(sum of squared gradient norms) from the ``.grad`` now stored; NaN for a group with none."""
    rows = []
    for _, members in parameter_groups(model):
        grads = [p.grad for _, p in members if p.grad is not None]
        rows.append(torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(math.nan))
    return torch.stack(rows).float()


def total_grad_norm(model: nn.Module) -> torch.Tensor:
    """PyTorch's global 2-norm over the gradients of every parameter (``model.parameters()`` lists tied ones once)."""
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True))


def mentions(text: str, name: str) -> bool:
    """Whether ``name`` occurs in ``text`` as a whole dotted name (not as part of a longer one)."""
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w|\.\w)", text) is not None
