"""gradstab.clip vs torch.nn.utils (value / norm clipping, every norm type, foreach path, mixed dtypes),
an independent AGC reference, and AGC's exclusion taken from the forward pass."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import gradstab as gs
from gradstab.clip import (
    adaptive_clip_grad_,
    agc_parameters,
    clip_grad_norm_,
    clip_grad_value_,
    output_module,
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


def mixed_pair(dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64), scale=1.0):
    """Two lists of parameters of several dtypes with identical grads (and one without a grad)."""
    g = torch.Generator().manual_seed(3)
    shapes = [(5, 3), (7,), (2, 3, 2), (4,)]
    ours, ref = [], []
    for i, shape in enumerate(shapes * 2):
        dtype = dtypes[i % len(dtypes)]
        grad = (torch.randn(shape, generator=g) * scale).to(dtype)
        for params in (ours, ref):
            p = nn.Parameter(torch.zeros(shape, dtype=dtype))
            p.grad = None if i == 5 else grad.clone()
            params.append(p)
    return ours, ref


def assert_same_list_grads(a: list, b: list) -> None:
    for p, q in zip(a, b, strict=True):
        if p.grad is None or q.grad is None:
            assert p.grad is None and q.grad is None
        else:
            assert p.grad.dtype == q.grad.dtype
            torch.testing.assert_close(p.grad, q.grad, equal_nan=True)


def unchanged(model: nn.Module):
    """A check that the model's grads are what they are now."""
    before = [None if g is None else g.clone() for g in grads(model)]

    def check():
        for a, b in zip(before, grads(model), strict=True):
            assert (a is None and b is None) or torch.equal(a, b)

    return check


FOREACH = pytest.mark.parametrize("foreach", [None, True, False], ids=["foreach-None", "foreach", "loop"])


# ------------------------------------------------------------------ value clipping


@FOREACH
@pytest.mark.parametrize("clip_value", [0.0, 1e-3, 0.05, 100.0, math.inf])
def test_clip_grad_value_matches_torch(clip_value, foreach):
    ours, ref = model_pair()
    before = [g.clone() for g in grads(ours) if g is not None]
    assert clip_grad_value_(ours.parameters(), clip_value, foreach=foreach) is None
    torch.nn.utils.clip_grad_value_(ref.parameters(), clip_value, foreach=foreach)
    assert_same_grads(ours, ref)
    after = [g for g in grads(ours) if g is not None]
    assert all(g.abs().max() <= clip_value for g in after)
    changed = any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert changed == (clip_value < 1.0)


@FOREACH
def test_clip_grad_value_mixed_dtypes_and_nan_match_torch(foreach):
    ours, ref = mixed_pair(scale=10.0)
    for params in (ours, ref):
        params[0].grad[0, 0] = math.nan
        params[1].grad[0] = -math.inf
    clip_grad_value_(ours, 0.5, foreach=foreach)
    torch.nn.utils.clip_grad_value_(ref, 0.5, foreach=foreach)
    assert_same_list_grads(ours, ref)
    assert math.isnan(ours[0].grad[0, 0]) and ours[1].grad[0] == -0.5


def test_clip_grad_value_single_tensor():
    p = torch.zeros(5, requires_grad=True)
    p.grad = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0])
    clip_grad_value_(p, 1.0)
    assert torch.equal(p.grad, torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))


@pytest.mark.parametrize("bad", [-1.0, -math.inf, math.nan, None, "big", True])
def test_clip_grad_value_bad_value(bad):
    model, _ = model_pair()
    check = unchanged(model)
    with pytest.raises(ValueError, match="clip_value"):
        clip_grad_value_(model.parameters(), bad)
    check()


# ------------------------------------------------------------------- norm clipping

NORM_TYPES = [0.5, 1, 2, 2.0, 3, math.inf, "inf"]


def as_order(norm_type) -> float:
    return float(norm_type)


@FOREACH
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("max_norm", [0.05, 1e4], ids=["clips", "no_op"])
def test_clip_grad_norm_matches_torch(norm_type, max_norm, foreach):
    ours, ref = model_pair()
    before = [None if g is None else g.clone() for g in grads(ours)]
    total = clip_grad_norm_(ours.parameters(), max_norm, norm_type, foreach=foreach)
    total_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type, foreach=foreach)
    torch.testing.assert_close(total, total_ref)
    assert_same_grads(ours, ref)

    # independent check of the returned value: norm of all grads flattened together
    flat = torch.cat([g.flatten() for g in before if g is not None])
    p = as_order(norm_type)
    torch.testing.assert_close(total, torch.linalg.vector_norm(flat, p))
    if max_norm < total:  # clipped: the new global norm is max_norm
        new_flat = torch.cat([g.flatten() for g in grads(ours) if g is not None])
        torch.testing.assert_close(torch.linalg.vector_norm(new_flat, p), torch.tensor(max_norm), rtol=1e-4, atol=0)
    else:
        assert all(torch.equal(a, b) for a, b in zip(before, grads(ours), strict=True) if a is not None)


@FOREACH
@pytest.mark.parametrize("norm_type", [0.5, 2, 3, math.inf])
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float16, torch.bfloat16, torch.float32, torch.float64),
        (torch.float16, torch.float32),
        (torch.float16,),
        (torch.bfloat16,),
    ],
    ids=["four", "half+float", "half", "bfloat16"],
)
def test_clip_grad_norm_mixed_dtypes_match_torch(dtypes, norm_type, foreach):
    ours, ref = mixed_pair(dtypes)
    total = clip_grad_norm_(ours, 0.1, norm_type, foreach=foreach)
    total_ref = torch.nn.utils.clip_grad_norm_(ref, 0.1, norm_type, foreach=foreach)
    assert total.dtype == total_ref.dtype  # the dtype the per-tensor norms promote to, e.g. float16 alone
    torch.testing.assert_close(total, total_ref)
    assert_same_list_grads(ours, ref)
    assert ours[5].grad is None


def test_clip_grad_norm_uses_one_foreach_call_per_dtype(monkeypatch):
    calls = []
    foreach_norm = torch._foreach_norm

    def counting(tensors, *args):
        calls.append({t.dtype for t in tensors})
        return foreach_norm(tensors, *args)

    monkeypatch.setattr(torch, "_foreach_norm", counting)
    ours, _ = mixed_pair((torch.float32, torch.float64))
    clip_grad_norm_(ours, 1.0)
    assert sorted(calls, key=str) == [{torch.float32}, {torch.float64}]
    calls.clear()
    clip_grad_norm_(ours, 1.0, foreach=False)
    assert calls == []


def test_clip_grad_norm_tensor_subclass_takes_the_loop(monkeypatch):
    class Tagged(torch.Tensor):
        pass

    ours, ref = mixed_pair((torch.float32,))
    for params in (ours, ref):
        params[0].grad = params[0].grad.as_subclass(Tagged)
    monkeypatch.setattr(torch, "_foreach_norm", None)  # calling it would fail
    total = clip_grad_norm_(ours, 0.1)
    monkeypatch.undo()
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(ref, 0.1))
    assert_same_list_grads(ours, ref)


def test_clip_grad_norm_foreach_true_without_kernels_raises_like_torch():
    for clip in (clip_grad_norm_, torch.nn.utils.clip_grad_norm_):
        p = torch.empty(3, device="meta", requires_grad=True)
        p.grad = torch.empty(3, device="meta")
        assert clip([p], 1.0).device.type == "meta"  # foreach=None: the per-tensor loop
        with pytest.raises(RuntimeError, match="foreach=True"):
            clip([p], 1.0, foreach=True)
    with pytest.raises(RuntimeError, match="foreach=True"):
        clip_grad_value_([p], 1.0, foreach=True)


@FOREACH
@pytest.mark.parametrize("norm_type", [0.5, 1, 2, "inf"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, "inf_and_nan"])
def test_clip_grad_norm_nonfinite_matches_torch(norm_type, bad, foreach):
    ours, ref = model_pair()
    for model in (ours, ref):
        g = model[3].weight.grad
        if bad == "inf_and_nan":
            g[0, 0], g[1, 1] = math.inf, math.nan
        else:
            g[0, 0] = bad
    total = clip_grad_norm_(ours.parameters(), 1.0, norm_type, foreach=foreach)
    total_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0, norm_type, foreach=foreach)
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


@pytest.mark.parametrize("max_norm", [0, 0.0, math.inf, "0.5"])
def test_clip_grad_norm_zero_inf_and_string_max_norm_match_torch(max_norm):
    ours, ref = model_pair()
    torch.testing.assert_close(clip_grad_norm_(ours.parameters(), max_norm),
                               torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm))
    assert_same_grads(ours, ref)
    if max_norm == 0:
        assert all(not g.any() for g in grads(ours) if g is not None)


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
    assert total.dtype == torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).dtype == torch.float32


def test_clip_grad_norm_empty_generator_warns_like_torch():
    for clip in (clip_grad_norm_, torch.nn.utils.clip_grad_norm_):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert clip([], 1.0).item() == 0.0  # an empty list: silent
            assert clip((p for p in []), 1.0).item() == 0.0
        assert len(caught) == 1 and caught[0].category is UserWarning
        assert "empty generator" in str(caught[0].message)
        assert caught[0].filename == __file__  # points at the caller


@pytest.mark.parametrize("bad", [-1.0, -math.inf, math.nan, None, "big", True])
def test_clip_grad_norm_bad_max_norm(bad):
    model, _ = model_pair()
    check = unchanged(model)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_(model.parameters(), bad)
    check()


@pytest.mark.parametrize("bad", [0, -1, -0.5, float("-inf"), float("nan"), "fro", "two", True, None])
def test_clip_grad_norm_bad_norm_type(bad):
    model, _ = model_pair()
    check = unchanged(model)  # checks happen before any change
    with pytest.raises(ValueError, match="norm_type"):
        clip_grad_norm_(model.parameters(), 1e-3, bad)
    check()


@pytest.mark.parametrize("name,kwargs", [("foreach", {"foreach": "yes"}), ("foreach", {"foreach": 1}),
                                         ("error_if_nonfinite", {"error_if_nonfinite": None})])
def test_clip_bad_flags(name, kwargs):
    model, _ = model_pair()
    check = unchanged(model)
    with pytest.raises(ValueError, match=name):
        clip_grad_norm_(model.parameters(), 1e-3, **kwargs)
    if name == "foreach":
        with pytest.raises(ValueError, match=name):
            clip_grad_value_(model.parameters(), 1e-3, **kwargs)
    check()


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


# ----------------------------------------------------------- AGC's exclusion: explicit or from the output


class HeadFirst(nn.Module):
    """Declares its classifier before the hidden layers, so declaration order points at the wrong layer."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(8, 3)
        self.hidden = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.Dropout(0.5))

    def forward(self, x):
        return self.classifier(self.hidden(x))


def ids(params) -> list[int]:
    return [id(p) for p in params]


def test_head_declared_first_is_found_from_the_forward_pass():
    torch.manual_seed(0)
    model = HeadFirst()
    x = torch.randn(6, 4)
    assert output_module(model, x) == "classifier"
    params = agc_parameters(model, exclude=output_module(model, x))
    assert ids(params) == ids(model.hidden.parameters())
    last_hidden = model.hidden[3]
    assert id(last_hidden.weight) in ids(params)  # the last declared Linear is a hidden layer: clipped

    model.zero_grad()
    (model(x) * 1e3).sum().backward()
    head_grad = model.classifier.weight.grad.clone()
    adaptive_clip_grad_(params, clip_factor=1e-3)
    assert torch.equal(model.classifier.weight.grad, head_grad)  # the classifier is left alone
    assert unitwise_norm(last_hidden.weight.grad).max() <= 1e-3 * unitwise_norm(last_hidden.weight).max() * 1.001


def test_output_module_has_no_side_effects():
    model = HeadFirst()
    model.hidden[4].eval()  # a mixed state that must come back as it was
    bn = model.hidden[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 4)
    state = torch.random.get_rng_state()
    assert output_module(model, x) == "classifier"
    assert [m.training for m in model.modules()] == [True] * 7 + [False]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert bn.num_batches_tracked.item() == 0
    assert torch.equal(torch.random.get_rng_state(), state)  # dropout did not run
    assert all(not m._forward_hooks for m in model.modules())


def test_output_module_of_the_book_models_is_head():
    x = torch.randn(4, 1, 8, 8)
    assert output_module(gs.cnn(2, seed=0), x) == "head"
    assert output_module(gs.mlp(2, seed=0), x.flatten(1)) == "head"


class PostProcessed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)
        self.aux = nn.Linear(8, 2)
        self.squeeze_only = False

    def forward(self, x):
        h = torch.relu(self.body(x))
        y = self.head(h)
        self.aux(h)  # runs after the head but does not produce the output
        return y.squeeze(1) * 2 if self.squeeze_only else y


def test_output_module_identity_then_last_to_run():
    model = PostProcessed()
    x = torch.randn(3, 4)
    assert output_module(model, x) == "head"  # its output IS the model's, though aux ran later
    model.squeeze_only = True
    assert output_module(model, x) == "aux"  # no module's output is the model's: the last one that ran


def test_output_module_skips_parameter_free_modules_and_reads_tuples():
    mlp = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Softmax(dim=1))
    assert output_module(mlp, torch.randn(2, 4)) == "2"

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(3, 3)
            self.lstm = nn.LSTM(3, 3, batch_first=True)

        def forward(self, x):
            out, state = self.lstm(x)
            return out, state

    assert output_module(Seq(), torch.randn(2, 5, 3)) == "lstm"


def test_output_module_of_a_transformer_encoder():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(8, 3))
    x = torch.randn(2, 5, 8)
    assert output_module(model, x) == "1"
    assert output_module(model[0], x) == "layers.1.norm2"  # eval + no_grad fast path kept out


def test_agc_parameters_default_and_exclusions():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.Flatten(),
        nn.Linear(4, 5),
        nn.Sequential(nn.ReLU(), nn.Linear(5, 6)),
        nn.LayerNorm(6),
    )
    everything = ids(model.parameters())
    assert ids(agc_parameters(model)) == everything  # no exclusion: clip everything
    head = model[3][1]
    without_head = [i for i in everything if i not in ids(head.parameters())]
    assert ids(agc_parameters(model, exclude="3.1")) == without_head
    assert ids(agc_parameters(model, exclude=head)) == without_head
    assert ids(agc_parameters(model, exclude=model[3])) == without_head  # a module's whole subtree
    both = [i for i in without_head if i not in ids(model[4].parameters())]
    assert ids(agc_parameters(model, exclude=["3.1", model[4]])) == both
    assert ids(agc_parameters(model, exclude=("4", "3.1"))) == both
    assert ids(agc_parameters(model, exclude=[])) == everything


def test_agc_parameters_shared_and_tied():
    conv = nn.Conv2d(1, 1, 1)
    model = nn.Sequential(conv, nn.ReLU(), conv)  # shared module listed once
    assert ids(agc_parameters(model)) == [id(conv.weight), id(conv.bias)]

    embed, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = embed.weight  # tied: excluded with the head
    tied = nn.ModuleDict({"embed": embed, "body": nn.Linear(4, 4), "head": head})
    assert ids(agc_parameters(tied, exclude="head")) == ids(tied["body"].parameters())


@pytest.mark.parametrize("bad", ["nothere", "0.weight", nn.Linear(2, 2), 3, [None]])
def test_agc_parameters_bad_exclude(bad):
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="exclude"):
        agc_parameters(model, exclude=bad)


def test_output_module_bad_input():
    with pytest.raises(ValueError, match="model"):
        output_module(lambda x: x, torch.randn(2))

    class NoTensor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return float(self.lin(x).sum().detach())

    with pytest.raises(ValueError, match="no tensor"):
        output_module(NoTensor(), torch.randn(1, 2))
    with pytest.raises(ValueError, match="owns parameters"):
        output_module(nn.Sequential(nn.ReLU()), torch.randn(2))
    model = HeadFirst()
    with pytest.raises(RuntimeError):  # a failing forward leaves no hooks and the modes as they were
        output_module(model, torch.randn(2, 5))
    assert all(m.training and not m._forward_hooks for m in model.modules())
