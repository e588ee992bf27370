"""gradstab.guard: skip non-finite steps, roll back after spikes, locate the op that made a NaN."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradstab as gs
from gradstab.guard import (
    Checkpoint,
    SpikeDetector,
    corrupt,
    find_nan_op,
    first_nonfinite_output,
    grads_finite,
    guarded_train,
)


@pytest.fixture(scope="module")
def flat(digits):
    return digits.flat()  # conftest's digits, on GRADSTAB_TEST_DEVICE (CPU by default)


def test_injected_nan_is_skipped_and_reported(flat):
    bad = corrupt(flat, [7])
    stopped = gs.train(gs.mlp(2), bad, lr=0.05, steps=30)
    assert stopped.diverged  # the plain loop stops at the first batch holding row 7
    model = gs.mlp(2)
    run = guarded_train(model, bad, lr=0.05, steps=30)
    assert len(run.loss) == 30 and run.skipped and not run.rollbacks
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(e.row == 7 and "non-finite" in e.reason for e in run.events)
    assert all(math.isnan(run.loss[s]) for s in run.skipped)
    assert "skipped" in run.report() and run.test_accuracy > 0.5


def test_spike_triggers_rollback_and_training_continues(flat):
    bad = corrupt(flat, [7, 300], scale=1000.0)
    assert gs.train(gs.mlp(4), bad, lr=0.05, steps=100).diverged
    run = guarded_train(gs.mlp(4), bad, lr=0.05, steps=100)
    assert run.rollbacks and len(run.loss) == 100
    first = run.events[0]
    assert first.kind == "rollback" and first.restored_to <= first.step
    assert first.step < 99 and run.test_accuracy > 0.8  # training went on (the final check guards the end)


def test_clean_run_has_no_events(flat):
    run = guarded_train(gs.mlp(2), flat, lr=0.05, steps=60)
    assert run.events == [] and run.test_accuracy > 0.8


def test_patience_rolls_back_when_every_step_is_nonfinite(flat):
    model = gs.mlp(1)
    run_data = corrupt(flat, list(range(len(flat.y_train))))  # every row broken
    run = guarded_train(model, run_data, lr=0.05, steps=7, patience=3)
    kinds = [e.kind for e in run.events]
    assert kinds == ["skip", "skip", "rollback", "skip", "skip", "rollback", "skip", "rollback"]
    assert run.events[-1].step == 7 and "final check" in run.events[-1].reason  # the check after the last step


def test_spike_detector():
    det = SpikeDetector(factor=3.0, window=4, min_history=2)
    assert not det(1.0)
    assert not det(10.0)  # not armed yet: accepted
    assert det(31.0) and det.baseline == 10.0  # 31 > 3 x max(1, 10); not added
    assert not det(29.0)


def test_checkpoint_restores_model_and_optimizer():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    ckpt = Checkpoint(model, opt, step=5)
    saved = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    opt.param_groups[0]["lr"] = 99.0
    assert ckpt.restore(model, opt) == 5
    assert torch.equal(model.weight, saved) and opt.param_groups[0]["lr"] == 0.1


def test_grads_finite():
    p = nn.Parameter(torch.ones(3))
    assert grads_finite([p])
    p.grad = torch.tensor([0.0, math.inf, 1.0])
    assert not grads_finite([p])


def test_find_nan_op_names_sqrt_in_where():
    x = torch.tensor([-1.0, 0.5, 4.0], requires_grad=True)

    def step():
        y = torch.where(x > 0, x.sqrt(), torch.zeros_like(x))
        y.sum().backward()

    source = find_nan_op(step)
    assert source is not None and source.op == "SqrtBackward0" and source.output == 0
    assert "x.sqrt()" in source.code and "SqrtBackward0" in str(source)
    ok = torch.tensor([1.0, 4.0], requires_grad=True)
    assert find_nan_op(lambda: ok.sqrt().sum().backward()) is None


def test_first_nonfinite_output(flat):
    x = flat.x_train[:4].clone()
    model = gs.mlp(2).to(x.device)
    assert first_nonfinite_output(model, x) is None
    x[0, 0] = math.nan
    assert first_nonfinite_output(model, x) == "stem.0"


@pytest.mark.parametrize("kwargs", [dict(lr=0), dict(lr=0.1, checkpoint_every=0), dict(lr=0.1, patience=0),
                                    dict(lr=0.1, lr_backoff=2.0), dict(lr=0.1, spike_factor=1.0),
                                    dict(lr=0.1, optimizer="rmsprop")])
def test_bad_arguments(flat, kwargs):
    with pytest.raises(ValueError):
        guarded_train(gs.mlp(1), flat, steps=1, **kwargs)


def test_corrupt_checks_rows(flat):
    with pytest.raises(ValueError, match="rows"):
        corrupt(flat, [len(flat.y_train)])
    with pytest.raises(ValueError, match="rows"):
        corrupt(flat, [])
    scaled = corrupt(flat, [3], scale=10.0)
    assert torch.allclose(scaled.x_train[3], flat.x_train[3] * 10)
    assert torch.equal(scaled.x_train[4], flat.x_train[4])


def test_guarded_run_is_the_one_history(flat):
    from gradstab.train import History

    run = guarded_train(gs.mlp(1), flat, lr=0.05, steps=3)
    assert isinstance(run, History) and gs.GuardedRun is History
    assert run.config["skip_nonfinite"] and run.config["rollback"] and len(run.grad_norms) == 3


def test_guard_decisions():
    from gradstab.guard import ACCEPT, ROLLBACK, SKIP, STOP, Guard

    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nan, ok = torch.tensor(math.nan), torch.tensor(1.0)
    plain = Guard(model, opt)
    assert plain.judge(0, ok, torch.tensor(False))[0] == ACCEPT and plain.judge(1, nan, torch.tensor(True))[0] == STOP
    skip = Guard(model, opt, skip_nonfinite=True, patience=2)
    assert [skip.judge(t, nan, torch.tensor(True))[0] for t in range(2)] == [SKIP, STOP]
    back = Guard(model, opt, rollback=True, lr_backoff=0.5)
    action, reason = back.judge(0, nan, torch.tensor(True))
    assert action == ROLLBACK and "1 non-finite steps in a row" in reason
    assert back.carry_out(action) == 0 and back.lr_factor == 0.5
    limit = Guard(model, opt, skip_nonfinite=True, loss_limit=2.0)
    assert limit.judge(0, torch.tensor(3.0), torch.tensor(True)) == (SKIP, "loss 3, loss above loss_limit=2")


def test_lr_backoff_halves_the_rate_after_each_rollback(flat):
    bad = corrupt(flat, list(range(len(flat.y_train))))  # every step non-finite: rollbacks after each patience
    model = gs.mlp(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = gs.train(model, bad, optimizer=opt, steps=6, skip_nonfinite=True, rollback=True, patience=3,
                   lr_backoff=0.5)
    assert run.rollbacks == [2, 5, 6] and opt.param_groups[0]["lr"] == 0.1  # the backoff is applied per step only


def test_rollback_restores_the_scheduler_too(flat):
    bad = corrupt(flat, [7])
    model = gs.mlp(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)
    run = gs.train(model, bad, optimizer=opt, scheduler=sched, steps=30, rollback=True, checkpoint_every=100)
    applied = 30 - len(run.rollbacks) - len(run.skipped)
    assert run.rollbacks and sched.last_epoch < applied  # restored to the checkpoint of step 0 at each rollback


def test_first_nonfinite_output_sees_inside_a_tuple_output():
    """nn.LSTM returns (output, (h, c)): its output sequence is what gets checked."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 5, batch_first=True))
    x = torch.randn(2, 6, 3)
    assert gs.first_nonfinite_output(model, x) is None
    with torch.no_grad():
        model[1].weight_hh_l0[0, 0] = float("nan")
    assert gs.first_nonfinite_output(model, x) == "1"
