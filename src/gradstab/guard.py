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
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ._check import positive_float, positive_int
from .data import Split, batches
from .device import resolve_seed, seed_everything
from .train import accuracy, make_optimizer


def _global_norm(model: nn.Module) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())


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
    """An in-memory copy of a model's and an optimizer's state, and the step it was taken at."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int = 0):
        self.save(model, optimizer, step)

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        self.step = step
        self._model = copy.deepcopy(model.state_dict())
        self._optimizer = copy.deepcopy(optimizer.state_dict())

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Load the saved state back into ``model`` and ``optimizer``; return the step it was saved at."""
        model.load_state_dict(self._model)
        optimizer.load_state_dict(self._optimizer)
        return self.step


class Checkpoints:
    """The last ``keep`` checkpoints. A rollback straight after a rollback (no healthy step in
    between) means the newest checkpoint already held the damage: it is discarded and the one
    before it restored, so a run can walk back past a bad checkpoint instead of looping on it.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, keep: int = 3):
        self._saved = deque([Checkpoint(model, optimizer, 0)], maxlen=positive_int("keep", keep))

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        self._saved.append(Checkpoint(model, optimizer, step))

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, again: bool = False) -> int:
        """Restore the newest checkpoint (the one before it if ``again``); return its step."""
        if again and len(self._saved) > 1:
            self._saved.pop()
        return self._saved[-1].restore(model, optimizer)


@dataclass
class Event:
    """One intervention: ``kind`` is ``"skip"`` or ``"rollback"``; ``row`` is the suspect training example."""

    step: int
    kind: str
    reason: str
    row: int
    restored_to: int | None = None

    def __str__(self) -> str:
        back = f", restored step {self.restored_to}" if self.restored_to is not None else ""
        return f"step {self.step}: {self.kind} ({self.reason}; suspect row {self.row}{back})"


@dataclass
class GuardedRun:
    """What :func:`guarded_train` did: loss and global gradient norm per step, and every intervention."""

    loss: list[float]
    grad_norm: list[float]
    events: list[Event]
    test_accuracy: float = float("nan")
    seconds: float = 0.0
    config: dict = field(default_factory=dict)

    def steps_where(self, kind: str) -> list[int]:
        return [e.step for e in self.events if e.kind == kind]

    @property
    def skipped(self) -> list[int]:
        return self.steps_where("skip")

    @property
    def rollbacks(self) -> list[int]:
        return self.steps_where("rollback")

    def report(self) -> str:
        """One line per intervention, then the outcome."""
        lines = [str(e) for e in self.events]
        lines.append(f"{len(self.loss)} steps, {len(self.skipped)} skipped, {len(self.rollbacks)} rollbacks, "
                     f"test accuracy {self.test_accuracy:.1%}")
        return "\n".join(lines)


def guarded_train(model: nn.Module, data: Split, *, lr: float, steps: int = 150, batch_size: int = 64,
                  optimizer: str = "sgd", momentum: float = 0.9, max_norm: float | None = None,
                  spike_factor: float = 3.0, spike_window: int = 20, checkpoint_every: int = 10,
                  keep: int = 3, patience: int = 3, lr_backoff: float = 1.0, seed: int | None = None) -> GuardedRun:
    """Train with cross-entropy like :func:`~gradstab.train.train`, but survive bad steps instead of stopping.

    - loss or any gradient non-finite: the update is skipped and reported;
    - loss above ``spike_factor`` x the largest of the last ``spike_window`` losses: model and
      optimizer are restored from the last checkpoint (taken every ``checkpoint_every`` healthy
      steps; the last ``keep`` are kept, see :class:`Checkpoints`), the batch is dropped and the
      learning rate is multiplied by ``lr_backoff``;
    - ``patience`` non-finite steps in a row (the weights themselves are broken): the same rollback.

    After the last step one more batch is evaluated (no update), so that damage done by the
    final steps is caught too; an event at step ``steps`` is that final check. Each event names
    the batch's *suspect row*: the training example with the largest (or a non-finite)
    per-example loss, which is where to look for a corrupted record.
    """
    positive_float("lr", lr)
    positive_int("steps", steps)
    positive_int("batch_size", batch_size)
    positive_int("checkpoint_every", checkpoint_every)
    if max_norm is not None:
        positive_float("max_norm", max_norm)
    seed = resolve_seed(seed)
    seed_everything(seed)
    model.to(data.device).train()
    opt = make_optimizer(model.parameters(), optimizer, lr, momentum, 0.0)
    guard = _Guard(model, opt, SpikeDetector(spike_factor, spike_window), Checkpoints(model, opt, keep),
                   patience, lr_backoff)
    run = GuardedRun([], [], [], config=dict(lr=lr, steps=steps, batch_size=batch_size, optimizer=optimizer,
                                             max_norm=max_norm, spike_factor=spike_factor, spike_window=spike_window,
                                             checkpoint_every=checkpoint_every, keep=keep, patience=patience,
                                             lr_backoff=lr_backoff, seed=seed))
    start = time.perf_counter()
    for step, idx in enumerate(batches(len(data.y_train), min(batch_size, len(data.y_train)), steps + 1, seed)):
        final = step == steps
        value, norm, suspect = _loss_and_grad(model, opt, data, idx.to(data.device), backward=not final)
        event = guard.judge(step, value, norm, suspect, final)
        if event is not None:
            run.events.append(event)
        if final:
            break
        run.grad_norm.append(norm)
        run.loss.append(math.nan if event is not None and event.kind == "skip" else value)
        if event is None:
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
            guard.accept(step, checkpoint_every)
    run.seconds = time.perf_counter() - start
    run.test_accuracy = accuracy(model, data.x_test, data.y_test)
    return run


def _loss_and_grad(model: nn.Module, opt: torch.optim.Optimizer, data: Split, idx: torch.Tensor,
                   backward: bool) -> tuple[float, float, int]:
    """Mean loss, global gradient norm (0 without ``backward``) and the row with the largest loss."""
    opt.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(backward):
        per_example = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx], reduction="none")
    loss = per_example.mean()
    norm = 0.0
    if backward:
        loss.backward()
        norm = float(_global_norm(model))
    suspect = int(idx[torch.nan_to_num(per_example.detach(), nan=math.inf).argmax()])
    return float(loss.detach()), norm, suspect


class _Guard:
    """The decisions of :func:`guarded_train`: skip, roll back, or accept a step."""

    def __init__(self, model, opt, detector: SpikeDetector, checkpoints: Checkpoints, patience: int,
                 lr_backoff: float):
        self.model, self.opt, self.detector, self.checkpoints = model, opt, detector, checkpoints
        self.patience = positive_int("patience", patience)
        self.lr_backoff = positive_float("lr_backoff", lr_backoff)
        if lr_backoff > 1:
            raise ValueError(f"lr_backoff must lie in (0, 1], got {lr_backoff!r}")
        self.lr = opt.param_groups[0]["lr"]
        self.in_a_row = self.healthy = 0
        self.just_rolled_back = False

    def judge(self, step: int, value: float, norm: float, suspect: int, final: bool = False) -> Event | None:
        """None for a healthy step, else the skip or rollback event (a rollback is carried out here)."""
        finite = math.isfinite(value) and math.isfinite(norm)
        self.in_a_row = 0 if finite else self.in_a_row + 1
        if not finite and self.in_a_row < self.patience and not final:
            return Event(step, "skip", f"loss {value:.3g}, non-finite loss or gradient", suspect)
        if finite and not self.detector(value):
            return None
        if finite:
            reason = f"loss {value:.3g} > {self.detector.factor:g} x recent max {self.detector.baseline:.3g}"
        else:
            reason = f"loss {value:.3g}, {self.in_a_row} non-finite steps in a row"
        return Event(step, "rollback", ("final check: " if final else "") + reason, suspect, self._roll_back())

    def _roll_back(self) -> int:
        restored = self.checkpoints.restore(self.model, self.opt, again=self.just_rolled_back)  # and the saved lr
        self.just_rolled_back, self.in_a_row = True, 0
        self.lr *= self.lr_backoff
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        return restored

    def accept(self, step: int, every: int) -> None:
        """A healthy update was applied at ``step``: count it, and checkpoint every ``every`` of them."""
        self.healthy, self.just_rolled_back = self.healthy + 1, False
        if self.healthy % every == 0:
            self.checkpoints.save(self.model, self.opt, step + 1)


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
    (which anomaly mode, a backward tool, cannot). Returns None if every output is finite.
    """
    found: list[str] = []

    def hook(name):
        def check(module, args, output):
            if not found and isinstance(output, torch.Tensor) and not bool(torch.isfinite(output).all()):
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if name and not list(m.children())]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None
