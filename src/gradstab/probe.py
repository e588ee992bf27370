"""Measurements at initialization: how a signal's scale changes forward through layers and backward through them.

No training and no optimizer: one batch through a fresh network, one backward pass, and
the root-mean-square (RMS) of what flows at each layer. :mod:`gradstab.theory` gives the
closed-form values these measurements are compared with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .device import resolve_seed
from .monitor import weight_layers


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt())


def growth_per_layer(norms) -> float:
    """Per-layer growth factor of a sequence of norms: exp(slope) of a least-squares line through log(norms).

    1 means flat, 2 doubling per layer, 0.5 halving. The sequence is read in the order given.
    """
    y = torch.as_tensor(norms, dtype=torch.float64).flatten()
    if y.numel() < 2:
        raise ValueError(f"norms must hold at least 2 values, got {y.numel()}")
    if not (torch.isfinite(y).all() and (y > 0).all()):
        raise ValueError("norms must all be finite and > 0 (a log-scale fit needs them)")
    t = torch.arange(y.numel(), dtype=torch.float64)
    t, logs = t - t.mean(), y.log()
    return math.exp(float((t * (logs - logs.mean())).sum() / (t * t).sum()))


@dataclass
class Profile:
    """Per-layer RMS of the forward output and of the loss gradient with respect to that output (model order)."""

    names: list[str]
    forward: torch.Tensor
    backward: torch.Tensor

    @property
    def forward_growth(self) -> float:
        """Per-layer factor of the forward signal, input to output."""
        return growth_per_layer(self.forward)

    @property
    def backward_growth(self) -> float:
        """Per-layer factor of the backward signal in its own direction of travel, output to input."""
        return growth_per_layer(self.backward.flip(0))


def signal_profile(model: nn.Module, x: torch.Tensor, layers: list[nn.Module] | None = None,
                   seed: int | None = None) -> Profile:
    """Send one batch ``x`` forward and one gradient backward; return the RMS at each layer's output.

    The backward pass starts from a fixed random direction r ~ N(0, 1) of the model's output
    shape (seeded by ``seed``), i.e. it differentiates <r, model(x)>: a pure product of Jacobians,
    independent of labels. ``layers`` (modules of ``model``) defaults to every Conv/Linear layer.
    The model's train/eval mode is used as it is (BatchNorm in train mode uses batch
    statistics); no parameter's ``.grad`` is touched.
    """
    if layers is None:
        layers = [m for _, m in weight_layers(model)]
    if not layers:
        raise ValueError("layers must name at least one module of model")
    module_names = {m: name for name, m in model.named_modules()}
    missing = [m for m in layers if m not in module_names]
    if missing:
        raise ValueError(f"layers must be modules of model; {type(missing[0]).__name__} is not")
    outputs: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, inp, out, i=i: outputs.__setitem__(i, out))
               for i, m in enumerate(layers)]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    gen = torch.Generator().manual_seed(resolve_seed(seed))
    direction = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    captured = [outputs[i] for i in range(len(layers))]
    grads = torch.autograd.grad(out, captured, grad_outputs=direction, allow_unused=True)
    return Profile(
        names=[module_names[m] for m in layers],
        forward=torch.tensor([_rms(o) for o in captured], dtype=torch.float64),
        backward=torch.tensor([0.0 if g is None else _rms(g) for g in grads], dtype=torch.float64),
    )


def linear_gradient_norms(weights, grad: torch.Tensor | None = None) -> torch.Tensor:
    """Backpropagate through the linear chain h_t = W_t h_{t-1}, t = 1..T, measured by autograd.

    ``weights`` is a sequence of T square matrices: ``[W] * T`` is a linear recurrence (one
    matrix T times), T different matrices a deep linear network. Returns ||dL/dh_{T-k}|| for
    k = 0..T with L = <grad, h_T>, i.e. the norm of W_{T-k+1}^T ... W_T^T grad. ``grad``
    defaults to the all-ones vector (norm sqrt(h)).
    """
    ws = [torch.as_tensor(w).detach().double() for w in weights]
    if not ws:
        raise ValueError("weights must hold at least one matrix")
    h = ws[0].shape[0]
    if any(w.shape != (h, h) for w in ws):
        raise ValueError(f"weights must all be square matrices of one size; got shapes {[tuple(w.shape) for w in ws]}")
    g = torch.ones(h, dtype=torch.float64) if grad is None else grad.detach().double().flatten()
    if g.numel() != h:
        raise ValueError(f"grad must have {h} entries, got {g.numel()}")
    states = [torch.zeros(h, dtype=torch.float64, device=ws[0].device, requires_grad=True)]
    for w in ws:
        states.append(w @ states[-1])
    grads = torch.autograd.grad(states[-1], states, grad_outputs=g.to(ws[0].device))
    return torch.stack([gr.norm() for gr in grads]).flip(0).cpu()


def gradient_through_time(rnn: nn.RNNBase, x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """For a batch-first ``torch.nn.RNN``/``GRU``/``LSTM``: RMS of d<r, h_T>/dx_t for every time step t.

    r is a fixed N(0, 1) direction (seeded) on the last step's output h_T. Entry t of the
    result is how much of the final step's gradient reaches input step t; read it from the
    end backwards to see the gradient travel back through time.
    """
    if not isinstance(rnn, nn.RNNBase) or not rnn.batch_first:
        raise ValueError("rnn must be a torch.nn.RNN, GRU or LSTM built with batch_first=True")
    if x.ndim != 3 or x.shape[2] != rnn.input_size:
        raise ValueError(f"x must have shape (N, T, {rnn.input_size}), got {tuple(x.shape)}")
    x = x.detach().requires_grad_(True)
    last = rnn(x)[0][:, -1]
    direction = torch.randn(last.shape, generator=torch.Generator().manual_seed(resolve_seed(seed)), dtype=last.dtype)
    (gx,) = torch.autograd.grad(last, x, grad_outputs=direction.to(last.device))
    return gx.detach().double().pow(2).mean(dim=(0, 2)).sqrt().cpu()
