"""Per-layer gradient statistics over every parameter that requires grad, recorded without a host sync.

A *layer* is a group of :func:`parameter_groups`: the parameters a module owns directly (a Conv or
Linear map, an ``nn.LSTM``'s weights, an attention block's ``in_proj_weight``, a norm's affine
parameters, a block's raw ``nn.Parameter``). Its gradient norm is the 2-norm over all of them,
``sqrt(sum_i ||g_i||^2)``, the per-layer split of the global norm of
``torch.nn.utils.clip_grad_norm_``: the squares of the layer norms sum to the squared global norm.
"""
from __future__ import annotations

import math
from collections import deque

import torch
from torch import nn

from ._check import positive_int
from .distributed import data_parallel_group, is_dtensor, reshard, unwrap

KINDS = ("grad", "act_grad", "update_ratio")
LOG_PREFIX = {"grad": "grad_norm", "act_grad": "act_grad_norm", "update_ratio": "update_ratio"}


def _split_parametrization(module_name: str) -> tuple[str, str]:
    """``"a.parametrizations.weight"`` -> ``("a", "weight")``; a module outside any parametrization -> (name, "")."""
    head, sep, attr = ("." + module_name).partition(".parametrizations.")
    return (head[1:], attr) if sep else (module_name, "")


def parameter_groups(model: nn.Module) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """Every parameter of ``model`` that requires grad, grouped by the module that owns it, each counted once.

    Returns ``[(group, [(parameter_name, parameter), ...]), ...]`` in ``model.named_modules()`` order.
    A group is named by its owning module's qualified name (``"encoder.layers.0.self_attn"`` holds
    ``in_proj_weight``, ``in_proj_bias``; ``"lstm"`` holds every ``weight_ih_l0`` ...). Rules:

    - a parametrized weight (``torch.nn.utils.parametrize``, e.g. ``parametrizations.spectral_norm``)
      is counted through its ``original`` (the leaf the optimizer updates), under the parametrized
      module and the weight's name (``"layer.weight"``); a parametrization that keeps several
      originals (``original0``, ``original1``) or parameters of its own keeps their full names;
    - a parameter shared by several modules (tied weights) belongs to the first module that owns it;
    - parameters with ``requires_grad=False`` (frozen) are left out, and so is a module with no other;
    - a raw parameter owned by the root model itself forms a group of its own, named by the parameter.
    """
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        owner, attr = _split_parametrization(module_name)
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if attr and name == "original":  # "<owner>.parametrizations.<attr>.original" is "<owner>.<attr>"
                full = f"{owner}.{attr}" if owner else attr
            else:
                full = f"{module_name}.{name}" if module_name else name
            groups.setdefault(owner or full, []).append((full, p))
    return list(groups.items())


def _weight(module: nn.Module) -> torch.Tensor | None:
    """A module's ``weight`` tensor (a parametrized one through its original, so nothing is recomputed)."""
    parametrizations = getattr(module, "parametrizations", None)
    if isinstance(parametrizations, nn.ModuleDict) and "weight" in parametrizations:
        return getattr(parametrizations["weight"], "original", None)
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of ``model`` that own a weight with ndim >= 2 (Conv/Linear maps), in model order."""
    layers = []
    for name, module in model.named_modules():
        weight = _weight(module)
        if weight is not None and weight.ndim >= 2:
            layers.append((name, module))
    return layers


def first_tensor(output) -> torch.Tensor | None:
    """The module output whose gradient is recorded: the output itself, or the first tensor of a tuple/list."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return None


NARROW = (torch.float16, torch.bfloat16)  # their norms are computed in float32: a float16 norm overflows at 65504


def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The 2-norm of each tensor by ``torch._foreach_norm``: in float32 for float16/bfloat16 tensors, in the
    tensor's own dtype otherwise (float32, float64; the grouping casts to float32 afterwards). A sparse
    gradient (``nn.Embedding(sparse=True)``) is measured through its coalesced values, whose norm is the
    dense gradient's."""
    if any(t.is_sparse for t in tensors):
        tensors = [t.coalesce().values() if t.is_sparse else t for t in tensors]
    if len({is_dtensor(t) for t in tensors}) > 1:  # DTensors beside plain tensors (FSDP2 on part of
        # the model): a foreach kernel takes one kind only, so each tensor is measured on its own
        return [torch.linalg.vector_norm(t, dtype=torch.float32 if t.dtype in NARROW else None) for t in tensors]
    dtypes = {t.dtype for t in tensors}
    if not dtypes & set(NARROW):
        return list(torch._foreach_norm(tensors))
    if torch.float64 not in dtypes:
        return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    return [torch.linalg.vector_norm(t, dtype=torch.float32 if t.dtype in NARROW else None) for t in tensors]


def _stack(norms: list[torch.Tensor]) -> torch.Tensor:
    """Stack 0-dim per-tensor norms into one plain tensor. FSDP2 shards parameters as DTensors, whose norms are
    partial over the ranks: they are stacked first and reduced in one collective (``full_tensor``), no host sync."""
    if not all(type(n) is torch.Tensor for n in norms) and any(hasattr(n, "full_tensor") for n in norms):
        if all(hasattr(n, "full_tensor") for n in norms):
            return torch.stack(norms).full_tensor()
        norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    return torch.stack(norms)


class _GroupSum:
    """Per-group 2-norms from per-tensor 2-norms: ``sqrt(sum over the group's tensors of ||t||^2)``.

    A *layout* is the tuple of group indices of the tensors, one per tensor. Its index tensor and
    missing-group mask are built once per (layout, device) and cached, so a step copies nothing from
    the host. The sum is taken in float32 like ``torch.nn.utils.get_total_norm``: a sum of squares
    beyond float32's range (norms above about 1.8e19) is inf, as it is there.
    """

    def __init__(self, groups: int):
        self.groups = groups
        self._cache: dict = {}

    def layout(self, owners: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (tensors,) long index of ``owners`` and the (groups,) bool mask of groups absent from it
        (None if every group is present), on ``device``."""
        key = (owners, device)
        if key not in self._cache:
            missing = torch.ones(self.groups, dtype=torch.bool)
            missing[list(owners)] = False
            self._cache[key] = (torch.tensor(owners, dtype=torch.long).to(device),
                                missing.to(device) if missing.any() else None)
        return self._cache[key]

    def __call__(self, norms: torch.Tensor, owners: tuple[int, ...]) -> torch.Tensor:
        """(..., groups) float32 group norms of the (..., tensors) per-tensor ``norms``; NaN for a group with
        no tensor in ``owners``."""
        if not owners:
            return torch.full((*norms.shape[:-1], self.groups), math.nan, device=norms.device)
        index, missing = self.layout(owners, norms.device)
        squares = norms.float().square()
        total = squares.new_zeros(*squares.shape[:-1], self.groups).index_add_(-1, index, squares).sqrt()
        return total if missing is None else total.masked_fill(missing, math.nan)


class GradientMonitor:
    """Records, at every :meth:`record` call, one row of per-layer numbers (one column per group of
    :func:`parameter_groups`: every parameter that requires grad, grouped by the module that owns it).

    - ``grad``: ||dL/dθ_l|| over layer l's parameters θ_l (always); NaN for a layer none of whose
      parameters has a ``.grad`` at that step (missing, not 0); frozen parameters are not listed;
    - ``act_grad``: ||dL/dy_l|| for the output y_l of layer l's module (``activations=True``). A module
      called several times in one forward combines its calls, ``sqrt(sum over calls of ||dL/dy||^2)``
      (all calls since the previous :meth:`record`, so micro-batches of an accumulated step combine too);
      a module whose output is a tuple or list (``nn.LSTM``, ``nn.MultiheadAttention``) is recorded
      through its first tensor; a layer whose module produced no output gradient (not called, output
      not requiring grad, not a tensor, or a root model's own raw parameter) is NaN;
    - ``update_ratio``: ||Δθ_l|| / ||θ_l|| across the optimizer step (``updates=True``;
      call :meth:`before_step` before ``optimizer.step()`` and :meth:`after_step` after it).

    Under DDP (``DistributedDataParallel``) or FSDP2 (``fully_shard``, DTensor parameters) every rank gets
    the numbers of one process training on the union of the ranks' batches: the layer names are those of
    the wrapped model (no ``module.`` prefix), weight-gradient norms and update ratios are taken over the
    whole (synchronized or assembled) parameters, and ``act_grad`` combines the ranks' output gradients
    (one all-reduce per :meth:`record`, which every rank must call).

    All norms are 2-norms in float32. Rows stay on the device, as per-tensor norms where they can, until
    :meth:`history` or :meth:`log_dict` reads them, so monitoring costs no host synchronization.
    ``max_rows`` keeps only the newest rows of each kind (None: all). Use as a context manager, or call
    :meth:`attach` / :meth:`detach` (hooks are needed only for ``activations=True``).

    Raises ValueError if ``model`` is not an ``nn.Module`` or has no parameter that requires grad, or if
    ``activations`` / ``updates`` are not bools or ``max_rows`` is not None or an integer >= 1.
    """

    def __init__(self, model: nn.Module, activations: bool = False, updates: bool = False,
                 max_rows: int | None = None):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, flag in (("activations", activations), ("updates", updates)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        if max_rows is not None:
            positive_int("max_rows", max_rows)
        self._group = data_parallel_group(model)  # DDP's or FSDP2's ranks: activation norms combine over them
        reshard(model)  # FSDP2 after a forward without backward: hold the sharded parameters, not the gathered ones
        model = unwrap(model)  # DDP's "module." prefix is not part of the layer names
        groups = parameter_groups(model)
        if not groups:
            raise ValueError("model has no parameter that requires grad to monitor")
        self.names = [group for group, _ in groups]
        self.param_names = [name for _, params in groups for name, _ in params]
        self._params = [p for _, params in groups for _, p in params]
        self._devices = len({p.device for p in self._params})
        self._sharded = any(hasattr(p, "full_tensor") for p in self._params)  # FSDP2 DTensor parameters
        self._owner = tuple(i for i, (_, params) in enumerate(groups) for _ in params)
        self._owner_pair = self._owner + tuple(i + len(groups) for i in self._owner)  # [Δθ..., θ...]
        modules = dict(model.named_modules())
        self._modules = [modules.get(name) for name in self.names]  # None for a root model's raw parameter
        self.activations, self.updates, self.max_rows = activations, updates, max_rows
        self._sum, self._sum_pair = _GroupSum(len(groups)), _GroupSum(2 * len(groups))
        # "grad" rows are group norms; the others are ((tensors,) per-tensor norms, layout), grouped when read
        self._rows: dict[str, deque] = {kind: deque(maxlen=max_rows) for kind in KINDS}
        self._act_norms: list[torch.Tensor] = []
        self._act_owners: list[int] = []
        self._missing: torch.Tensor | None = None
        self._before: list[torch.Tensor] | None = None  # weights before the step, then -Δθ
        self._stepping = False
        self._handles: list = []

    # -- hooks -----------------------------------------------------------------------------
    def attach(self) -> GradientMonitor:
        """Register forward hooks that capture each layer's output-gradient norm (if ``activations=True``)."""
        if self.activations and not self._handles:
            for i, module in enumerate(self._modules):
                if module is not None:
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
        def keep(grad: torch.Tensor) -> None:  # the norm of every call; the gradient itself is not kept
            wide = torch.float32 if grad.dtype in NARROW else None
            self._act_norms.append(torch.linalg.vector_norm(grad.detach(), dtype=wide))
            self._act_owners.append(i)

        def hook(module, inputs, output):
            out = first_tensor(output)
            if out is not None and out.requires_grad:
                out.register_hook(keep)
        return hook

    # -- per-step recording ----------------------------------------------------------------
    def _grad_norms(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        grads, owners = [p.grad for p in self._params], self._owner
        if any(g is None for g in grads):  # known on the host: no sync
            owners = tuple(i for g, i in zip(grads, self._owner, strict=True) if g is not None)
            grads = [g for g in grads if g is not None]
        device = self._params[0].device
        norms = self._stack(_norms(grads)) if grads else torch.zeros(0, device=device)
        return self._sum(norms, owners), self._sum.layout(owners, norms.device)[1]

    def _stack(self, norms: list[torch.Tensor]) -> torch.Tensor:
        """Per-tensor norms as one tensor, on the first parameter's device if the model spans several."""
        if self._devices > 1:
            norms = [n.to(self._params[0].device) for n in norms]
        return _stack(norms) if self._sharded else torch.stack(norms)

    def _over_ranks(self, norms: torch.Tensor) -> torch.Tensor:
        """Output-gradient norms of the union of the ranks' batches, from each rank's own: under DDP or FSDP2
        every rank differentiates the mean loss of its own batch and the weight gradients are averaged, so
        the union's dL/dy is the ranks' own divided by the world size, and its norm is
        ``sqrt(sum over ranks of ||dL/dy||^2) / world_size`` (exact for equal batch sizes, as DDP assumes).
        One all-reduce; every rank must call :meth:`record` with the same calls recorded."""
        import torch.distributed as dist

        squares = norms.float().square()
        dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=self._group)
        return squares.sqrt() / dist.get_world_size(self._group)

    @torch.no_grad()
    def grad_norms(self) -> torch.Tensor:
        """Per-layer 2-norms (layers,) float32 of the gradients now in ``.grad``, NaN where a layer has none;
        nothing is recorded."""
        return self._grad_norms()[0]

    @torch.no_grad()
    def record(self) -> torch.Tensor:
        """After ``backward()``: append this step's row(s) and return the (layers,) float32 gradient norms.

        The result stays on the model's device (no host sync); NaN marks a layer with no gradient this
        step. Pass it to :meth:`nonfinite` / :meth:`first_nonfinite` to tell a missing layer from a broken one.
        """
        norms, self._missing = self._grad_norms()
        self._rows["grad"].append(norms)
        if self.activations:
            norms_of_calls = self._stack(self._act_norms) if self._act_norms else norms.new_zeros(0)
            if self._group is not None:
                norms_of_calls = self._over_ranks(norms_of_calls)
            self._rows["act_grad"].append((norms_of_calls, tuple(self._act_owners)))
            self._act_norms, self._act_owners = [], []
        return norms

    def nonfinite(self, norms: torch.Tensor) -> torch.Tensor:
        """(layers,) bool on ``norms``' device, no host sync: True where the layer got a gradient at the latest
        :meth:`record` and its norm in ``norms`` (that record's result) is inf or NaN. A norm beyond float32's
        range counts as inf, as in ``torch.nn.utils.get_total_norm``.

        Raises ValueError if ``norms`` is not a tensor of shape (layers,)."""
        if not isinstance(norms, torch.Tensor) or norms.shape != (len(self.names),):
            shape = tuple(norms.shape) if isinstance(norms, torch.Tensor) else type(norms).__name__
            raise ValueError(f"norms must be a tensor of shape ({len(self.names)},) from record(), got {shape}")
        bad = ~torch.isfinite(norms)
        return bad if self._missing is None else bad & ~self._missing.to(bad.device)

    def first_nonfinite(self, norms: torch.Tensor) -> str | None:
        """Name of the first layer (model order) that :meth:`nonfinite` flags, else None (one host sync)."""
        bad = self.nonfinite(norms).nonzero()
        return self.names[int(bad[0])] if len(bad) else None

    @torch.no_grad()
    def first_nonfinite_parameter(self) -> str | None:
        """Qualified name (as in ``param_names``) of the first parameter, in model order, whose current
        ``.grad`` has a non-finite 2-norm (it holds inf or NaN, or entries beyond about 1.8e19 whose squares
        overflow float32), else None. One host sync: meant for the failure path, after :meth:`nonfinite`."""
        present = [(name, p.grad) for name, p in zip(self.param_names, self._params, strict=True)
                   if p.grad is not None]
        if not present:
            return None
        norms = self._stack(_norms([g for _, g in present]))
        bad = (~torch.isfinite(norms)).nonzero()
        return present[int(bad[0])][0] if len(bad) else None

    @torch.no_grad()
    def before_step(self) -> None:
        """Copy the weights before the optimizer step (for the update-to-weight ratio) into buffers kept
        between steps, so a step allocates nothing."""
        if not self.updates:
            return
        first = self._params[0]
        if self._sharded:  # FSDP2's DTensors have no foreach copy (and a foreach op takes no DTensor/Tensor mix)
            self._before = [p.detach().clone() for p in self._params]
        else:
            if self._before is None or (self._before[0].device, self._before[0].dtype) != (first.device, first.dtype):
                self._before = [torch.empty_like(p) for p in self._params]
            torch._foreach_copy_(self._before, self._params)
        self._stepping = True

    @torch.no_grad()
    def after_step(self) -> None:
        """Append the per-layer update-to-weight ratio ||Δθ_l|| / ||θ_l|| of the step taken since
        :meth:`before_step` (θ_l after the step; the denominator is floored at 1e-12)."""
        if self._stepping:
            if self._sharded:
                for before, p in zip(self._before, self._params, strict=True):
                    before.sub_(p)
            else:
                torch._foreach_sub_(self._before, self._params)  # before <- before - now = -Δθ (same norm)
            norms = self._stack(_norms([*self._before, *self._params]))
            self._rows["update_ratio"].append((norms, self._owner_pair))
            self._stepping = False

    # -- reading the rows --------------------------------------------------------------------
    def _grouped(self, kind: str, entries) -> list[torch.Tensor]:
        """Group rows of per-tensor norms into (layers,) rows; consecutive rows of one layout in one call."""
        if kind == "grad":
            return list(entries)
        group = self._sum_pair if kind == "update_ratio" else self._sum
        rows, batch = [], []
        for k, (norms, owners) in enumerate(entries):
            batch.append(norms)
            if k + 1 == len(entries) or entries[k + 1][1] != owners:
                rows.extend(group(torch.stack(batch), owners))
                batch = []
        if kind == "update_ratio":
            rows = [delta / weight.clamp_min(1e-12) for delta, weight in (r.view(2, -1) for r in rows)]
        return rows

    def history(self, kind: str = "grad") -> torch.Tensor:
        """The stored rows of ``kind`` ("grad", "act_grad", "update_ratio") as a (steps, layers) float32 CPU
        tensor, oldest first (only the newest ``max_rows`` if capped). Raises ValueError for another kind."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")
        rows = self._grouped(kind, list(self._rows[kind]))
        return torch.stack(rows).cpu() if rows else torch.zeros(0, len(self.names))

    def log_dict(self) -> dict[str, float]:
        """The newest row of every kind recorded so far as a flat ``{"<stat>/<layer>": value}`` dict for a logger
        (``stat`` in "grad_norm", "act_grad_norm", "update_ratio"; NaN for a missing layer), e.g.
        ``for tag, value in monitor.log_dict().items(): writer.add_scalar(tag, value, step)``. One host sync;
        empty before the first :meth:`record`."""
        values: dict[str, float] = {}
        for kind, entries in self._rows.items():
            if entries:
                row = self._grouped(kind, [entries[-1]])[0].tolist()
                values.update({f"{LOG_PREFIX[kind]}/{name}": v for name, v in zip(self.names, row, strict=True)})
        return values

    def reset(self) -> None:
        """Forget every stored row and any pending output-gradient norm or pre-step weights (hooks stay attached)."""
        for entries in self._rows.values():
            entries.clear()
        self._act_norms, self._act_owners, self._missing, self._before, self._stepping = [], [], None, None, False
