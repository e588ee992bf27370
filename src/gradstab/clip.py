"""Gradient clipping: by value, by global norm (parity with ``torch.nn.utils``) and
unit-wise adaptive gradient clipping (AGC, Brock et al. 2021, arXiv:2102.06171).

All functions modify ``p.grad`` in place and skip parameters whose ``.grad`` is None.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ._check import positive_float

__all__ = ["adaptive_clip_grad_", "agc_parameters", "clip_grad_norm_", "clip_grad_value_", "unitwise_norm"]

TensorOrTensors = Tensor | Iterable[Tensor]


def _as_list(parameters: TensorOrTensors) -> list[Tensor]:
    if isinstance(parameters, Tensor):
        return [parameters]
    return list(parameters)


def _parse_norm_type(norm_type: float | str) -> float:
    if isinstance(norm_type, str) and norm_type.strip().lower() == "inf":
        return math.inf
    if not isinstance(norm_type, bool) and isinstance(norm_type, (int, float)) and norm_type in (1, 2, math.inf):
        return float(norm_type)
    raise ValueError(f"norm_type must be 1, 2 or inf, got {norm_type!r}")


@torch.no_grad()
def clip_grad_value_(parameters: TensorOrTensors, clip_value: float) -> None:
    """Clamp every gradient element into [-clip_value, clip_value], in place:

    ``g <- min(max(g, -clip_value), clip_value)``.
    """
    clip_value = positive_float("clip_value", clip_value)
    for p in _as_list(parameters):
        if p.grad is not None:
            p.grad.clamp_(min=-clip_value, max=clip_value)


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """Rescale all gradients together so that their global norm is at most ``max_norm``.

    ``total = || (||g_1||_p, ..., ||g_k||_p) ||_p`` (the p-norm of all grads as one vector),
    ``g <- g * min(max_norm / (total + 1e-6), 1)``.

    ``norm_type`` is 1, 2 or inf (``float('inf')`` or ``'inf'``). Returns ``total`` measured
    before clipping (``tensor(0.)`` when no parameter has a gradient). A NaN/inf total is
    applied as-is, like torch (NaN spreads to every grad, inf zeroes finite ones), unless
    ``error_if_nonfinite`` is True, in which case a RuntimeError is raised and nothing changes.
    """
    max_norm = positive_float("max_norm", max_norm)
    p_norm = _parse_norm_type(norm_type)
    grads = [p.grad for p in _as_list(parameters) if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)

    device = grads[0].device
    norms = [torch.linalg.vector_norm(g, p_norm).to(device) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms), p_norm)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {p_norm} of the gradients is non-finite ({total.item()}), "
            "so it cannot be clipped. Pass error_if_nonfinite=False to scale the gradients "
            "by the non-finite norm anyway."
        )
    # Always multiply (no `if coef < 1` branch): avoids a host sync, and propagates NaN like torch.
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))
    return total


def unitwise_norm(x: Tensor) -> Tensor:
    """L2 norm per unit, broadcastable against ``x``.

    ndim > 1 (Linear ``(out, in)``, ConvNd ``(out, in, *k)``): one norm per output unit,
    ``||x_i|| = sqrt(sum_{j...} x[i, j...]^2)``, shape ``(out, 1, ..., 1)``.
    ndim <= 1 (biases, gains, scalars): the whole vector is one unit, as in the paper's
    reference implementation (``axis=None`` for scalars and vectors); a 0-dim result.
    """
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


@torch.no_grad()
def adaptive_clip_grad_(parameters: TensorOrTensors, clip_factor: float = 0.01, eps: float = 1e-3) -> None:
    """Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021, NFNets).

    For each unit i (see :func:`unitwise_norm`), with ``W*_i = max(||W_i||, eps)``::

        if ||G_i|| > clip_factor * W*_i:  G_i <- clip_factor * W*_i / ||G_i|| * G_i

    The paper recommends *not* clipping the final classifier layer; build the parameter
    list with :func:`agc_parameters` (``exclude_last=True``) to follow that advice.
    """
    clip_factor = positive_float("clip_factor", clip_factor)
    eps = positive_float("eps", eps)
    for p in _as_list(parameters):
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p.detach()).clamp(min=eps) * clip_factor
        grad_norm = unitwise_norm(p.grad)
        # grad_norm > max_norm > 0 wherever the scale is used, so the clamp only guards 0/0.
        scale = max_norm / grad_norm.clamp(min=torch.finfo(grad_norm.dtype).tiny)
        p.grad.copy_(torch.where(grad_norm > max_norm, p.grad * scale, p.grad))


def agc_parameters(model: nn.Module, exclude_last: bool = True) -> list[nn.Parameter]:
    """Parameters to pass to :func:`adaptive_clip_grad_`.

    With ``exclude_last=True`` the parameters owned by the last ``nn.Linear`` in
    ``model.modules()`` order (normally the classifier head) are left out, as the
    paper advises. Shared parameters are listed once.
    """
    modules = list(model.modules())
    skip: nn.Module | None = None
    if exclude_last:
        linears = [m for m in modules if isinstance(m, nn.Linear)]
        skip = linears[-1] if linears else None
    excluded = {id(p) for p in skip.parameters()} if skip is not None else set()
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for m in modules:
        for p in m.parameters(recurse=False):
            if id(p) in excluded or id(p) in seen:
                continue
            seen.add(id(p))
            params.append(p)
    return params
