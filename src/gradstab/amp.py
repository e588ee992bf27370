"""Mixed-precision training: ``torch.autocast`` plus a ``GradScaler``, unscaling before clipping.

float16 has a 5-bit exponent: values above 65504 overflow to inf and gradients below about
6e-8 underflow to 0. Loss scaling (Micikevicius et al. 2018) multiplies the loss by S before
``backward`` so small gradients survive, divides the gradients by S before the update, skips
any step whose gradients came out inf/NaN and halves S; after ``growth_interval`` clean steps
it doubles S again. bfloat16 keeps float32's 8-bit exponent and needs no scaling.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from ._check import one_of, positive_float, positive_int

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def __getattr__(name: str):
    """``AmpHistory``, the result type of :func:`amp_train`, is :class:`~gradstab.train.History`."""
    if name == "AmpHistory":
        from .train import History

        return History
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def autocast_dtype(device) -> str:
    """The usual autocast type for ``device``: ``"float16"`` on CUDA, ``"bfloat16"`` elsewhere."""
    return "float16" if torch.device(device).type == "cuda" else "bfloat16"


class LossScaler:
    """Autocast and loss scaling as one piece of the training loop (``dtype`` None: plain steps).

    The step is the documented recipe: ``scaler.scale(loss).backward()``, ``scaler.unscale_(opt)``
    (before the gradients are measured and clipped, unless ``unscale_first=False``), clip,
    ``scaler.step(opt)``, ``scaler.update()``. ``loss_scaling`` (default: on for float16, off for
    bfloat16) turns the GradScaler on, with ``init_scale`` and ``growth_interval``.
    Raises ValueError for an unknown ``dtype`` or bad scaler settings.
    """

    def __init__(self, dtype: str | None, device: torch.device, loss_scaling: bool | None = None,
                 init_scale: float = 2.0**16, growth_interval: int = 2000, unscale_first: bool = True):
        positive_float("init_scale", init_scale)
        positive_int("growth_interval", growth_interval)
        if dtype is None and loss_scaling:
            raise ValueError("loss_scaling needs amp='float16' or amp='bfloat16'")
        self.dtype = None if dtype is None else DTYPES[one_of("amp", dtype, tuple(DTYPES))]
        self.device_type, self.unscale_first = torch.device(device).type, bool(unscale_first)
        on = dtype == "float16" if loss_scaling is None else bool(loss_scaling)
        self._scaler = torch.amp.GradScaler(self.device_type, init_scale=init_scale,
                                            growth_interval=growth_interval) if on else None

    @property
    def enabled(self) -> bool:
        """Whether a GradScaler scales the loss (and so skips steps with inf/NaN gradients itself)."""
        return self._scaler is not None

    @property
    def scale(self) -> float:
        """The loss scale S in force now (1.0 without scaling; one host sync with it)."""
        return self._scaler.get_scale() if self.enabled else 1.0

    def autocast(self):
        """The context of the forward pass: ``torch.autocast`` to ``dtype``, or nothing without one."""
        return nullcontext() if self.dtype is None else torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, of the scaled loss S * loss with loss scaling."""
        (self._scaler.scale(loss) if self.enabled else loss).backward()

    def unscale(self, opt: torch.optim.Optimizer) -> None:
        """Divide the gradients by S now (so that they are measured and clipped unscaled)."""
        if self.enabled and self.unscale_first:
            self._scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer, before: float) -> bool:
        """The optimizer step; False if the scaler skipped it (inf/NaN gradients, and lowered S below
        ``before``, the scale :attr:`scale` read for this step)."""
        if not self.enabled:
            opt.step()
            return True
        self._scaler.step(opt)
        self._scaler.update()
        return not self._scaler.get_scale() < before


def amp_train(model: nn.Module, data, *, lr: float | None = None, dtype: str | None = None,
              loss_scaling: bool = True, **options):
    """:func:`~gradstab.train.train` with autocast in ``dtype`` (default :func:`autocast_dtype` of the
    data's device) and, unless ``loss_scaling=False``, a GradScaler (``init_scale``, ``growth_interval``).

    ``unscale_before_clip=False`` reproduces the classic bug of clipping the *scaled* gradients
    (``max_norm``). With loss scaling, a step with inf/NaN gradients does not stop the run: the scaler
    skips it and halves the scale (without it, such a step stops the run, as in ``train``). Returns a
    :class:`~gradstab.train.History` whose ``scale`` is the loss scale S in force at each step,
    ``grad_norm`` the global norm the clipper saw, and ``skipped`` the skipped steps.
    """
    from .data import Split
    from .train import train

    if dtype is None:
        dtype = autocast_dtype(data.device if isinstance(data, Split) else next(model.parameters()).device)
    one_of("dtype", dtype, tuple(DTYPES))
    return train(model, data, lr=lr, amp=dtype, loss_scaling=loss_scaling, **options)


def fp16_underflow(tensors, scale: float = 1.0) -> float:
    """Fraction of the non-zero entries of ``tensors`` that become 0 when ``scale * x`` is cast to float16."""
    positive_float("scale", scale)
    values = torch.cat([t.detach().flatten().float() for t in tensors])
    nonzero = values[values != 0]
    if not nonzero.numel():
        return 0.0
    return float(((nonzero * scale).half() == 0).float().mean())
