"""Public bug reports about exploding or NaN gradients and clipping, reproduced small, in this suite's own code.

Each test cites its report on the first docstring line and asserts what gradstab must do with the case:
detect it and name the culprit, or give PyTorch's own numbers.
"""
from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import gradstab as gs
from gradstab import clip

from .conftest import group_names, mentions, snapshot, total_grad_norm, unchanged


def labelled(n: int, *shape: int, seed: int = 0, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def split(*shape: int) -> gs.Split:
    return gs.Split(*labelled(32, *shape, seed=1), *labelled(16, *shape, seed=2))


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def plain_sgd(model: nn.Module, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)


def grads_of(case) -> torch.Tensor:
    model, (x, y) = case
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


# -- NaN gradients under a finite loss ---------------------------------------------------------------------------
class WhereSqrt(nn.Module):
    """``h = x @ mix`` then ``where(h > 0, sqrt(h), 0)``: the untaken branch makes ``mix``'s gradient NaN."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(4, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = x @ self.mix
        return self.head(torch.where(h > 0, torch.sqrt(h), torch.zeros_like(h)))


def test_where_sqrt_untaken_branch_stops_training_at_step_zero():
    """Report "torch.where backward propagates NaN gradient from inactive sqrt branch" https://github.com/pytorch/pytorch/issues/187297

    gs.train must stop before the first step and name the raw parameter ``mix``, not report a healthy run.
    """
    torch.manual_seed(0)
    model, data = WhereSqrt(), split(4)
    loss = grads_of((model, (data.x_train, data.y_train)))
    assert torch.isfinite(loss) and torch.isnan(model.mix.grad).any()  # the report's premise, in plain torch

    model.zero_grad(set_to_none=True)
    before = snapshot(model)
    history = gs.train(model, data, lr=0.1, steps=10, batch_size=8)
    assert history.diverged and history.diverged_step == 0
    assert history.diverged_parameter == "mix" and history.diverged_layer == "mix"
    assert math.isfinite(history.loss[0]) and unchanged(model, before)


class Rescale(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.zeros(8))  # starts at the one point where ||g|| has no gradient

    def forward(self, h):
        return h * (1 + self.g.square().sum().sqrt())  # a hand-written norm


class ZeroNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.rescale = Rescale()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.rescale(self.inp(x))))


def test_zero_norm_gradient_is_found_and_named():
    """Report "Gradient of zero norm is nan" https://github.com/pytorch/pytorch/issues/2421

    The monitor, diagnose and gs.train must all point at ``rescale.g`` (layer ``rescale``), and nothing else.
    """
    from gradstab.diagnose import diagnose

    torch.manual_seed(0)
    model, data = ZeroNormNet(), split(4)
    monitor = gs.GradientMonitor(model)
    loss = grads_of((model, (data.x_train, data.y_train)))
    assert torch.isfinite(loss) and torch.isnan(model.rescale.g.grad).all()
    norms = monitor.record()
    assert monitor.nonfinite(norms).tolist() == [name == "rescale" for name in monitor.names]
    assert monitor.first_nonfinite(norms) == "rescale"
    assert monitor.first_nonfinite_parameter() == "rescale.g"

    assert mentions(str(diagnose(model, (data.x_train, data.y_train))), "rescale.g")
    history = gs.train(model, data, lr=0.1, steps=5, batch_size=8)
    assert history.diverged_step == 0 and history.diverged_parameter == "rescale.g"


# -- clipping as a drop-in for torch's ---------------------------------------------------------------------------
def gradients(values: list[list[float]]) -> list[nn.Parameter]:
    params = []
    for row in values:
        p = nn.Parameter(torch.zeros(len(row)))
        p.grad = torch.tensor(row)
        params.append(p)
    return params


def call(fn, params, *args, **kw):
    """``fn``'s result (or the type of what it raised) and the gradients it left."""
    try:
        out = fn(params, *args, **kw)
    except Exception as error:  # noqa: BLE001 - the exception type is what is compared
        out = type(error)
    return out, [None if p.grad is None else p.grad.clone() for p in params]


def assert_same_as_torch(ours, theirs):
    (out, grads), (expected, expected_grads) = ours, theirs
    if isinstance(expected, type) or isinstance(out, type):
        assert isinstance(out, type) and isinstance(expected, type) and issubclass(out, expected), (out, expected)
    elif expected is None:
        assert out is None
    else:
        torch.testing.assert_close(out, expected, equal_nan=True)
    for g, e in zip(grads, expected_grads, strict=True):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, equal_nan=True)


NONFINITE = [[1.0, 2.0], [math.inf, 0.5]], [[1.0, math.nan], [3.0, 4.0]], [[1e30, 1e30], [1e30, 1.0]]


@pytest.mark.parametrize("values", NONFINITE)
@pytest.mark.parametrize("error_if_nonfinite", [True, False])
@pytest.mark.parametrize("foreach", [None, False, True])
def test_clip_grad_norm_nonfinite_like_torch(values, error_if_nonfinite, foreach):
    """Report "clip_grad_norm_ silently passes when not finite" https://github.com/pytorch/pytorch/issues/46849

    gs.clip.clip_grad_norm_ raises where torch raises (same type, gradients untouched) and otherwise returns
    torch's total norm and leaves torch's gradients, inf and NaN included; foreach=True on CPU too.
    """
    kw = dict(error_if_nonfinite=error_if_nonfinite, foreach=foreach)
    ours = call(clip.clip_grad_norm_, gradients(values), 1.0, **kw)
    assert_same_as_torch(ours, call(torch.nn.utils.clip_grad_norm_, gradients(values), 1.0, **kw))


FINITE = [[3.0, -4.0, 0.5], [0.0, 2.0]], [[1e-3, -2e-3], [5e-4, 0.0, 1e-3]]


@pytest.mark.parametrize("values", FINITE)
@pytest.mark.parametrize("norm_type", [0.5, 1, 2.0, 3, math.inf, "inf"])
@pytest.mark.parametrize("foreach", [None, False])
def test_clip_grad_norm_global_norm_like_torch(values, norm_type, foreach):
    """Report "Gradient clipping is not consistent with other frameworks" https://github.com/clab/dynet/issues/1374

    One global p-norm over all gradients, any p > 0 and inf, with torch's numbers and its clip coefficient.
    """
    ours = call(clip.clip_grad_norm_, gradients(values), 0.1, norm_type, foreach=foreach)
    assert_same_as_torch(ours, call(torch.nn.utils.clip_grad_norm_, gradients(values), 0.1, norm_type,
                                    foreach=foreach))


@pytest.mark.parametrize("foreach", [None, False, True])
def test_clip_grad_value_like_torch(foreach):
    """Report "Gradient clipping is not consistent with other frameworks" https://github.com/clab/dynet/issues/1374

    Clipping by value: torch's result (and torch's error for foreach=True on CPU).
    """
    values = [[3.0, -4.0, 0.05], [math.inf, -math.inf]]
    ours = call(clip.clip_grad_value_, gradients(values), 0.5, foreach=foreach)
    assert_same_as_torch(ours, call(torch.nn.utils.clip_grad_value_, gradients(values), 0.5, foreach=foreach))


def test_accumulated_gradients_are_clipped_once():
    """Report "The implementation of grad clipping is not correct when gradient accumulation is enabled" https://github.com/huggingface/transformers/issues/1563

    With accumulate=2, gs.train clips the summed micro-batch gradients once, before the step, as the
    reference loop below does (clipping is active, so mean or sum of the micro-batch losses gives the same step).
    """
    batches = [labelled(8, 4, seed=s) for s in range(4)]
    lr, max_norm = 0.5, 0.05

    def reference(clip_each_micro_batch: bool) -> list[torch.Tensor]:
        model = mlp()
        opt = plain_sgd(model, lr)
        for first in (0, 2):
            opt.zero_grad(set_to_none=True)
            for x, y in batches[first:first + 2]:
                (F.cross_entropy(model(x), y) / 2).backward()
                if clip_each_micro_batch:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            assert clip_each_micro_batch or float(norm) > max_norm  # clipping is active
            opt.step()
        return [p.detach() for p in model.parameters()]

    once, each = reference(False), reference(True)
    assert not all(torch.allclose(a, b) for a, b in zip(once, each, strict=True))  # the test can tell them apart

    model = mlp()
    history = gs.train(model, batches, steps=2, accumulate=2, max_norm=max_norm, optimizer=plain_sgd(model, lr),
                       evaluate=False)
    assert not history.diverged
    for p, expected in zip(model.parameters(), once, strict=True):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)


def test_amp_clips_the_unscaled_gradients():
    """Report "Fix grad clipping stage + upscale gradients before clipping" https://github.com/Deci-AI/super-gradients/pull/653

    Under float16 autocast with loss scaling the step must be clipped to max_norm in true units: one SGD step
    moves the weights by lr * max_norm (clipping the scaled gradients would move them 65536 times less), and
    the recorded gradient norm is the unscaled one.
    """
    x, y = labelled(16, 4, seed=1)
    lr, max_norm = 0.1, 1e-3
    reference = mlp()
    grads_of((reference, (x, y)))
    true_norm = float(total_grad_norm(reference))
    assert true_norm > 100 * max_norm

    model = mlp()
    before = snapshot(model)
    history = gs.train(model, [(x, y)], steps=1, amp="float16", max_norm=max_norm, optimizer=plain_sgd(model, lr),
                       evaluate=False)
    assert not history.diverged
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    assert float(moved.norm()) == pytest.approx(lr * max_norm, rel=1e-2)
    recorded = float(history.grad_norms[0].nan_to_num(0.0).square().sum().sqrt())
    assert recorded == pytest.approx(true_norm, rel=5e-2)


# -- what the monitor counts -------------------------------------------------------------------------------------
class FrozenEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)
        self.encoder.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.tanh(self.encoder(x)))


def test_frozen_parameters_are_left_out_not_zero():
    """Report "Allow frozen parameters with requires_grad=False" https://github.com/lcswillems/torch-ac/pull/5

    A frozen encoder is not a layer with gradient 0: the monitor leaves it out, diagnose calls it frozen, and
    clipping over model.parameters() (frozen ones have no .grad) gives torch's total norm.
    """
    from gradstab.diagnose import diagnose

    torch.manual_seed(0)
    model, batch = FrozenEncoder(), labelled(8, 4)
    monitor = gs.GradientMonitor(model)
    grads_of((model, batch))
    norms = monitor.record()
    assert monitor.names == ["head"] and monitor.param_names == ["head.weight", "head.bias"]
    assert torch.isfinite(norms).all()
    text = str(diagnose(model, batch))
    assert mentions(text, "encoder.0.weight") and "frozen" in text.lower()

    theirs = copy.deepcopy(model)
    for p, q in zip(model.parameters(), theirs.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    assert_same_as_torch(call(clip.clip_grad_norm_, list(model.parameters()), 0.01),
                         call(torch.nn.utils.clip_grad_norm_, list(theirs.parameters()), 0.01))


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 8)
        self.decoder = nn.Linear(8, 13)
        self.decoder.weight = self.emb.weight

    def forward(self, tokens):
        return self.decoder(torch.tanh(self.emb(tokens))).mean(1)


def test_tied_weight_counted_once():
    """Report "Fix MFSDP v2 shared gradient norms" https://github.com/NVIDIA/Megatron-LM/pull/7227

    The weight shared by the embedding and the output layer enters the per-layer norms once: their squares
    add up to torch's squared total over model.parameters(), and only its first owner lists it.
    """
    torch.manual_seed(0)
    model = TiedLM()
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 13, (8, 5), generator=g), torch.randint(0, 13, (8,), generator=g)
    monitor = gs.GradientMonitor(model)
    grads_of((model, batch))
    norms = monitor.record()
    assert monitor.param_names == ["emb.weight", "decoder.bias"]
    total = total_grad_norm(model)
    torch.testing.assert_close(norms.square().sum(), total.square(), rtol=1e-5, atol=0)
    torch.testing.assert_close(clip.clip_grad_norm_(model.parameters(), math.inf), total)


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        first = self.shared(torch.tanh(self.inp(x)))
        return self.head(self.shared(torch.tanh(first)))


def test_output_gradient_of_a_reused_module_combines_every_call():
    """Report "fix: Fixed support of modules that are used multiple times during forward" https://github.com/frgfm/torch-scan/pull/24

    ``shared`` runs twice per forward; its output-gradient norm must combine both calls (as one concatenated
    vector, or as their sum), never keep just one of them.
    """
    torch.manual_seed(0)
    model, batch = Reused(), labelled(8, 4)
    outputs = []
    model.shared.register_forward_hook(lambda module, inputs, out: outputs.append(out) or out.retain_grad())
    with gs.GradientMonitor(model, activations=True) as monitor:
        grads_of((model, batch))
        monitor.record()
    first, second = (out.grad.norm() for out in outputs)
    assert not torch.isclose(first, second, rtol=1e-2)
    combined = {float(torch.hypot(first, second)), float((outputs[0].grad + outputs[1].grad).norm())}
    got = float(monitor.history("act_grad")[-1, monitor.names.index("shared")])
    assert any(got == pytest.approx(c, rel=1e-4) for c in combined), (got, combined, float(first), float(second))


class SpectralTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.sn = parametrizations.spectral_norm(nn.Linear(8, 8))
        self.inp = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.sn(torch.tanh(self.sn(self.inp(x))))))


def test_spectral_norm_used_twice_is_monitored_and_trained():
    """Report "`torch.nn.utils.parametrizations.spectral_norm` cannot use twice" https://github.com/pytorch/pytorch/issues/66363

    A spectral-normed layer called twice per forward: the monitor (with its hooks) counts its weight once as
    ``sn.weight`` through the parametrization's original, and gs.train runs it.
    """
    torch.manual_seed(0)
    model, data = SpectralTwice(), split(4)
    with gs.GradientMonitor(model, activations=True) as monitor:
        grads_of((model, (data.x_train, data.y_train)))
        norms = monitor.record()
    assert "sn.weight" in monitor.param_names and monitor.names == group_names(model)
    torch.testing.assert_close(norms.square().sum(), total_grad_norm(model).square(), rtol=1e-5, atol=0)
    assert torch.isfinite(monitor.history("act_grad")).all()

    history = gs.train(model, data, lr=0.05, steps=3, batch_size=8, activations=True)
    assert not history.diverged and all(math.isfinite(v) for v in history.loss)


# -- the remedies themselves -------------------------------------------------------------------------------------
def test_decoupled_decay_skips_parameters_without_gradient():
    """Report "optimizer applies weight decay to parameters even when their gradient is None" https://github.com/KellerJordan/Muon/issues/54

    gs.decoupled_weight_decay_ followed by Adam(weight_decay=0) equals one AdamW step, which leaves a
    parameter without gradient alone.
    """
    lr, decay = 0.1, 0.5
    ours, theirs = (mlp().append(nn.Linear(3, 3)) for _ in range(2))  # the last layer never runs: no gradient
    torch.testing.assert_close(ours[3].weight, theirs[3].weight)
    batch = labelled(8, 4)
    for model in (ours, theirs):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model[:3](batch[0]), batch[1]).backward()
    untouched = [p.detach().clone() for p in ours[3].parameters()]

    gs.decoupled_weight_decay_(list(ours.parameters()), lr, decay)
    torch.optim.Adam(ours.parameters(), lr=lr).step()
    torch.optim.AdamW(theirs.parameters(), lr=lr, weight_decay=decay).step()
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert all(torch.equal(p, u) for p, u in zip(ours[3].parameters(), untouched, strict=True))


class LinearishRNN(nn.Module):
    """A ReLU RNN whose recurrent matrix is 1.6 I: gradients grow about 1.6^20 through 20 steps."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, 8, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(8, 2)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(1.6 * torch.eye(8))

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_recurrent_explosion_is_reported_and_clipping_prevents_it(max_norm):
    """Report "Loss function goes to nan after n number of iterations - might be problem of exploding gradient?" https://github.com/Marcovaldong/lstmp.pytorch/issues/2

    Unclipped, the run must stop at the step whose loss is NaN, say so and name a layer; clipped to norm 1 it
    trains all steps with finite losses.
    """
    torch.manual_seed(0)
    model = LinearishRNN()
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(32, 20, 3, generator=g), torch.randint(0, 2, (32,), generator=g)
    history = gs.train(model, [batch] * 8, steps=8, max_norm=max_norm, optimizer=plain_sgd(model, 0.1),
                       evaluate=False)
    assert float(history.grad_norms[0].nan_to_num(0.0).square().sum().sqrt()) > 1e3  # it does explode
    if max_norm is None:
        assert history.diverged and history.diverged_step == 1
        assert history.diverged_layer in group_names(model)
    else:
        assert not history.diverged and len(history.loss) == 8
        assert all(math.isfinite(v) for v in history.loss)


# -- parity and side effects -------------------------------------------------------------------------------------
def test_scratch_batchnorm_float16_statistics_like_torch():
    """Report "Use float data type for Half var_sum in batchnorm stats updating on CPU" https://github.com/pytorch/pytorch/pull/126525

    float16 channels whose variance (about 1.6e5) exceeds float16's range: gs.BatchNorm1d gives torch's
    outputs and running statistics, in training and in eval, and loads torch's own state_dict.
    """
    x = (labelled(64, 4)[0] * 400).half()
    ours, theirs = gs.BatchNorm1d(4), nn.BatchNorm1d(4)
    y = ours(x)
    torch.testing.assert_close(y, theirs(x))
    assert y.abs().max() > 1  # not the zeros an overflowed variance gives
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    fresh = gs.BatchNorm1d(4)
    fresh.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(fresh.eval()(x), theirs.eval()(x))


def test_import_changes_nothing_global():
    """Report "Perf: limit golden PyTorch threads to 16" https://github.com/hw-native-sys/pypto-lib/pull/870

    (a package that sets torch's thread count at import). ``import gradstab`` must leave the thread count and
    subnormal numbers alone and load no plotting, scikit-learn or tqdm beyond what torch itself loads.
    """
    script = (
        "import sys, torch\n"
        "torch.set_num_threads(3)\n"
        "already = set(sys.modules)\n"
        "import gradstab\n"
        "assert torch.get_num_threads() == 3, torch.get_num_threads()\n"
        "assert float(torch.tensor([1e-39]) * 1.0) != 0.0, 'flush-denormal turned on'\n"
        "new = {m.partition('.')[0] for m in set(sys.modules) - already}\n"
        "loaded = sorted(new & {'matplotlib', 'sklearn', 'tqdm', 'ipywidgets'})\n"
        "assert not loaded, loaded\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
