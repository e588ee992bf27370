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
    p.grad = torch.zeros(3)
    decoupled_weight_decay_(p, lr=0.1, weight_decay=0.5)  # leaf with requires_grad: needs no_grad
    torch.testing.assert_close(p.detach(), torch.tensor([0.95, -1.9, 3.8]))
    decoupled_weight_decay_(p, lr=0.0, weight_decay=0.5)  # lr 0 (start of a warmup): no change
    torch.testing.assert_close(p.detach(), torch.tensor([0.95, -1.9, 3.8]))
    p.grad = None
    decoupled_weight_decay_([p], lr=0.1, weight_decay=0.5)  # no gradient: left alone, as AdamW does
    torch.testing.assert_close(p.detach(), torch.tensor([0.95, -1.9, 3.8]))


class WithUnused(nn.Module):
    """A model with a frozen layer and a layer the forward never reaches: neither gets a gradient."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.frozen, self.unused = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 5)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.frozen(torch.tanh(self.body(x))))


def test_decoupled_decay_skips_parameters_without_grad_like_adamw():
    wd, lr = 0.5, 0.01
    ours, ref = WithUnused(), WithUnused()
    start = [p.detach().clone() for p in ours.parameters()]
    opt = torch.optim.Adam(ours.parameters(), lr=lr, weight_decay=0.0)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=wd)
    for step in range(3):
        for model, o in ((ours, opt), (ref, opt_ref)):
            o.zero_grad()
            data_loss(model, step).backward()
        decoupled_weight_decay_(ours.parameters(), lr, wd)
        opt.step()
        opt_ref.step()
    assert_same_params(ours, ref)
    for (name, p), p0 in zip(ours.named_parameters(), start, strict=True):
        moved = not torch.equal(p.detach(), p0)
        assert moved == name.startswith(("body", "head")), name  # frozen and unused stay as they were


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda ps: l2_penalty(ps, -0.1), "weight_decay"),
        (lambda ps: l2_penalty(ps, float("nan")), "weight_decay"),
        (lambda ps: l1_penalty(ps, -1e-3), "strength"),
        (lambda ps: decoupled_weight_decay_(ps, 0.1, -0.01), "weight_decay"),
        (lambda ps: decoupled_weight_decay_(ps, float("nan"), 0.01), "lr"),
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


def test_dropout_eval_and_p0_return_the_input_like_torch():
    x = torch.randn(4, 7)
    for drop in (Dropout(0.6).eval(), Dropout(0.0).train(), Dropout(0).train(), nn.Dropout(0.6).eval(),
                 nn.Dropout(0.0).train()):
        assert drop(x) is x
    empty = torch.empty(0, 3)
    assert Dropout(0.5)(empty) is empty


def test_dropout_is_random_across_calls():
    drop = Dropout(0.5)
    x = torch.ones(1000)
    assert not torch.equal(drop(x), drop(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_same_seed_same_output_as_torch(p, dtype):
    x = torch.randn(50, 40).to(dtype).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn(50, 40).to(dtype)
    torch.manual_seed(7)
    y = Dropout(p)(x)
    torch.manual_seed(7)
    y_ref = nn.Dropout(p)(x_ref)
    assert y.dtype == dtype and torch.equal(y, y_ref)  # bit for bit
    y.backward(grad_out)
    y_ref.backward(grad_out)
    assert torch.equal(x.grad, x_ref.grad)


def test_dropout_inplace_like_torch():
    x = torch.randn(30, 20)
    a, b = x.clone(), x.clone()
    torch.manual_seed(3)
    out = Dropout(0.4, inplace=True)(a)
    torch.manual_seed(3)
    nn.Dropout(0.4, inplace=True)(b)
    assert out is a and torch.equal(a, b) and not torch.equal(a, x)


def test_dropout_p1_drops_everything_like_torch():
    x = torch.tensor([1.0, -2.0, math.nan, math.inf])
    y, y_ref = Dropout(1.0)(x), nn.Dropout(1.0)(x)
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    assert torch.equal(y[:2], torch.zeros(2)) and y[2:].isnan().all()


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), True, "0.5"])
def test_dropout_bad_p(bad):
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\], got"):
        Dropout(bad)


def test_dropout_repr_matches_torch():
    assert repr(Dropout(0.25)) == repr(nn.Dropout(0.25)) == "Dropout(p=0.25, inplace=False)"
    assert repr(Dropout(0.25, inplace=True)) == repr(nn.Dropout(0.25, inplace=True))
    assert Dropout().p == 0.5
