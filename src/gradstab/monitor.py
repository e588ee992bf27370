"""Per-layer gradient statistics, recorded on the device without a host sync per layer.

A *layer* is a module that owns a weight of two or more dimensions (a Conv or Linear map);
its gradient norm is the 2-norm over all of its own parameters (weight and bias).
"""
from __future__ import annotations

import torch
from torch import nn


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of ``model`` that own a weight with ndim >= 2, in model order."""
    return [(name, m) for name, m in model.named_modules()
            if getattr(m, "weight", None) is not None and m.weight.ndim >= 2]


class GradientMonitor:
    """Records, at every :meth:`record` call, one row of per-layer numbers.

    - ``grad``: ||dL/dθ_l|| for each layer's parameters θ_l (always);
    - ``act_grad``: ||dL/dy_l|| for each layer's output y_l (``activations=True``);
    - ``update_ratio``: ||Δθ_l|| / ||θ_l|| across the optimizer step (``updates=True``;
      call :meth:`before_step` before ``optimizer.step()`` and :meth:`after_step` after it).

    Rows stay on the device until :meth:`history` stacks them, so monitoring costs no
    synchronization. Use as a context manager, or call :meth:`attach` / :meth:`detach`.
    """

    def __init__(self, model: nn.Module, activations: bool = False, updates: bool = False):
        layers = weight_layers(model)
        if not layers:
            raise ValueError("model has no Conv/Linear layers to monitor")
        self.names = [name for name, _ in layers]
        self._modules = [m for _, m in layers]
        self._params = [p for m in self._modules for p in m.parameters(recurse=False)]
        sizes = [len(list(m.parameters(recurse=False))) for m in self._modules]
        self._owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        self._index: dict = {}
        self.activations, self.updates = activations, updates
        self._rows: dict[str, list[torch.Tensor]] = {"grad": [], "act_grad": [], "update_ratio": []}
        self._act: list[torch.Tensor | None] = [None] * len(self._modules)
        self._before: list[torch.Tensor] | None = None
        self._handles: list = []

    # -- hooks -----------------------------------------------------------------------------
    def attach(self) -> GradientMonitor:
        """Register forward hooks that capture each layer's output-gradient norm (if asked)."""
        if self.activations and not self._handles:
            for i, module in enumerate(self._modules):
                self._handles.append(module.register_forward_hook(self._output_hook(i)))
        return self

    def detach(self) -> None:
        """Remove every hook this monitor registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> GradientMonitor:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _output_hook(self, i: int):
        def hook(module, inputs, output):
            if output.requires_grad:  # keep the gradient; all norms are taken in one call in record()
                output.register_hook(lambda g: self._act.__setitem__(i, g))
        return hook

    # -- per-step recording ----------------------------------------------------------------
    def _per_layer(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Per-layer 2-norms sqrt(sum of squared tensor norms) of k stacked copies of the parameter list."""
        squares = torch.stack(torch._foreach_norm(tensors)).float() ** 2
        copies = len(tensors) // len(self._params)
        key = (copies, squares.device)
        if key not in self._index:  # built once per device, so no host-to-device copy per step
            offsets = [self._owner + c * len(self.names) for c in range(copies)]
            self._index[key] = torch.cat(offsets).to(squares.device)
        sums = torch.zeros(copies * len(self.names), dtype=squares.dtype, device=squares.device)
        return sums.index_add_(0, self._index[key], squares).sqrt()

    def grad_norms(self) -> torch.Tensor:
        """Per-layer parameter-gradient norms for the gradients now in ``.grad`` (missing = 0)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        return self._per_layer(grads)

    def before_step(self) -> None:
        """Remember the weights before the optimizer step (for the update-to-weight ratio)."""
        if self.updates:
            self._before = torch._foreach_mul([p.detach() for p in self._params], 1.0)  # one fused copy

    def after_step(self) -> None:
        """Append the update-to-weight ratio of the step taken since :meth:`before_step`."""
        if self._before is not None:
            now = [p.detach() for p in self._params]
            torch._foreach_sub_(self._before, now)  # before <- before - now = -Δθ (same norm)
            delta, weight = self._per_layer([*self._before, *now]).view(2, -1)
            self._rows["update_ratio"].append(delta / weight.clamp_min(1e-12))
            self._before = None

    def record(self) -> torch.Tensor:
        """After ``backward()``: append this step's gradient row(s) and return the parameter-gradient norms."""
        norms = self.grad_norms()
        self._rows["grad"].append(norms)
        if self.activations:
            zero = norms.new_zeros(())
            grads = [zero if a is None else a for a in self._act]
            self._rows["act_grad"].append(torch.stack(torch._foreach_norm(grads)).float())
            self._act = [None] * len(self._modules)
        return norms

    def history(self, kind: str = "grad") -> torch.Tensor:
        """All recorded rows of ``kind`` as a (steps, layers) float tensor on the CPU."""
        if kind not in self._rows:
            raise ValueError(f"kind must be one of {', '.join(map(repr, self._rows))}; got {kind!r}")
        rows = self._rows[kind]
        return torch.stack(rows).cpu() if rows else torch.zeros(0, len(self.names))

    def first_nonfinite(self, norms: torch.Tensor) -> str | None:
        """Name of the first layer (model order) whose entry in ``norms`` is inf or NaN, else None."""
        bad = (~torch.isfinite(norms)).nonzero()
        return self.names[int(bad[0])] if len(bad) else None
