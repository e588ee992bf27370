"""gradstab.regularize vs torch.optim weight decay, plus statistical checks of Dropout."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gradstab.regularize import (
    Dropout,
    decay_parameters,
    decoupled_weight_decay_,
    l1_penalty,
    l2_penalty,
)


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)


def data_loss(model: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    return ((model(x) - y) ** 2).mean()


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- penalties


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_l2_penalty_step_equals_sgd_weight_decay(momentum):
    wd, lr = 0.1, 0.2
    ours, ref = make_model(), make_model()
    opt = torch.optim.SGD(ours.parameters(), lr=lr, momentum=momentum)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    start = copy.deepcopy(ours)
    for step in range(3):
        opt.zero_grad()
        (data_loss(ours, step) + l2_penalty(ours.parameters(), wd)).backward()
        opt.step()
        opt_ref.zero_grad()
        data_loss(ref, step).backward()
        opt_ref.step()
    assert_same_params(ours, ref)
    # and the decay really mattered: without it the result differs
    plain = start
    opt_plain = torch.optim.SGD(plain.parameters(), lr=lr, momentum=momentum)
    for step in range(3):
        opt_plain.zero_grad()
        data_loss(plain, step).backward()
        opt_plain.step()
    assert not torch.allclose(plain[0].weight, ref[0].weight, atol=1e-4)


def test_l2_penalty_value_and_gradient():
    model = make_model()
    params = list(model.parameters())
    wd = 0.3
    penalty = l2_penalty(params, wd)
    expected = wd / 2 * sum(float((p.detach().double() ** 2).sum()) for p in params)
    assert penalty.item() == pytest.approx(expected, rel=1e-6)
    penalty.backward()
    for p in params:
        torch.testing.assert_close(p.grad, wd * p.detach())
    assert l2_penalty(params[0], 0.0).item() == 0.0  # single tensor, zero decay
    assert l2_penalty([], 0.1).item() == 0.0


def test_l1_penalty_value_and_gradient():
    model = make_model()
    params = list(model.parameters())
    with torch.no_grad():
        params[1][0] = 0.0  # sign(0) = 0: torch's abs() subgradient at 0
    strength = 0.05
    penalty = l1_penalty(params, strength)
    expected = strength * sum(float(p.detach().double().abs().sum()) for p in params)
    assert penalty.item() == pytest.approx(expected, rel=1e-6)
    penalty.backward()
    for p in params:
        torch.testing.assert_close(p.grad, strength * torch.sign(p.detach()))
    assert params[1].grad[0].item() == 0.0


@pytest.mark.parametrize("steps", [1, 3])
def test_decoupled_decay_plus_adam_equals_adamw(steps):
    wd, lr = 0.5, 0.01
    ours, ref = make_model(), make_model()
    opt = torch.optim.Adam(ours.parameters(), lr=lr, weight_decay=0.0)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=wd)
    for step in range(steps):
        opt.zero_grad()
        data_loss(ours, step).backward()
        decoupled_weight_decay_(ours.parameters(), lr, wd)
        opt.step()
        opt_ref.zero_grad()
        data_loss(ref, step).backward()
        opt_ref.step()
    assert_same_params(ours, ref)
    # coupled (L2-in-Adam) decay is a different algorithm: must not match AdamW
    coupled = make_model()
    opt_coupled = torch.optim.Adam(coupled.parameters(), lr=lr, weight_decay=wd)
    for step in range(steps):
        opt_coupled.zero_grad()
        data_loss(coupled, step).backward()
        opt_coupled.step()
    assert not torch.allclose(coupled[0].weight, ref[0].weight, atol=1e-5)


def test_decoupled_weight_decay_formula_and_no_grad():
    p = nn.Parameter(torch.tensor([1.0, -2.0, 4.0]))
    decoupled_weight_decay_(p, lr=0.1, weight_decay=0.5)  # leaf with requires_grad: needs no_grad
    torch.testing.assert_close(p.detach(), torch.tensor([0.95, -1.9, 3.8]))
    assert p.grad is None


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda ps: l2_penalty(ps, -0.1), "weight_decay"),
        (lambda ps: l2_penalty(ps, float("nan")), "weight_decay"),
        (lambda ps: l1_penalty(ps, -1e-3), "strength"),
        (lambda ps: decoupled_weight_decay_(ps, 0.1, -0.01), "weight_decay"),
        (lambda ps: decoupled_weight_decay_(ps, 0.0, 0.01), "lr"),
        (lambda ps: decoupled_weight_decay_(ps, -0.1, 0.01), "lr"),
    ],
)
def test_bad_arguments(call, name):
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=name):
        call(model.parameters())
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)


def test_decay_parameters_split():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3))
    decay, no_decay = decay_parameters(model)
    assert [id(p) for p in decay] == [id(model[0].weight), id(model[3].weight)]
    assert {id(p) for p in no_decay} == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[3].bias)}


# --------------------------------------------------------------------------- Dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_statistics(p):
    torch.manual_seed(123)
    n_elem, n_samples = 200, 1000
    x = torch.rand(n_elem) * 2 + 0.5  # values in [0.5, 2.5]
    drop = Dropout(p)
    out = drop(x.expand(n_samples, n_elem).contiguous())
    keep = 1.0 - p

    # kept entries are scaled by exactly 1/(1-p); the rest are exactly zero
    zero = out == 0
    torch.testing.assert_close(out[~zero], (x / keep).expand_as(out)[~zero])

    # fraction of zeros ~ Binomial(N, p)/N: allow 5 standard deviations
    n_total = n_samples * n_elem
    assert abs(zero.float().mean().item() - p) < 5 * math.sqrt(p * keep / n_total)

    # per-element mean over samples ~ x; std of one output is x*sqrt(p/(1-p))
    mean = out.mean(dim=0)
    sigma = x * math.sqrt(p / keep) / math.sqrt(n_samples)
    assert ((mean - x).abs() < 5.5 * sigma).all()
    # overall mean: much tighter
    overall_sigma = math.sqrt((x**2).mean().item() * p / keep / n_total)
    assert abs(out.mean().item() - x.mean().item()) < 5 * overall_sigma


def test_dropout_gradient_uses_same_mask():
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    out = Dropout(0.3)(x)
    out.sum().backward()
    mask = (out != 0).float()
    torch.testing.assert_close(x.grad, mask / 0.7)


def test_dropout_eval_and_p0_are_identity():
    x = torch.randn(4, 7)
    drop = Dropout(0.6).eval()
    assert torch.equal(drop(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(0).train()(x), x)


def test_dropout_is_random_across_calls():
    drop = Dropout(0.5)
    x = torch.ones(1000)
    assert not torch.equal(drop(x), drop(x))


@pytest.mark.parametrize("bad", [1.0, 1, 1.5, -0.1, float("nan")])
def test_dropout_bad_p(bad):
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\), got"):
        Dropout(bad)


def test_dropout_bad_p_message():
    with pytest.raises(ValueError, match=r"^p must lie in \[0, 1\), got 1\.0$"):
        Dropout(1.0)


def test_dropout_repr():
    assert repr(Dropout(0.25)) == "Dropout(p=0.25)"
    assert Dropout().p == 0.5
