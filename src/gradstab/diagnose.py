"""One call, one report: the gradient health of any ``nn.Module`` on one batch, and the remedy to try.

:func:`diagnose` runs one forward and backward pass and one probe optimizer step on the model and then
puts its parameters, gradients, buffers and torch's random state back as they were. It
reports, per parameter group (:func:`~gradstab.monitor.parameter_groups`: one group per owning module):

- the gradient norm of its parameters, and the RMS of the gradient with respect to its output, whose
  change across depth (weight layers in the order the forward pass runs them) says whether gradients
  explode or vanish on their way back to the input;
- where the first inf/NaN appears: the input, the first module whose forward output is non-finite
  (:func:`~gradstab.guard.first_nonfinite_output`), the loss, the first parameter whose gradient is;
- dead (gradient exactly 0), frozen (``requires_grad=False``) and unreached (no gradient) parameters;
- the update-to-weight ratio ||Δθ|| / ||θ|| of one step at ``lr``;
- the spectral radius of recurrent weights (``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and their cells);

and maps what it found to a remedy from the book's decision guide (Chapter 6), with the pages that
measure it. The thresholds are the named constants below; each says where its value comes from.
"""
from __future__ import annotations

import html
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ._check import one_of, positive_float
from .distributed import parallel_kind, reshard, world
from .guard import first_nonfinite_forward
from .monitor import first_tensor, parameter_groups
from .probe import growth_per_layer
from .train import OPTIMIZERS, check_class_targets

#: Gradients growing toward the input by more than this factor per layer count as exploding. A deep
#: BatchNorm-ReLU net grows about 1.21x per layer at initialization (Yang et al. 2019; claim 6 of the
#: book), which the decision guide calls usually harmless, so the bar sits above it; a ReLU net at
#: Xavier init shrinks by 1/sqrt(2) ~ 1/1.41 per layer (2.4), which a factor of 1.3 catches the other way.
GROWTH_PER_LAYER = 1.3
#: ... and only when the gradient at the input side differs from the output side's by more than this
#: factor overall: two orders of magnitude, so that the differences between layer types of a healthy net
#: (about 4x from the top encoder layer to the embedding of the Transformer in 3.4) do not count.
GROWTH_TOTAL = 100.0
#: The fewest weight layers (the output layer not counted) for a statement about depth. With two or three,
#: the first and last layer's different shapes decide the ratio, not depth.
MIN_DEPTH = 4
#: Model-wide update-to-weight ratio ||Δθ|| / ||θ|| (θ after the step) of the probe step above which
#: one step changes the model too much. The rule of thumb is about 1e-3 per step (Karpathy, CS231n notes
#: "Neural Networks Part 3"). Measured at step 0 on the book's models: digits MLPs and CNNs at SGD lr 0.1
#: move 0.007 to 0.07, Adam at lr 1e-3 0.005, the LSTM of 3.4 at lr 0.3 0.015; settings that fail move
#: 0.23 or more (an MLP at SGD lr 3: 0.25 to 0.53; 5.2's batch 1024 at lr 0.8: 0.50; Adam at lr 0.05
#: without warmup, 2.4: 0.23; the post-LN Transformer of 3.4 at Adam lr 0.05: 0.34). The probe starts
#: from a fresh optimizer state: SGD with momentum b builds its steps up to 1/(1-b) times longer when
#: gradients agree (Chapter 7), so a run with momentum can fail below this threshold.
UPDATE_RATIO_HIGH = 0.1
#: A recurrent weight's spectral radius above 1 is the necessary condition for gradients exploding
#: through time (Pascanu et al. 2013, sec. 2.1); a vanilla RNN at recurrent gain 3 grew over 1e4x in
#: 50 steps (5.4).
RECURRENT_RADIUS = 1.0


@dataclass(frozen=True)
class Remedy:
    """One finding and what to do about it: ``symptom`` (measured), ``text`` (the remedy), ``pages``
    (the book's notebooks that measure it, e.g. ``"ch5_3_robustness.ipynb"``; the rendered book has the
    same names with ``.html``)."""

    symptom: str
    text: str
    pages: tuple[str, ...] = ()

    def __str__(self) -> str:
        see = f" (see {', '.join(self.pages)})" if self.pages else ""
        return f"{self.symptom} -> {self.text}{see}"

    def as_dict(self) -> dict:
        """``{"symptom": str, "text": str, "pages": [str, ...]}``."""
        return {"symptom": self.symptom, "text": self.text, "pages": list(self.pages)}


NONE_NEEDED = Remedy("gradients finite and within the book's thresholds", "none needed")


@dataclass(frozen=True)
class LayerHealth:
    """One parameter group: its gradient and weight norms (2-norms over its parameters), the update
    ratio of the probe step, ``output_grad_rms`` (RMS of dL/dy over every entry of the owning module's
    output y, all calls of the module together; nan if not measured), its position in the forward pass
    among weight layers whose output gradient was measured (``depth``, 0 at the input; else None), and
    ``status``: ``"ok"``, ``"non-finite"``, ``"dead"`` (gradient exactly 0) or ``"unreached"`` (no gradient)."""

    name: str
    parameters: tuple[str, ...]
    grad_norm: float
    weight_norm: float
    update_ratio: float
    output_grad_rms: float
    depth: int | None
    status: str


@dataclass(repr=False)
class Diagnosis:
    """What :func:`diagnose` measured.

    Depth is read from the output gradients g_l = dL/dy_l of the weight layers in ``depth_order`` (input
    to output), not from the weight gradients: a weight gradient is the product of g_l and the layer's
    input, so when the forward signal grows as fast as the backward one (a net initialized too large)
    the weight gradients stay level across depth while g_l explodes toward the input.
    ``growth_toward_input`` is the per-layer factor by which RMS(g_l) grows from the output toward the
    input (exp of minus the least-squares slope of log RMS(g_l) against l, as
    :func:`~gradstab.probe.growth_per_layer` measures it in 2.1): above 1 exploding, below 1 vanishing.
    ``ratio_last_first`` is RMS(g_last) / RMS(g_first). Both leave out the last weight layer, whose output
    gradient is the loss's own (set by the loss, the batch size and any pooling before it, not by
    backpropagation), and both are nan with fewer than two other layers.
    ``update_ratio`` is ||θ' - θ|| / ||θ'|| of the probe step over the whole model (θ' after the step)."""

    loss: float
    layers: list[LayerHealth]
    depth_order: list[str]
    growth_toward_input: float
    ratio_last_first: float
    input_nonfinite: bool
    first_nonfinite_output: str | None
    nonfinite_before_output_module: bool  # its input was already non-finite: the NaN arose between modules
    first_nonfinite_gradient: str | None
    dead: list[str]
    frozen: list[str]
    unreached: list[str]
    recurrent_radius: dict[str, float]
    update_ratio: float
    findings: list[Remedy]
    settings: dict = field(default_factory=dict)
    parallel: str = ""  # "DDP" (DistributedDataParallel), "FSDP2" (DTensor parameters, sharded) or ""

    @property
    def remedy(self) -> Remedy:
        """The most urgent finding's remedy (``NONE_NEEDED`` when nothing was found)."""
        return self.findings[0] if self.findings else NONE_NEEDED

    @property
    def grows_toward(self) -> str:
        """``"input"``, ``"output"`` or ``"neither"``: where the gradient norms are larger."""
        g = self.growth_toward_input
        return "neither" if not math.isfinite(g) or g == 1 else ("input" if g > 1 else "output")

    def as_dict(self) -> dict:
        """Plain, strict-JSON dict for loggers (non-finite floats become None; ``status`` says why)."""
        layer_keys = ("grad_norm", "weight_norm", "update_ratio", "output_grad_rms")
        return {
            "loss": _finite(self.loss),
            "layers": [{"name": h.name, "parameters": list(h.parameters), "depth": h.depth, "status": h.status,
                        **{k: _finite(getattr(h, k)) for k in layer_keys}} for h in self.layers],
            "depth_order": list(self.depth_order),
            "growth_toward_input": _finite(self.growth_toward_input),
            "ratio_last_first": _finite(self.ratio_last_first),
            "grows_toward": self.grows_toward,
            "input_nonfinite": self.input_nonfinite,
            "first_nonfinite_output": self.first_nonfinite_output,
            "nonfinite_before_output_module": self.nonfinite_before_output_module,
            "first_nonfinite_gradient": self.first_nonfinite_gradient,
            "dead": list(self.dead), "frozen": list(self.frozen), "unreached": list(self.unreached),
            "recurrent_radius": {k: _finite(v) for k, v in self.recurrent_radius.items()},
            "update_ratio": _finite(self.update_ratio),
            "remedy": self.remedy.as_dict(),
            "findings": [f.as_dict() for f in self.findings],
            "settings": dict(self.settings),
            "parallel": self.parallel,
        }

    def summary_lines(self) -> list[str]:
        """The report's lines apart from the per-layer table."""
        probe = f"probe step: {self.settings.get('optimizer')} at lr {self.settings.get('lr'):g}"
        moved = (f"changes the weights by {self.update_ratio:.3g} of their norm" if math.isfinite(self.update_ratio)
                 else "not taken (a gradient is non-finite, or no parameter moved)")
        lines = [f"loss {self.loss:.4g}; {probe} {moved}"]
        if self.parallel:
            lines.append(PARALLEL_NOTES[self.parallel].format(ranks=self.settings.get("ranks", "?")))
        if math.isfinite(self.growth_toward_input):
            lines.append(f"depth: {len(self.depth_order)} weight layers; output gradient "
                         f"x{self.growth_toward_input:.3g} per layer toward the input, last/first "
                         f"{self.ratio_last_first:.3g} (output layer left out): larger toward the {self.grows_toward}")
        for label, value in (("input batch holds inf/NaN", self.input_nonfinite or None),
                             ("first non-finite forward output", self.first_nonfinite_output),
                             ("first non-finite gradient", self.first_nonfinite_gradient)):
            if value:
                lines.append(label if value is True else f"{label}: {value}")
        for label, names in (("dead (gradient exactly 0)", self.dead), ("frozen", self.frozen),
                             ("unreached (no gradient)", self.unreached)):
            if names:
                lines.append(f"{label}: {', '.join(names)}")
        for name, radius in self.recurrent_radius.items():
            lines.append(f"recurrent {name}: spectral radius {radius:.3g}")
        lines.extend(f"finding: {f}" for f in self.findings[1:])
        lines.append(f"remedy: {self.remedy}")
        return lines

    def table(self) -> list[list[str]]:
        """The per-layer table as rows of strings, the header first."""
        rows = [["layer", "depth", "grad norm", "output grad RMS", "weight norm", "update/weight", "status"]]
        rows += [[h.name, "" if h.depth is None else str(h.depth), f"{h.grad_norm:.3g}", f"{h.output_grad_rms:.3g}",
                  f"{h.weight_norm:.3g}", f"{h.update_ratio:.3g}", h.status] for h in self.layers]
        return rows

    def __repr__(self) -> str:  # the text report, so that a REPL shows it
        return str(self)

    def __str__(self) -> str:
        rows = self.table()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        text = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                for r in rows]
        return "\n".join(text + self.summary_lines())

    def _repr_html_(self) -> str:
        head, *body = self.table()
        cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
        notes = "".join(f"<li>{html.escape(line)}</li>" for line in self.summary_lines())
        return (f"<table><thead><tr>{''.join(f'<th>{html.escape(c)}</th>' for c in head)}</tr></thead>"
                f"<tbody>{cells}</tbody></table><ul>{notes}</ul>")


PARALLEL_NOTES = {
    "DDP": ("parallel: DDP-wrapped, {ranks} ranks (names keep DDP's 'module.' prefix); weight gradients are averaged "
            "over the ranks' batches, the loss and output gradients are this rank's batch"),
    "FSDP2": ("parallel: sharded (FSDP2, DTensor parameters), {ranks} ranks; norms are of the whole parameters, "
              "assembled from the shards; weight gradients are averaged over the ranks' batches, the loss and "
              "output gradients are this rank's batch"),
}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# -- arguments ---------------------------------------------------------------------------------------
def _inputs(batch) -> tuple[tuple[torch.Tensor, ...], object]:
    """Split ``batch`` into the model's positional inputs and the target, checking both."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"batch must be a pair (x, y); got {type(batch).__name__}"
                         + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    x, y = batch
    inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ValueError("batch: x must be a tensor or a non-empty tuple of tensors (passed as model(*x))")
    return inputs, y


def _check(model, inputs, y, loss_fn, lr, optimizer) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no parameter that requires grad: nothing to diagnose")
    positive_float("lr", lr)
    if not callable(optimizer):
        one_of("optimizer", optimizer, OPTIMIZERS)
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable as loss_fn(output, y) or None, got {loss_fn!r}")
    if loss_fn is None and not (isinstance(y, torch.Tensor) and not y.is_floating_point()
                                and not y.is_complex() and y.dtype != torch.bool):
        raise ValueError("loss_fn: the default cross-entropy needs integer class targets y; got "
                         f"{getattr(y, 'dtype', type(y).__name__)}: pass loss_fn=... (e.g. F.mse_loss)")
    devices = {p.device for p in model.parameters()}
    if len(devices) == 1 and any(t.device not in devices for t in inputs):
        raise ValueError(f"batch: x is on {', '.join(str(t.device) for t in inputs)} but the model is on "
                         f"{next(iter(devices))}; move one of them")
    if len(devices) == 1 and isinstance(y, torch.Tensor) and y.device not in devices:
        raise ValueError(f"batch: y is on {y.device} but the model is on {next(iter(devices))}; move one of them")


# -- the measurement -----------------------------------------------------------------------------------
def diagnose(model: nn.Module, batch, *, loss_fn: Callable | None = None, lr: float = 1e-3,
             optimizer: str | Callable = "sgd") -> Diagnosis:
    """Diagnose ``model``'s gradients on one ``batch`` and suggest a remedy from the book's decision guide.

    ``batch`` is ``(x, y)``: ``x`` a tensor, or a tuple of tensors passed as ``model(*x)``, on the model's
    device; ``y`` what ``loss_fn(model(*x), y)`` takes. ``loss_fn`` returns a scalar tensor; None means
    cross-entropy, for integer class targets (``y`` of shape (N,) and dtype int64 against (N, C) logits).
    The probe step uses ``optimizer`` (``"sgd"``, ``"adam"``, ``"adamw"`` with torch's defaults at ``lr``,
    or a factory ``params -> torch.optim.Optimizer``, whose own lr then applies) and gives the
    update-to-weight ratio ||θ' - θ|| / ||θ'|| per group and for the whole model (θ' after the step, as
    :class:`~gradstab.monitor.GradientMonitor` measures it; nan where no step was taken because a gradient
    is non-finite, or for a group that got no gradient).

    It runs on ``model`` itself, in its current train/eval mode and with its hooks (a hook on a parameter's
    gradient shapes what is measured, as it shapes training), inside a forked random state, and puts back
    afterwards, also when it raises: every parameter's value and ``.grad`` (the same tensor object),
    every buffer (e.g. BatchNorm's running statistics) and torch's RNG state. The train/eval mode is never
    changed. A forward hook of an attached :class:`~gradstab.monitor.GradientMonitor` does see the probe
    pass, so call ``diagnose`` between a monitor's ``record()`` calls, not inside a step.

    Returns a :class:`Diagnosis`: ``str(d)`` is a text report, ``d._repr_html_()`` a table for Jupyter,
    ``d.as_dict()`` a JSON-able dict, ``d.remedy`` the suggestion (``text`` and book ``pages``).
    ``d.parallel`` is ``"DDP"`` for a DistributedDataParallel model, ``"FSDP2"`` for one sharded by
    ``fully_shard`` (DTensor parameters), else ``""``; the report then says so in a line (call it on every
    rank with that rank's batch: the probe's backward and step are collectives).
    Raises ValueError for a model that is not an ``nn.Module`` or has no parameter requiring grad, a batch
    that is not ``(x, y)`` of tensors on the model's device, a non-positive ``lr``, an unknown
    ``optimizer``, a float ``y`` without ``loss_fn``, or a loss that is not a scalar tensor.
    """
    inputs, y = _inputs(batch)
    _check(model, inputs, y, loss_fn, lr, optimizer)
    groups = parameter_groups(model)
    params = [p for _, members in groups for _, p in members]
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with _restored(model), torch.random.fork_rng(devices=cuda):
        state = _rng_state(cuda)
        bad_output, bad_between = first_nonfinite_forward(model, *inputs)
        _set_rng_state(state, cuda)  # the same dropout masks in the pass that computes the gradients
        run = _backward(model, inputs, y, loss_fn, _weight_owners(groups))
        before = {id(p): p.detach().clone() for p in params}
        grads = {id(p): p.grad for p in params}
        step_taken = _probe_step(params, lr, optimizer)
        layers = _layers(groups, grads, before, run, step_taken)
        moved = _update_ratio(params, before) if step_taken else math.nan
        reshard(model)  # FSDP2: leave no module unsharded by the probe passes before the parameters are put back
    return _conclude(model, layers, run.loss, moved, inputs, (bad_output, bad_between), grads, groups,
                     dict(lr=lr, optimizer=optimizer if isinstance(optimizer, str) else "custom"))


@contextmanager
def _restored(model: nn.Module):
    """Put back on exit what diagnose may change: each parameter's value and ``.grad`` object, each buffer
    (the same objects, bound to the same attributes)."""
    slots = [(m, kind, name, t) for m in model.modules() for kind in ("_parameters", "_buffers")
             for name, t in getattr(m, kind).items() if t is not None]
    values = {id(t): t.detach().clone() for *_, t in slots}
    grads = {id(p): p.grad for p in model.parameters()}
    try:
        model.zero_grad(set_to_none=True)
        yield
    finally:
        with torch.no_grad():
            for m, kind, name, t in slots:
                getattr(m, kind)[name] = t
                t.copy_(values[id(t)])
        for p in model.parameters():
            p.grad = grads[id(p)]


def _rng_state(cuda: list[int]) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda]


def _set_rng_state(state: tuple, cuda: list[int]) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(cuda, state[1], strict=True):
        torch.cuda.set_rng_state(s, d)


def _weight_owners(groups) -> set[str]:
    """Names of the groups (owning modules) that hold a weight matrix: the layers depth is read from."""
    return {name for name, params in groups if any(p.ndim >= 2 for _, p in params)}


@dataclass
class _Pass:
    """What the forward and backward pass recorded."""

    loss: float
    start: dict[str, int]  # module name -> rank of its first call in the forward pass
    output_sq: dict[str, list[float]]  # module name -> [sum of squares, number of entries] of dL/dy, all calls


def _backward(model: nn.Module, inputs, y, loss_fn, watched: set[str]) -> _Pass:
    """Forward (recording call order and output gradients of ``watched`` modules) and backward."""
    run = _Pass(math.nan, {}, {})

    def note(name):
        def hook(module, args):  # returns None: a pre-hook's return value would replace the inputs
            run.start.setdefault(name, len(run.start))
        return hook

    def add(name, g):
        acc = run.output_sq.setdefault(name, [0.0, 0])
        acc[0] += float(g.detach().double().pow(2).sum())
        acc[1] += g.numel()

    def capture(name):
        def hook(module, args, output):
            out = first_tensor(output)
            if out is not None and out.requires_grad:
                out.register_hook(lambda g: add(name, g))
        return hook

    modules = [(name, m) for name, m in model.named_modules() if name]
    handles = [m.register_forward_pre_hook(note(name)) for name, m in modules]
    handles += [m.register_forward_hook(capture(name)) for name, m in modules if name in watched]
    try:
        output = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    if loss_fn is None:
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"loss_fn: the default cross-entropy needs (N, C) logits from the model, got "
                             f"{type(output).__name__}; pass loss_fn=...")
        check_class_targets(output, y, "batch: y")
    loss = (loss_fn or F.cross_entropy)(output, y)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got {getattr(loss, 'shape', type(loss).__name__)}")
    model.zero_grad(set_to_none=True)
    if loss.requires_grad:
        loss.reshape(()).backward()
    run.loss = float(loss.detach())
    return run


def _probe_step(params: list[nn.Parameter], lr: float, optimizer) -> bool:
    """One optimizer step on ``params`` if every gradient is finite; returns whether it was taken."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not all(bool(torch.isfinite(g).all()) for g in grads):
        return False
    if callable(optimizer):
        opt = optimizer(params)
    else:
        opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer](params, lr=lr)
    opt.step()
    return True


def _norm(tensors: list[torch.Tensor]) -> float:
    """2-norm over a list of tensors, accumulated in float64 (no overflow of the squares); nan if empty."""
    if not tensors:
        return math.nan
    return float(torch.stack([torch.linalg.vector_norm(t.detach(), dtype=torch.float64).cpu()
                              for t in tensors]).norm())


def _layers(groups, grads: dict, before: dict, run: _Pass, step_taken: bool) -> list[LayerHealth]:
    """One :class:`LayerHealth` per group; depth = rank in forward order among the layers whose output
    gradient RMS is finite and > 0."""
    rms = {name: math.sqrt(total / count) for name, (total, count) in run.output_sq.items() if count}
    usable = [name for name, _ in groups if math.isfinite(rms.get(name, math.nan)) and rms[name] > 0]
    depth = {name: i for i, name in enumerate(sorted(usable, key=run.start.__getitem__))}
    layers = []
    for name, params in groups:
        got = [grads[id(p)] for _, p in params if grads[id(p)] is not None]
        ratio = _update_ratio([p for _, p in params], before) if step_taken and got else math.nan
        layers.append(LayerHealth(name, tuple(n for n, _ in params), _norm(got),
                                  _norm([before[id(p)] for _, p in params]), ratio, rms.get(name, math.nan),
                                  depth.get(name), _status(got)))
    return layers


def _update_ratio(params: list[torch.Tensor], before: dict) -> float:
    """||θ' - θ|| / ||θ'|| over ``params`` (θ' after the step, as :class:`~gradstab.monitor.GradientMonitor`
    divides; nan if θ' = 0)."""
    after = _norm(params)
    return _norm([p.detach() - before[id(p)] for p in params]) / after if after > 0 else math.nan


def _status(got: list[torch.Tensor]) -> str:
    if not got:
        return "unreached"
    if not all(bool(torch.isfinite(g).all()) for g in got):
        return "non-finite"
    return "dead" if not any(bool(g.any()) for g in got) else "ok"


def _depth_growth(layers: list[LayerHealth]) -> tuple[list[str], float, float]:
    """Weight layers in forward order, and over all but the last of them the per-layer growth of the
    output-gradient RMS toward the input and RMS(last) / RMS(first)."""
    chain = sorted((h for h in layers if h.depth is not None), key=lambda h: h.depth)
    values = [h.output_grad_rms for h in chain[:-1]]
    if len(values) < 2:
        return [h.name for h in chain], math.nan, math.nan
    return [h.name for h in chain], 1 / growth_per_layer(values), values[-1] / values[0]


def _recurrent_radius(model: nn.Module) -> dict[str, float]:
    """Largest |eigenvalue| of each square gate block of every recurrent weight ``weight_hh*``."""
    radii = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
            continue
        for pname, w in module.named_parameters(recurse=False):
            hidden = module.hidden_size
            if pname.startswith("weight_hh") and w.shape[1] == hidden:  # (gates * hidden, hidden); not with proj_size
                blocks = w.detach().double().cpu().reshape(-1, hidden, hidden)
                full = f"{name}.{pname}" if name else pname
                radii[full] = float(torch.linalg.eigvals(blocks).abs().max())
    return radii


def _display(name: str) -> str:
    """``"a.parametrizations.weight.original"`` -> ``"a.weight"`` (the name parameter_groups uses)."""
    owner, sep, rest = name.partition(".parametrizations.")
    return f"{owner}.{rest.removesuffix('.original')}" if sep else name


def _conclude(model, layers, loss, moved, inputs, bad_forward, grads, groups, settings) -> Diagnosis:
    bad_output, bad_between = bad_forward
    order, growth, last_first = _depth_growth(layers)
    first_bad_grad = next((name for _, params in groups for name, p in params
                           if grads[id(p)] is not None and not bool(torch.isfinite(grads[id(p)]).all())), None)
    d = Diagnosis(
        loss=loss, layers=layers, depth_order=order, growth_toward_input=growth, ratio_last_first=last_first,
        input_nonfinite=not all(bool(torch.isfinite(t).all()) for t in inputs if t.is_floating_point()),
        first_nonfinite_output=bad_output, nonfinite_before_output_module=bad_between,
        first_nonfinite_gradient=first_bad_grad,
        dead=[n for h in layers if h.status == "dead" for n in h.parameters],
        unreached=[n for h in layers if h.status == "unreached" for n in h.parameters],
        frozen=[_display(n) for n, p in model.named_parameters() if not p.requires_grad],
        recurrent_radius=_recurrent_radius(model), update_ratio=moved, findings=[], settings=settings,
        parallel=parallel_kind(model))
    if d.parallel:
        d.settings["ranks"] = world()[1]
    d.findings = [r for rule in RULES if (r := rule(d)) is not None]
    return d


# -- the decision guide (book/ch6_conclusion.md), one rule per symptom, most urgent first ----------------------
def _nonfinite_input(d: Diagnosis) -> Remedy | None:
    if d.input_nonfinite:
        return Remedy("the input batch itself holds inf/NaN",
                      "fix or drop the corrupted records; in a long run skip such steps and log the suspect rows "
                      "(gs.guarded_train)", ("ch5_3_robustness.ipynb",))
    return None


def _nonfinite_forward(d: Diagnosis) -> Remedy | None:
    if d.first_nonfinite_output is not None and not d.input_nonfinite and d.nonfinite_before_output_module:
        return Remedy(f"the input of module {d.first_nonfinite_output!r} is already non-finite, though every "
                      f"module before it returned finite values",
                      "the inf/NaN arose between modules, in the forward code itself: an unsafe operation there "
                      "(log or sqrt of a value <= 0, division by ~0) needs a safe input, e.g. clamp it first",
                      ("ch5_3_robustness.ipynb",))
    if d.first_nonfinite_output is not None and not d.input_nonfinite:
        return Remedy(f"the forward pass turns non-finite first at module {d.first_nonfinite_output!r}",
                      "look at that module's input and weights: weights initialized too large or unscaled residual "
                      "sums blow the forward pass up (He initialization; residual branches scaled by 1/L or "
                      "SkipInit); an unsafe operation there (log, sqrt, division by ~0) needs a safe input",
                      ("ch5_3_robustness.ipynb", "ch5_2_scalability.ipynb"))
    return None


def _nonfinite_loss(d: Diagnosis) -> Remedy | None:
    if not math.isfinite(d.loss) and d.first_nonfinite_output is None and not d.input_nonfinite:
        return Remedy(f"the loss is {d.loss} although every module output is finite",
                      "check the targets and the loss function (log of 0, a target outside the classes, "
                      "a huge logit in half precision)", ("ch5_3_robustness.ipynb", "ch5_1_performance.ipynb"))
    return None


def _nonfinite_gradient(d: Diagnosis) -> Remedy | None:
    if d.first_nonfinite_gradient is not None and math.isfinite(d.loss):
        return Remedy(f"the loss is finite but the gradient of {d.first_nonfinite_gradient!r} is not",
                      "an operation whose derivative is infinite or undefined where it is evaluated (sqrt at 0, "
                      "torch.where over an unsafe branch): locate it with gs.find_nan_op and make both branches safe",
                      ("ch5_3_robustness.ipynb",))
    return None


def _deep_enough(d: Diagnosis) -> bool:
    return len(d.depth_order) - 1 >= MIN_DEPTH  # the layers the growth was measured over


def _exploding(d: Diagnosis) -> Remedy | None:
    if _deep_enough(d) and d.growth_toward_input > GROWTH_PER_LAYER and 1 / d.ratio_last_first > GROWTH_TOTAL:
        return Remedy(f"gradients grow toward the input by x{d.growth_toward_input:.3g} per layer "
                      f"({1 / d.ratio_last_first:.3g}x from the last weight layer to the first)",
                      "clip by global norm (max_norm near the typical norm, 1 is a common default); initialize at "
                      "the critical gain (He for ReLU); add normalization or scale residual branches",
                      ("ch1_introduction.ipynb", "ch2_4_missing.ipynb", "ch5_2_scalability.ipynb"))
    return None


def _recurrent(d: Diagnosis) -> Remedy | None:
    large = [name for name, r in d.recurrent_radius.items() if r > RECURRENT_RADIUS]
    if large:
        return Remedy(f"recurrent weights with spectral radius above {RECURRENT_RADIUS:g} "
                      f"({', '.join(large)}): gradients can explode through time",
                      "clip by global norm (max_norm=1); prefer LSTM or GRU cells to a vanilla RNN",
                      ("ch5_4_recurrent.ipynb",))
    return None


def _large_updates(d: Diagnosis) -> Remedy | None:
    if not d.update_ratio > UPDATE_RATIO_HIGH:  # also False for nan (no step taken)
        return None
    worst = max((h for h in d.layers if math.isfinite(h.update_ratio)), key=lambda h: h.update_ratio)
    symptom = (f"one step at lr {d.settings['lr']:g} changes the weights by {d.update_ratio:.2g} of their norm "
               f"(above {UPDATE_RATIO_HIGH:g}; about 1e-3 is typical), {worst.name!r} by {worst.update_ratio:.2g}")
    if d.settings["optimizer"] in ("adam", "adamw"):  # Adam divides by the gradient's own scale: clipping won't help
        return Remedy(symptom, "lower the learning rate, or warm it up linearly over the first steps; clipping alone "
                      "does not shorten an Adam step", ("ch5_2_scalability.ipynb", "ch2_4_missing.ipynb"))
    if d.recurrent_radius:
        return Remedy(symptom, "clip by global norm (max_norm=1) and lower the learning rate",
                      ("ch5_4_recurrent.ipynb", "ch5_2_scalability.ipynb"))
    return Remedy(symptom, "lower the learning rate, or warm it up linearly over the first steps; clip by global "
                  "norm against the spikes", ("ch5_2_scalability.ipynb", "ch2_4_missing.ipynb"))


def _vanishing(d: Diagnosis) -> Remedy | None:
    if _deep_enough(d) and 1 / d.growth_toward_input > GROWTH_PER_LAYER and d.ratio_last_first > GROWTH_TOTAL:
        return Remedy(f"gradients shrink toward the input by x{1 / d.growth_toward_input:.3g} per layer "
                      f"(the first weight layer gets {1 / d.ratio_last_first:.2g} of the last one's): vanishing",
                      "He initialization for ReLU (not Xavier); residual connections with scaled branches; "
                      "normalization", ("ch2_4_missing.ipynb", "ch5_2_scalability.ipynb"))
    return None


def _dead(d: Diagnosis) -> Remedy | None:
    if d.dead:
        return Remedy(f"parameters with a gradient of exactly 0: {', '.join(d.dead)}",
                      "expected for a branch that starts at 0 (SkipInit); otherwise ReLUs that never fire or a "
                      "zero-initialized layer feeding another: check the initialization and the activation",
                      ("ch2_4_missing.ipynb", "ch5_2_scalability.ipynb"))
    return None


def _unreached(d: Diagnosis) -> Remedy | None:
    if d.unreached:
        return Remedy(f"parameters that require grad but got none (not used by this forward pass): "
                      f"{', '.join(d.unreached)}",
                      "if that is intended, freeze them (requires_grad_(False)) or leave them out of the optimizer; "
                      "under DistributedDataParallel they need find_unused_parameters=True")
    return None


RULES: tuple[Callable[[Diagnosis], Remedy | None], ...] = (
    _nonfinite_input, _nonfinite_forward, _nonfinite_loss, _nonfinite_gradient, _exploding, _recurrent,
    _large_updates, _vanishing, _dead, _unreached)
