"""gradstab.clip vs torch.nn.utils (value / norm clipping) and an independent AGC reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gradstab.clip import (
    adaptive_clip_grad_,
    agc_parameters,
    clip_grad_norm_,
    clip_grad_value_,
    unitwise_norm,
)


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


def model_pair(grad_scale: float = 1.0) -> tuple[nn.Sequential, nn.Sequential]:
    """Two identical models with identical grads; the last bias has no grad."""
    model = make_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, 6, generator=g)
    target = torch.randn(2, 3, generator=g)
    loss = ((model(x) - target) ** 2).sum() * grad_scale
    loss.backward()
    model[5].bias.grad = None  # a parameter without a gradient
    twin = copy.deepcopy(model)  # deepcopy does not carry .grad over
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    return model, twin


def grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in model.parameters()]


def assert_same_grads(a: nn.Module, b: nn.Module) -> None:
    for ga, gb in zip(grads(a), grads(b), strict=True):
        if ga is None or gb is None:
            assert ga is None and gb is None
        else:
            torch.testing.assert_close(ga, gb, equal_nan=True)


# ------------------------------------------------------------------ value clipping


@pytest.mark.parametrize("clip_value", [1e-3, 0.05, 100.0])
def test_clip_grad_value_matches_torch(clip_value):
    ours, ref = model_pair()
    before = [g.clone() for g in grads(ours) if g is not None]
    assert clip_grad_value_(ours.parameters(), clip_value) is None
    torch.nn.utils.clip_grad_value_(ref.parameters(), clip_value)
    assert_same_grads(ours, ref)
    after = [g for g in grads(ours) if g is not None]
    assert all(g.abs().max() <= clip_value for g in after)
    changed = any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert changed == (clip_value < 1.0)


def test_clip_grad_value_single_tensor():
    p = torch.zeros(5, requires_grad=True)
    p.grad = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0])
    clip_grad_value_(p, 1.0)
    assert torch.equal(p.grad, torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan")])
def test_clip_grad_value_bad_value(bad):
    with pytest.raises(ValueError, match="clip_value"):
        clip_grad_value_(make_model().parameters(), bad)


# ------------------------------------------------------------------- norm clipping

NORM_TYPES = [1, 2, 2.0, float("inf"), "inf"]


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("max_norm", [0.05, 1e4], ids=["clips", "no_op"])
def test_clip_grad_norm_matches_torch(norm_type, max_norm):
    ours, ref = model_pair()
    before = [None if g is None else g.clone() for g in grads(ours)]
    total = clip_grad_norm_(ours.parameters(), max_norm, norm_type)
    total_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type)
    torch.testing.assert_close(total, total_ref)
    assert_same_grads(ours, ref)

    # independent check of the returned value: norm of all grads flattened together
    flat = torch.cat([g.flatten() for g in before if g is not None])
    p = math.inf if norm_type == "inf" else float(norm_type)
    torch.testing.assert_close(total, torch.linalg.vector_norm(flat, p))
    if max_norm < total:  # clipped: the new global norm is max_norm
        new_flat = torch.cat([g.flatten() for g in grads(ours) if g is not None])
        torch.testing.assert_close(torch.linalg.vector_norm(new_flat, p), torch.tensor(max_norm), rtol=1e-4, atol=0)
    else:
        assert all(torch.equal(a, b) for a, b in zip(before, grads(ours), strict=True) if a is not None)


@pytest.mark.parametrize("norm_type", [1, 2, "inf"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, "inf_and_nan"])
def test_clip_grad_norm_nonfinite_matches_torch(norm_type, bad):
    ours, ref = model_pair()
    for model in (ours, ref):
        g = model[3].weight.grad
        if bad == "inf_and_nan":
            g[0, 0], g[1, 1] = math.inf, math.nan
        else:
            g[0, 0] = bad
    total = clip_grad_norm_(ours.parameters(), 1.0, norm_type)
    total_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0, norm_type)
    torch.testing.assert_close(total, total_ref, equal_nan=True)
    assert not torch.isfinite(total)
    assert_same_grads(ours, ref)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_clip_grad_norm_error_if_nonfinite(bad):
    ours, ref = model_pair()
    for model in (ours, ref):
        model[0].bias.grad[0] = bad
    before = [None if g is None else g.clone() for g in grads(ours)]
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(ours.parameters(), 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0, error_if_nonfinite=True)
    for a, b in zip(before, grads(ours), strict=True):  # nothing was modified
        assert (a is None and b is None) or torch.equal(a.nan_to_num(), b.nan_to_num())
    # finite grads with the flag on: no error, normal result
    finite, _ = model_pair()
    clip_grad_norm_(finite.parameters(), 1.0, error_if_nonfinite=True)


def test_clip_grad_norm_single_tensor_and_generator():
    ours, ref = model_pair()
    w, w_ref = ours[3].weight, ref[3].weight
    torch.testing.assert_close(clip_grad_norm_(w, 0.01), torch.nn.utils.clip_grad_norm_(w_ref, 0.01))
    torch.testing.assert_close(w.grad, w_ref.grad)
    gen = (p for p in ours.parameters())
    gen_ref = (p for p in ref.parameters())
    torch.testing.assert_close(clip_grad_norm_(gen, 0.001), torch.nn.utils.clip_grad_norm_(gen_ref, 0.001))
    assert_same_grads(ours, ref)


def test_clip_grad_norm_no_grads_returns_zero():
    model = make_model()
    total = clip_grad_norm_(model.parameters(), 1.0)
    assert isinstance(total, torch.Tensor) and total.item() == 0.0
    assert clip_grad_norm_([], 1.0).item() == 0.0


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan")])
def test_clip_grad_norm_bad_max_norm(bad):
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_(make_model().parameters(), bad)


@pytest.mark.parametrize("bad", [0, 3, 0.5, -1, float("-inf"), "fro", "two", True])
def test_clip_grad_norm_bad_norm_type(bad):
    model, _ = model_pair()
    before = [None if g is None else g.clone() for g in grads(model)]
    with pytest.raises(ValueError, match="norm_type"):
        clip_grad_norm_(model.parameters(), 1e-3, bad)
    for a, b in zip(before, grads(model), strict=True):  # checks happen before any change
        assert (a is None and b is None) or torch.equal(a, b)


# ------------------------------------------------------------------------------ AGC


def agc_reference(param: torch.Tensor, grad: torch.Tensor, clip_factor, eps) -> torch.Tensor:
    """Row-by-row AGC; 0-/1-D tensors are a single unit."""
    out = grad.clone()
    if param.dim() <= 1:
        units = [(slice(None), param.detach(), grad)]
    else:
        units = [(i, param.detach()[i], grad[i]) for i in range(param.shape[0])]
    for index, w_i, g_i in units:
        w_norm = max(math.sqrt(float((w_i.double() ** 2).sum())), eps)
        g_norm = math.sqrt(float((g_i.double() ** 2).sum()))
        if g_norm > clip_factor * w_norm:
            out[index] = g_i * (clip_factor * w_norm / g_norm)
    return out


@pytest.mark.parametrize("clip_factor,eps", [(0.01, 1e-3), (0.1, 1e-3), (0.05, 0.5)])
def test_adaptive_clip_grad_matches_reference(clip_factor, eps):
    model, _ = model_pair()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        model[0].bias.zero_()  # ||W|| = 0 -> eps floor is used for this unit
        for p in model.parameters():
            if p.grad is not None:  # spread grad magnitudes so some units clip, some don't
                scale = torch.logspace(-4, 1, p.shape[0])[torch.randperm(p.shape[0], generator=g)]
                p.grad.mul_(scale.view(-1, *[1] * (p.dim() - 1)))
    params = list(model.parameters())
    expected = [None if p.grad is None else agc_reference(p, p.grad, clip_factor, eps) for p in params]
    before = [None if p.grad is None else p.grad.clone() for p in params]

    assert adaptive_clip_grad_(params, clip_factor=clip_factor, eps=eps) is None

    n_clipped = n_kept = 0
    for p, exp, old in zip(params, expected, before, strict=True):
        if exp is None:
            assert p.grad is None
            continue
        torch.testing.assert_close(p.grad, exp)
        rows = range(p.shape[0]) if p.dim() > 1 else [slice(None)]
        for i in rows:
            if torch.equal(p.grad[i], old[i]):
                n_kept += 1
            else:
                n_clipped += 1
    assert n_clipped > 0 and n_kept > 0  # both branches exercised


def test_unitwise_norm_shapes():
    w = torch.randn(5, 3, 2, 2)
    n = unitwise_norm(w)
    assert n.shape == (5, 1, 1, 1)
    torch.testing.assert_close(n.flatten(), w.flatten(1).norm(dim=1))
    assert unitwise_norm(torch.randn(6, 4)).shape == (6, 1)
    b = torch.tensor([3.0, 4.0])
    assert unitwise_norm(b).shape == () and unitwise_norm(b).item() == pytest.approx(5.0)
    assert unitwise_norm(torch.tensor(-2.0)).item() == pytest.approx(2.0)


def test_adaptive_clip_grad_vector_is_one_unit():
    p = torch.tensor([3.0, 4.0], requires_grad=True)  # ||W|| = 5
    p.grad = torch.tensor([0.0, 1.0])  # ||G|| = 1 > 0.1 * 5
    adaptive_clip_grad_([p], clip_factor=0.1)
    torch.testing.assert_close(p.grad, torch.tensor([0.0, 0.5]))
    adaptive_clip_grad_(p, clip_factor=0.1)  # already at the threshold: unchanged
    torch.testing.assert_close(p.grad, torch.tensor([0.0, 0.5]))


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("clip_factor", {"clip_factor": 0.0}),
        ("clip_factor", {"clip_factor": -0.01}),
        ("eps", {"eps": 0.0}),
        ("eps", {"eps": -1e-3}),
    ],
)
def test_adaptive_clip_grad_bad_args(name, kwargs):
    with pytest.raises(ValueError, match=name):
        adaptive_clip_grad_(make_model().parameters(), **kwargs)


def test_agc_parameters_excludes_last_linear():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.Flatten(),
        nn.Linear(4, 5),
        nn.Sequential(nn.ReLU(), nn.Linear(5, 6)),  # the last Linear is nested
        nn.LayerNorm(6),  # comes after the head in module order: kept
    )
    head = model[3][1]
    got = agc_parameters(model)
    head_ids = {id(head.weight), id(head.bias)}
    assert {id(p) for p in got} == {id(p) for p in model.parameters()} - head_ids
    assert len(got) == len(list(model.parameters())) - 2
    assert [id(p) for p in agc_parameters(model, exclude_last=False)] == [id(p) for p in model.parameters()]


def test_agc_parameters_without_linear_and_shared():
    conv = nn.Conv2d(1, 1, 1)
    model = nn.Sequential(conv, nn.ReLU(), conv)  # shared module listed once
    assert [id(p) for p in agc_parameters(model)] == [id(conv.weight), id(conv.bias)]
