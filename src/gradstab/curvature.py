"""The curvature of the loss: Hessian-vector products and the sharpness (the Hessian's largest eigenvalue).

Gradient descent with step size ``lr`` on a quadratic converges only if ``lr < 2 / sharpness``; on a network,
full-batch gradient descent drives the sharpness up to about ``2 / lr`` and keeps it there (the *edge of
stability*, Cohen et al. 2021). :func:`sharpness` measures it with power iteration on Hessian-vector products
(:func:`hessian_vector_product`), computed by double backward (Pearlmutter 1994) with PyTorch's autograd: the
Hessian is never formed, so a model with n parameters costs O(n) memory and about two backward passes per
iteration. Pass the previous result's ``vector`` back in as ``start`` to track the sharpness during training
cheaply (a warm start).

References: B. A. Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 6(1), 1994;
J. Cohen et al., "Gradient descent on neural networks typically occurs at the edge of stability", ICLR 2021.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ._check import positive_float, positive_int
from .device import resolve_seed


@dataclass(frozen=True)
class Sharpness:
    """The result of :func:`sharpness`.

    ``value``: the largest eigenvalue of the Hessian of the loss (units: loss per parameter unit squared; a
    gradient-descent step size above ``2 / value`` makes the quadratic model of the loss diverge).
    ``vector``: its unit eigenvector, flattened over the parameters that require grad, in the order of
    ``model.parameters()`` (1-D, the parameters' dtype and device; pass it back as ``start``).
    ``iterations``: Hessian-vector products used. ``converged``: whether the relative change of the estimate
    fell to ``tol`` within ``iterations``.
    """

    value: float
    vector: torch.Tensor
    iterations: int
    converged: bool

    @property
    def stable_lr(self) -> float:
        """``2 / value``: the largest gradient-descent step size that this curvature tolerates (inf if <= 0)."""
        return 2.0 / self.value if self.value > 0 else math.inf


def _parameters(model) -> list[torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters that require grad, so its loss has no Hessian to measure")
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1 or not params[0].is_floating_point():
        raise ValueError(f"model's trainable parameters must share one floating dtype, got "
                         f"{', '.join(sorted(map(str, dtypes)))}")
    return params


def _check_batch(loss_fn, x, y) -> None:
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable as loss_fn(output, y), got {type(loss_fn).__name__}")
    for value, name in ((x, "x"), (y, "y")):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise ValueError(f"x and y must hold the same number of rows, got shapes {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if len(x) == 0:
        raise ValueError("x holds no examples")


def _check_vector(name: str, v, params: list[torch.Tensor]) -> torch.Tensor:
    n = sum(p.numel() for p in params)
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"{name} must be a 1-D torch.Tensor of {n} values, got {type(v).__name__}")
    if tuple(v.shape) != (n,):
        raise ValueError(f"{name} must be 1-D with one value per trainable parameter ({n}), got shape "
                         f"{tuple(v.shape)}")
    v = v.detach().to(device=params[0].device, dtype=params[0].dtype)
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} must be finite")
    return v


class _Hessian:
    """The gradient of the loss on one batch, kept with its graph, so each Hessian-vector product is one more
    backward pass. Evaluated in the model's current mode; no parameter's ``.grad`` is touched, and buffers that
    the forward pass updates (BatchNorm's running statistics in train mode) are left as they were."""

    def __init__(self, model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor,
                 params: list[torch.Tensor]):
        self.params = params
        copies = {name: b.detach().clone() for name, b in model.named_buffers()}  # the forward pass updates these
        with torch.enable_grad():
            loss = loss_fn(torch.func.functional_call(model, copies, (x,), strict=False), y)
            if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
                raise ValueError(f"loss_fn must return a float tensor, got {type(loss).__name__}")
            loss = loss.mean() if loss.ndim else loss  # per-example losses are averaged, as in gs.train
            if not torch.isfinite(loss):
                raise ValueError(f"the loss on (x, y) is not finite ({float(loss.detach())}); "
                                 f"its curvature is undefined")
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        self.grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        self.loss = float(loss.detach())

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """H @ v for a flat ``v``: d/dtheta (grad . v) by a second backward pass (Pearlmutter 1994)."""
        pieces = torch.split(v, [p.numel() for p in self.params])
        with torch.enable_grad():
            dot = sum((g * u.view_as(g)).sum() for g, u in zip(self.grads, pieces, strict=True))
            if not dot.requires_grad:  # the loss is linear in every parameter: H = 0
                return torch.zeros_like(v)
            hv = torch.autograd.grad(dot, self.params, retain_graph=True, allow_unused=True)
        hv = [torch.zeros_like(p) if h is None else h for p, h in zip(self.params, hv, strict=True)]
        return torch.cat([h.reshape(-1) for h in hv])


def hessian_vector_product(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor,
                           vector: torch.Tensor) -> torch.Tensor:
    """The product H @ vector of the Hessian of ``loss_fn(model(x), y)`` w.r.t. the model's parameters.

    ``vector``: 1-D, one value per parameter that requires grad, flattened in the order of
    ``model.parameters()`` (numel in total); returned in the same layout, dtype and device as the parameters.
    Exact (double backward with autograd, Pearlmutter 1994), not a finite difference. ``loss_fn(output, y)``
    returns a scalar or per-example losses (averaged). The model is evaluated in its current mode (train or
    eval; switch it yourself, e.g. for dropout), which is left as it was; no ``.grad`` is written, and buffers
    the forward pass updates (BatchNorm's running statistics) are left as they were.
    Raises ValueError, naming the argument, for a non-module ``model``, a model without trainable floating
    parameters, a non-callable ``loss_fn``, ``x``/``y`` that are not tensors of equal length, a ``vector`` of
    the wrong shape or with non-finite values, or a non-finite loss.
    """
    params = _parameters(model)
    _check_batch(loss_fn, x, y)
    v = _check_vector("vector", vector, params)
    return _Hessian(model, loss_fn, x, y, params)(v)


def sharpness(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, *,
              start: torch.Tensor | None = None, seed: int | None = None, iterations: int = 100,
              tol: float = 1e-4) -> Sharpness:
    """The largest eigenvalue of the Hessian of ``loss_fn(model(x), y)``, by power iteration on exact
    Hessian-vector products.

    ``model``: any module (its trainable parameters, one floating dtype). ``loss_fn(output, y)``: a scalar or
    per-example losses (averaged), e.g. ``torch.nn.functional.mse_loss``. ``x``, ``y``: one batch (the whole
    training set for full-batch gradient descent), on the model's device. ``start``: the vector to start
    from, e.g. the ``vector`` of an earlier call (a warm start: few iterations when the curvature changed
    little); otherwise a random normal vector drawn with ``seed`` (None:
    :func:`~gradstab.device.base_seed`). The iteration stops when the Rayleigh
    quotient changes by at most ``tol`` (relative) between two iterations, or after ``iterations``.

    Power iteration finds the eigenvalue of largest magnitude; if that one is negative, a second run on the
    shifted Hessian H - value * I finds the largest (algebraic) eigenvalue, so ``value`` is always the top of
    the spectrum. The model is evaluated in its current mode, which is left as it was; no parameter's
    ``.grad`` is touched, and buffers the forward pass updates (BatchNorm's running statistics) are left
    as they were. Cost: one forward and backward pass with graph, then one extra backward pass per
    iteration. In train mode, dropout draws its one mask from the global torch generator. Returns a
    :class:`Sharpness`.

    Raises ValueError, naming the argument, before any work: a non-module ``model`` or one without
    trainable floating parameters, a non-callable ``loss_fn``, ``x``/``y`` not tensors with as many rows,
    ``start`` of the wrong shape, non-finite or zero, a ``seed`` that is not a non-negative integer or
    None, ``iterations`` < 1, ``tol`` not > 0; and if the loss on the batch is not finite.

    References: Pearlmutter (1994), "Fast exact multiplication by the Hessian"; Cohen et al. (2021),
    "Gradient descent on neural networks typically occurs at the edge of stability".
    """
    params = _parameters(model)
    _check_batch(loss_fn, x, y)
    seed = resolve_seed(seed)
    positive_int("iterations", iterations)
    positive_float("tol", tol)
    if start is not None:
        v = _check_vector("start", start, params)
        if not float(v.norm()) > 0:
            raise ValueError("start must not be the zero vector")
    else:
        n = sum(p.numel() for p in params)
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(n, generator=gen, dtype=torch.float64).to(device=params[0].device, dtype=params[0].dtype)
    hvp = _Hessian(model, loss_fn, x, y, params)
    value, v, used, converged = _power(hvp, v, 0.0, iterations, tol)
    if value < 0:  # the most negative eigenvalue dominated: shift it to 0 and look again from a fresh start
        fresh = torch.randn(len(v), generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
        shifted, v2, used2, converged = _power(hvp, fresh.to(v), value, iterations, tol)
        value, v, used = shifted + value, v2, used + used2
    return Sharpness(float(value), v.detach(), used, converged)


def _power(hvp: _Hessian, v: torch.Tensor, shift: float, iterations: int, tol: float):
    """Power iteration on H - shift * I from ``v``: (eigenvalue estimate, unit vector, iterations, converged)."""
    v = v / v.norm()
    value = math.nan
    for i in range(1, iterations + 1):
        hv = hvp(v) - shift * v
        new = float(torch.dot(v, hv))  # Rayleigh quotient of the unit vector v
        norm = hv.norm()
        if not float(norm) > 0:  # v lies in the null space (of the shifted Hessian): its eigenvalue is 0
            return 0.0, v, i, True
        v = hv / norm
        if math.isfinite(value) and abs(new - value) <= tol * abs(new):
            return new, v, i, True
        value = new
    return value, v, iterations, False
