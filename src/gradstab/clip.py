"""Gradient clipping: by value, by global norm (drop-ins for ``torch.nn.utils``) and unit-wise adaptive
gradient clipping (AGC, Brock et al. 2021, arXiv:2102.06171), with the parameters AGC should leave out.

All clipping functions modify ``p.grad`` in place, skip parameters whose ``.grad`` is None and accept
one tensor or an iterable of tensors. ``clip_grad_norm_`` and ``clip_grad_value_`` take torch's arguments
(``foreach`` included), return what torch returns and give the same numbers; they differ only where torch
accepts an argument that has no meaning (a negative ``max_norm``, ``norm_type <= 0``): there they raise a
ValueError before touching any gradient.

DTensor gradients (a model sharded by FSDP2's ``fully_shard``) are clipped as torch clips them: each
shard's norm is partial, the norms are reduced over the ranks, so ``clip_grad_norm_`` returns and uses the
global norm of the whole model (the single-process number), and AGC's unit-wise norms are those of the
whole units. A mix of DTensor and plain gradients (FSDP2 on part of a model) is measured per tensor.
"""

from __future__ import annotations

import math
import types
import warnings
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from ._check import positive_float
from .distributed import full_tensor, is_dtensor

__all__ = [
    "adaptive_clip_grad_",
    "agc_parameters",
    "clip_grad_norm_",
    "clip_grad_value_",
    "output_module",
    "unitwise_norm",
]

TensorOrTensors = Tensor | Iterable[Tensor]
ModuleOrName = nn.Module | str
Exclusion = ModuleOrName | Iterable[ModuleOrName] | None

# Device types with foreach kernels (torch's list for its own clipping; CPU runs them as a C++ loop).
FOREACH_DEVICES = frozenset({"cpu", "cuda", "xpu", "mtia", torch._C._get_privateuse1_backend_name()})


# --------------------------------------------------------------------------------------- argument checks


def _nonnegative(name: str, value) -> float:
    """``value`` as a float if it is a number >= 0; ``inf`` is allowed and means "no clipping"."""
    try:
        x = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        x = math.nan
    if not x >= 0:  # also catches NaN
        raise ValueError(f"{name} must be a number >= 0 (inf: no clipping), got {value!r}")
    return x


def _norm_order(norm_type) -> float:
    """``p`` of the p-norm as a float: a number > 0, or inf (``float('inf')`` or ``'inf'``)."""
    try:
        p = float(norm_type) if not isinstance(norm_type, bool) else math.nan
    except (TypeError, ValueError):
        p = math.nan
    if not p > 0:  # 0, negatives, -inf and NaN are not norms
        raise ValueError(f"norm_type must be a number > 0 or inf (float('inf') or 'inf'), got {norm_type!r}")
    return p


def _flag(name: str, value, allow_none: bool = False) -> bool | None:
    if isinstance(value, bool) or (allow_none and value is None):
        return value
    allowed = "True, False or None" if allow_none else "True or False"
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


# ------------------------------------------------------------------------------------- gradient groups


def _tensor_list(tensors: TensorOrTensors) -> list[Tensor]:
    return [tensors] if isinstance(tensors, Tensor) else list(tensors)


def _grads(parameters: list[Tensor]) -> list[Tensor]:
    return [p.grad for p in parameters if p.grad is not None]


def _use_foreach(foreach: bool | None, device: torch.device, tensors: list[Tensor]) -> bool:
    """torch's rule for the fused path. ``None``: foreach where the device has foreach kernels and every
    tensor is a plain ``torch.Tensor`` (subclasses such as DTensor take the per-tensor loop); ``True``:
    foreach, RuntimeError on a device without it; ``False``: the per-tensor loop."""
    supported = device.type in FOREACH_DEVICES and not torch.jit.is_scripting()
    if foreach is None:
        return supported and all(type(t) is Tensor for t in tensors)
    if foreach and not supported:
        raise RuntimeError(f"foreach=True was passed, but {device.type} tensors have no foreach kernels")
    return foreach


def _groups(grads: list[Tensor], foreach: bool | None) -> list[tuple[list[Tensor], bool]]:
    """The gradients grouped by (device, dtype), as foreach kernels need, each with "use foreach?"."""
    by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        by_key.setdefault((g.device, g.dtype), []).append(g)
    return [(group, _use_foreach(foreach, device, group)) for (device, _), group in by_key.items()]


def _norms(group: list[Tensor], p: float, fast: bool) -> Tensor:
    """``(||g_1||_p, ..., ||g_k||_p)`` of one group, shape (k,), on the group's device and dtype."""
    norms = torch._foreach_norm(group, p) if fast else [torch.linalg.vector_norm(g, p) for g in group]
    if len({is_dtensor(n) for n in norms}) > 1:  # DTensor norms beside plain ones (FSDP2 on part of a model)
        norms = [full_tensor(n) for n in norms]
    return torch.stack(norms)


def _scale_(group: list[Tensor], coef: Tensor, fast: bool) -> None:
    coef = coef.to(group[0].device)
    if is_dtensor(coef) and not all(is_dtensor(g) for g in group):
        coef = coef.full_tensor()  # a plain gradient cannot be multiplied by a DTensor
    if fast:
        torch._foreach_mul_(group, coef)
    else:
        for g in group:
            g.mul_(coef)


# ------------------------------------------------------------------------------------------- clipping


@torch.no_grad()
def clip_grad_value_(parameters: TensorOrTensors, clip_value: float, foreach: bool | None = None) -> None:
    """Clamp every gradient element into ``[-clip_value, clip_value]``, in place (as
    ``torch.nn.utils.clip_grad_value_``)::

        g <- min(max(g, -clip_value), clip_value)

    Args: ``parameters``, a tensor or an iterable of tensors (any float dtype and device; those without
    ``.grad`` are skipped); ``clip_value``, a number >= 0 in the gradients' units (0 zeroes them, inf leaves
    them as they are; NaN elements stay NaN); ``foreach``, see :func:`clip_grad_norm_`.

    Raises: ValueError for a negative or NaN ``clip_value`` (torch accepts them and returns garbage) or a
    ``foreach`` that is not a bool or None, before any change; RuntimeError for ``foreach=True`` on a device
    without foreach kernels, as torch does.
    """
    clip_value = _nonnegative("clip_value", clip_value)
    foreach = _flag("foreach", foreach, allow_none=True)
    for group, fast in _groups(_grads(_tensor_list(parameters)), foreach):
        if fast:
            torch._foreach_clamp_min_(group, -clip_value)
            torch._foreach_clamp_max_(group, clip_value)
        else:
            for g in group:
                g.clamp_(min=-clip_value, max=clip_value)


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """Rescale all gradients together so that their global p-norm is at most ``max_norm`` (as
    ``torch.nn.utils.clip_grad_norm_``)::

        total = || (||g_1||_p, ..., ||g_k||_p) ||_p      # the p-norm of all gradients as one vector
        g    <- g * min(max_norm / (total + 1e-6), 1)

    Always multiplies (no ``if total > max_norm`` branch), so no host sync: a NaN total spreads NaN to
    every gradient and an inf total zeroes the finite ones, exactly as in torch.

    Args:
        parameters: a tensor or an iterable of tensors; those without ``.grad`` are skipped. An empty
            *generator* warns (UserWarning), as in torch; an empty list does not.
        max_norm: a number >= 0 in the gradients' units (0 zeroes them; inf never clips).
        norm_type: p, any number > 0 or inf (``float('inf')`` or ``'inf'``).
        error_if_nonfinite: if True, raise RuntimeError (one host sync) when ``total`` is NaN or inf,
            leaving the gradients unchanged.
        foreach: None (default) uses the grouped foreach kernels (``torch._foreach_norm`` /
            ``torch._foreach_mul_`` per device and dtype) where the device has them and every gradient is
            a plain tensor, else a per-tensor loop; True forces them; False forces the loop.

    Returns: ``total`` before clipping, a 0-dim tensor on the first gradient's device, in the dtype the
    per-tensor norms promote to (float16 for all-float16 gradients, as torch); ``tensor(0.)`` without
    gradients.

    Raises: ValueError (before any change) for a negative or NaN ``max_norm``, a ``norm_type`` that is not
    > 0, a non-bool ``error_if_nonfinite`` or ``foreach``; RuntimeError for a non-finite ``total`` with
    ``error_if_nonfinite=True`` and for ``foreach=True`` on a device without foreach kernels (torch's errors).
    """
    max_norm = _nonnegative("max_norm", max_norm)
    p = _norm_order(norm_type)
    error_if_nonfinite = _flag("error_if_nonfinite", error_if_nonfinite)
    foreach = _flag("foreach", foreach, allow_none=True)
    params = _tensor_list(parameters)
    if not params and isinstance(parameters, types.GeneratorType):
        # stacklevel 3: this function's caller, past torch.no_grad's wrapper
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    grads = _grads(params)
    if not grads:
        return torch.tensor(0.0)

    groups = _groups(grads, foreach)
    device = grads[0].device
    total = torch.linalg.vector_norm(torch.cat([_norms(g, p, fast).to(device) for g, fast in groups]), p)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {p} of the gradients is non-finite ({total.item()}), so it cannot be "
            "clipped. Pass error_if_nonfinite=False to scale the gradients by the non-finite norm anyway."
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for group, fast in groups:
        _scale_(group, coef, fast)
    return total


# ------------------------------------------------------------------------------------------------- AGC


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
    """Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021, NFNets, arXiv:2102.06171).

    For each unit i (see :func:`unitwise_norm`), with ``W*_i = max(||W_i||, eps)``::

        if ||G_i|| > clip_factor * W*_i:  G_i <- clip_factor * W*_i / ||G_i|| * G_i

    ``clip_factor`` (lambda, > 0) and ``eps`` (> 0) are dimensionless ratios; ValueError otherwise.
    The paper does *not* clip the final classifier layer; build the parameter list with
    :func:`agc_parameters` and its ``exclude`` argument to follow that advice.
    """
    clip_factor = positive_float("clip_factor", clip_factor)
    eps = positive_float("eps", eps)
    for p in _tensor_list(parameters):
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p.detach()).clamp(min=eps) * clip_factor
        grad_norm = unitwise_norm(p.grad)
        # grad_norm > max_norm > 0 wherever the scale is used, so the clamp only guards 0/0.
        scale = max_norm / grad_norm.clamp(min=torch.finfo(grad_norm.dtype).tiny)
        p.grad.copy_(torch.where(grad_norm > max_norm, p.grad * scale, p.grad))


def _short(value) -> str:
    """A value for an error message: a tensor by its shape and dtype, not its entries."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} ({value.dtype})"
    return repr(value)


def _excluded_modules(model: nn.Module, exclude) -> list[nn.Module]:
    if exclude is None:
        return []
    items = [exclude] if isinstance(exclude, ModuleOrName) else exclude
    try:
        if isinstance(items, Tensor):  # e.g. an example input passed where output_module(model, x) was meant
            raise TypeError
        items = list(items)
    except TypeError:
        raise ValueError(f"exclude must be a module, a module name or an iterable of them, got {_short(exclude)}"
                         ) from None
    names = dict(model.named_modules())
    modules = []
    for item in items:
        if isinstance(item, str) and item in names:
            modules.append(names[item])
        elif isinstance(item, nn.Module) and any(m is item for m in names.values()):
            modules.append(item)
        else:
            children = ", ".join(repr(n) for n, _ in model.named_children())
            raise ValueError(
                f"exclude must name modules of the model (qualified names as in model.named_modules(), e.g. "
                f"{children or 'none: the model has no submodules'}) or be such modules; got {_short(item)}"
            )
    return modules


def agc_parameters(model: nn.Module, exclude: Exclusion = None) -> list[nn.Parameter]:
    """Parameters to pass to :func:`adaptive_clip_grad_`: every parameter of ``model`` (shared ones once,
    in ``model.parameters()`` order) except those of the ``exclude`` modules.

    ``exclude``: None (clip everything), a module of ``model``, its qualified name as in
    ``model.named_modules()`` (``"head"``, ``"blocks.3.conv"``), or an iterable of either. All parameters of
    an excluded module, those of its submodules included, are left out, and so is a parameter tied to one.

    The paper (Brock et al. 2021, section 4) leaves the final classifier unclipped. Nothing is left out
    by default, because the classifier cannot be told from declaration order; name it, or find it from a
    forward pass::

        agc_parameters(model, exclude="head")                             # gs.cnn / gs.mlp
        agc_parameters(model, exclude=output_module(model, x_example))   # any model

    Raises ValueError when ``exclude`` is not one of the above or names a module the model does not have.
    """
    excluded = {id(p) for m in _excluded_modules(model, exclude) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in excluded]


def _tensors(value) -> Iterator[Tensor]:
    """The tensors in a (nested) tuple, list or dict output, in order."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _forward_outputs(model: nn.Module, candidates, example_inputs) -> tuple[Tensor | None, list]:
    """Run ``model(*example_inputs)`` once; return its first output tensor and, in the order the forwards
    finished, ``(name, weak references to its output tensors)`` for every candidate module call."""
    finished: list[tuple[str, list[weakref.ref]]] = []

    def recorder(name: str):
        def hook(module, args, output):
            finished.append((name, [weakref.ref(t) for t in _tensors(output)]))
        return hook

    handles = [m.register_forward_hook(recorder(name)) for name, m in candidates]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():  # torch's inference fast paths, which skip submodules, turn off under hooks
            output = next(_tensors(model(*example_inputs)), None)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.training = training
    return output, finished


def output_module(model: nn.Module, *example_inputs) -> str:
    """Qualified name (as in ``model.named_modules()``) of the module that produces ``model``'s output,
    found from one forward pass with forward hooks; pass it to :func:`agc_parameters` as ``exclude``.

    Candidates are the submodules that own parameters directly (Linear, Conv, LSTM, LayerNorm, attention...):
    a parameter-free module such as Softmax or Dropout cannot be the classifier AGC should leave out. The
    answer is the last candidate to finish a forward whose output tensor *is* the model's output (its first
    tensor when it returns a tuple, list or dict); if none is, e.g. the model post-processes the output
    (``head(x).squeeze(1)``, ``head(x) * scale``), it is the last candidate whose forward finished.

    The pass runs in eval mode (no running-statistics update, no dropout) under ``torch.no_grad()``, then
    restores every module's training flag and removes its hooks (also when the forward raises).
    ``example_inputs``: positional inputs for ``model``, e.g. one batch. Raises ValueError when ``model``
    is not an ``nn.Module``, its output holds no tensor, or no submodule owning parameters ran.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    candidates = [(n, m) for n, m in model.named_modules() if n and next(m.parameters(recurse=False), None) is not None]
    output, finished = _forward_outputs(model, candidates, example_inputs)
    if output is None:
        raise ValueError("model's output holds no tensor, so no module produces it")
    if not finished:
        raise ValueError("the forward pass ran no submodule that owns parameters")
    for name, refs in reversed(finished):
        if any(ref() is output for ref in refs):
            return name
    return finished[-1][0]
