"""Guards for long runs: skip steps with non-finite loss or gradients, roll back to the last
good checkpoint after a loss spike, and find the operation that first produced a NaN.

Large runs do all three: PaLM's authors restarted from a checkpoint about 100 steps before a
spike and skipped the batches around it (Chowdhery et al. 2023); mixed-precision loss scaling
skips steps with inf/NaN gradients (Micikevicius et al. 2018).
"""
from __future__ import annotations

import copy
import math
import re
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ._check import positive_float, positive_int
from .data import Split
from .monitor import first_tensor

ACCEPT, SKIP, ROLLBACK, STOP = "accept", "skip", "rollback", "stop"  # what the loop does with a step


def __getattr__(name: str):
    """``GuardedRun``, the result type of :func:`guarded_train`, is :class:`~gradstab.train.History`."""
    if name == "GuardedRun":
        from .train import History

        return History
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def grads_finite(parameters: Iterable[torch.Tensor]) -> bool:
    """True if every existing ``.grad`` is free of inf and NaN (one host sync for all of them)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


class SpikeDetector:
    """Flag a loss above ``factor`` times the largest of the last ``window`` accepted losses.

    Comparing with the window's maximum, not its mean, keeps ordinary minibatch noise from
    counting as a spike once the loss is small. Nothing is flagged before ``min_history`` losses
    have been accepted; a flagged loss is not added, so one spike cannot raise the baseline.
    """

    def __init__(self, factor: float = 3.0, window: int = 20, min_history: int = 5):
        self.factor = positive_float("factor", factor)
        if self.factor <= 1:
            raise ValueError(f"factor must be > 1, got {factor!r}")
        self.window = positive_int("window", window)
        self.min_history = positive_int("min_history", min_history)
        if self.min_history > self.window:
            raise ValueError(f"min_history must be <= window ({window}), got {min_history!r}")
        self._recent: deque[float] = deque(maxlen=self.window)

    @property
    def baseline(self) -> float:
        """Largest accepted loss in the window (nan while it is still empty)."""
        return max(self._recent) if self._recent else math.nan

    def __call__(self, loss: float) -> bool:
        """Return True if ``loss`` is a spike; otherwise remember it and return False."""
        if len(self._recent) >= self.min_history and loss > self.factor * self.baseline:
            return True
        self._recent.append(loss)
        return False


class Checkpoint:
    """An in-memory copy of a model's, an optimizer's (and a scheduler's) state, and the step it was taken at."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int = 0, scheduler=None):
        self.save(model, optimizer, step, scheduler)

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, scheduler=None) -> None:
        """Copy the states of ``model``, ``optimizer`` (and ``scheduler``) now, as taken at ``step``."""
        self.step = step
        self._model = copy.deepcopy(model.state_dict())
        self._optimizer = copy.deepcopy(optimizer.state_dict())
        self._scheduler = None if scheduler is None else copy.deepcopy(scheduler.state_dict())

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None) -> int:
        """Load the saved state back into ``model``, ``optimizer`` (and ``scheduler``); return its step."""
        model.load_state_dict(self._model)
        optimizer.load_state_dict(self._optimizer)
        if scheduler is not None and self._scheduler is not None:
            scheduler.load_state_dict(self._scheduler)
        return self.step


class Checkpoints:
    """The last ``keep`` checkpoints. A rollback straight after a rollback (no healthy step in
    between) means the newest checkpoint already held the damage: it is discarded and the one
    before it restored, so a run can walk back past a bad checkpoint instead of looping on it.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, keep: int = 3, scheduler=None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self._saved = deque([Checkpoint(model, optimizer, 0, scheduler)], maxlen=positive_int("keep", keep))

    def save(self, step: int) -> None:
        """Add a checkpoint of the current state, taken at ``step`` (the oldest beyond ``keep`` is dropped)."""
        self._saved.append(Checkpoint(self.model, self.optimizer, step, self.scheduler))

    def restore(self, again: bool = False) -> int:
        """Restore the newest checkpoint (the one before it if ``again``); return its step."""
        if again and len(self._saved) > 1:
            self._saved.pop()
        return self._saved[-1].restore(self.model, self.optimizer, self.scheduler)


@dataclass
class Event:
    """One intervention: ``kind`` is ``"skip"`` or ``"rollback"``; ``row`` is the suspect example (its
    training-set row for a Split, else its position in the step's batch; None when unknown)."""

    step: int
    kind: str
    reason: str
    row: int | None = None
    restored_to: int | None = None

    def __str__(self) -> str:
        back = f", restored step {self.restored_to}" if self.restored_to is not None else ""
        suspect = f"; suspect row {self.row}" if self.row is not None else ""
        return f"step {self.step}: {self.kind} ({self.reason}{suspect}{back})"


class Guard:
    """The decision the training loop takes for each step: accept, skip, roll back, or stop.

    A step is *bad* when its loss or a gradient is non-finite (or its loss exceeds ``loss_limit``).
    Without ``skip_nonfinite`` and ``rollback`` a bad step stops the run. ``skip_nonfinite``: a bad step's
    update is skipped, up to ``patience - 1`` in a row; ``rollback``: the ``patience``-th bad step in a row,
    and a finite loss above ``spike_factor`` x the largest of the last ``spike_window`` accepted losses,
    restore the last checkpoint (taken every ``checkpoint_every`` accepted steps, ``keep`` kept) and multiply
    the learning rate by ``lr_backoff`` (with rollback alone, any bad step rolls back; with skipping alone,
    the ``patience``-th bad step in a row stops the run). Raises ValueError for bad settings.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, skip_nonfinite: bool = False,
                 rollback: bool = False, spike_factor: float = 3.0, spike_window: int = 20,
                 checkpoint_every: int = 10, keep: int = 3, patience: int = 3, lr_backoff: float = 1.0,
                 loss_limit: float = math.inf, scheduler=None):
        self.skip, self.rollback = bool(skip_nonfinite), bool(rollback)
        self.every = positive_int("checkpoint_every", checkpoint_every)
        self.patience = positive_int("patience", patience)
        self.lr_backoff = positive_float("lr_backoff", lr_backoff)
        if lr_backoff > 1:
            raise ValueError(f"lr_backoff must lie in (0, 1], got {lr_backoff!r}")
        positive_int("keep", keep)
        detector = SpikeDetector(spike_factor, spike_window)
        self.detector = detector if self.rollback else None
        self.checkpoints = Checkpoints(model, opt, keep, scheduler) if self.rollback else None
        self.loss_limit, self.lr_factor = loss_limit, 1.0
        self.in_a_row = self.healthy = 0
        self.just_rolled_back = False

    def judge(self, step: int, loss: torch.Tensor, bad: torch.Tensor, final: bool = False) -> tuple[str, str]:
        """(action, reason) for a step whose mean ``loss`` and ``bad`` flag (0-dim tensors) are given.
        ``final``: the check after the last step (a bad loss then rolls back instead of skipping)."""
        if not (self.skip or self.rollback):
            return (STOP if bool(bad) else ACCEPT), ""
        value, bad = float(loss), bool(bad)
        self.in_a_row = self.in_a_row + 1 if bad else 0
        prefix = "final check: " if final else ""
        if bad and self.skip and self.in_a_row < self.patience and not final:
            return SKIP, f"loss {value:.3g}, {self._trouble(value)}"
        if not bad:
            if self.detector is None or not self.detector(value):
                return ACCEPT, ""
            return ROLLBACK, f"{prefix}loss {value:.3g} > {self.detector.factor:g} x recent max " \
                             f"{self.detector.baseline:.3g}"
        if not self.rollback:
            return STOP, ""
        return ROLLBACK, f"{prefix}loss {value:.3g}, {self.in_a_row} non-finite steps in a row"

    def _trouble(self, value: float) -> str:
        if math.isfinite(value) and value > self.loss_limit:
            return f"loss above loss_limit={self.loss_limit:g}"
        return "non-finite loss or gradient"

    def carry_out(self, action: str) -> int | None:
        """Carry out a rollback (restore, lower the learning rate); return the restored step (None for a skip)."""
        if action != ROLLBACK:
            return None
        restored = self.checkpoints.restore(again=self.just_rolled_back)
        self.just_rolled_back, self.in_a_row = True, 0
        self.lr_factor *= self.lr_backoff
        return restored

    def accept(self, step: int) -> None:
        """A healthy update was applied at ``step``: count it, and checkpoint every ``checkpoint_every`` of them."""
        self.healthy, self.just_rolled_back = self.healthy + 1, False
        if self.rollback and self.healthy % self.every == 0:
            self.checkpoints.save(step + 1)


def guarded_train(model: nn.Module, data, *, lr: float | None = None, skip_nonfinite: bool = True,
                  rollback: bool = True, **options):
    """:func:`~gradstab.train.train` with both guards on: survive bad steps instead of stopping.

    - loss or any gradient non-finite: the update is skipped and reported;
    - loss above ``spike_factor`` (3) x the largest of the last ``spike_window`` (20) losses: model and
      optimizer are restored from the last checkpoint (taken every ``checkpoint_every`` (10) healthy
      steps; the last ``keep`` (3) are kept, see :class:`Checkpoints`), the batch is dropped and the
      learning rate is multiplied by ``lr_backoff`` (1);
    - ``patience`` (3) non-finite steps in a row (the weights themselves are broken): the same rollback.

    After the last step one more batch is evaluated (no update), so that damage done by the
    final steps is caught too; an event at step ``steps`` is that final check. Each event names
    the batch's *suspect row*: the training example with the largest (or a non-finite)
    per-example loss, which is where to look for a corrupted record. ``options`` are ``train``'s.
    Returns a :class:`~gradstab.train.History` (``events``, ``skipped``, ``rollbacks``, ``report()``).
    """
    from .train import train

    return train(model, data, lr=lr, skip_nonfinite=skip_nonfinite, rollback=rollback, **options)


def corrupt(data: Split, rows: Iterable[int], value: float = math.nan, scale: float | None = None) -> Split:
    """A copy of ``data`` whose training inputs at ``rows`` are broken, to test a guard.

    With ``scale`` the rows are multiplied by it (a record read without normalization);
    otherwise their first feature is set to ``value`` (default NaN, a corrupted record).
    """
    rows = list(rows)
    n = len(data.y_train)
    if not rows or any(isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < n for r in rows):
        raise ValueError(f"rows must be a non-empty list of integers in [0, {n}), got {rows!r}")
    x = data.x_train.clone()
    if scale is not None:
        x[rows] *= positive_float("scale", scale)
    else:
        x.view(n, -1)[rows, 0] = value
    return Split(x, data.y_train, data.x_test, data.y_test)


@dataclass
class NanSource:
    """Where autograd's anomaly mode caught the first NaN: the backward op and its forward call."""

    op: str  # e.g. "SqrtBackward0"
    output: int  # which output of that backward function held the NaN
    code: str  # source text of the forward call that created it ("" if unavailable)
    location: str  # "File ..., line N, in fn" of that forward call ("" if unavailable)

    def __str__(self) -> str:
        return f"{self.op} returned NaN (output {self.output}), created by: {self.code or self.location}"


_ANOMALY = re.compile(r"Function '(\w+)' returned nan values in its (\d+)th output")


def find_nan_op(closure: Callable[[], None]) -> NanSource | None:
    """Run ``closure`` (a forward and ``backward()``) under ``torch.autograd.detect_anomaly``.

    Returns the first backward function that produced a NaN and the forward call that created
    it, or None if the backward pass stayed NaN-free. Anomaly mode checks backward outputs only
    and is slow: use it to debug one failing step, and :func:`first_nonfinite_output` for NaNs
    that already appear in the forward pass.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autograd.detect_anomaly(check_nan=True):
                closure()
        except RuntimeError as error:
            match = _ANOMALY.search(str(error))
            if match is None:
                raise
            return NanSource(match.group(1), int(match.group(2)), *_forward_call(caught))
    return None


def _forward_call(caught) -> tuple[str, str]:
    """(code, location) of the last frame of the forward traceback anomaly mode attaches as a warning."""
    for w in caught:
        lines = str(w.message).splitlines()
        if not lines or "Traceback of forward call" not in lines[0]:
            continue
        frames = [i for i, line in enumerate(lines) if line.strip().startswith("File ")]
        if frames:
            i = frames[-1]
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            code = "" if nxt.startswith(("File ", "(Triggered")) else nxt
            return code, lines[i].strip()
    return "", ""


def first_nonfinite_output(model: nn.Module, *inputs: torch.Tensor) -> str | None:
    """Run ``model(*inputs)`` and return the name of the first submodule whose output has inf/NaN.

    Forward hooks see modules in the order they run, so this names where a *forward* NaN began
    (which anomaly mode, a backward tool, cannot). A module returning a tuple (``nn.LSTM``,
    ``nn.MultiheadAttention``) is judged by its first tensor. Returns None if every output is finite.
    """
    return first_nonfinite_forward(model, *inputs)[0]


def first_nonfinite_forward(model: nn.Module, *inputs: torch.Tensor) -> tuple[str | None, bool]:
    """Like :func:`first_nonfinite_output`, and also whether that module's *input* was already non-finite.

    Returns ``(name, input_was_nonfinite)`` (``(None, False)`` if every output is finite). With finite
    model inputs, ``input_was_nonfinite`` means the inf/NaN arose between modules, in the forward code
    that no hook sees (a ``torch.log`` or a division written in ``forward``), not in the module named.
    """
    found: list[tuple[str, bool]] = []

    def finite(t) -> bool:
        return not (isinstance(t, torch.Tensor) and t.is_floating_point()) or bool(torch.isfinite(t).all())

    def hook(name):
        def check(module, args, output):
            out = first_tensor(output)  # a tuple's first tensor: nn.LSTM's output sequence, attention's output
            if not found and out is not None and not finite(out):
                found.append((name, not all(finite(a) for a in args)))
        return check

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if name and not list(m.children())]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else (None, False)
