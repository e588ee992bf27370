"""gradstab.sweep trains many members at once, each exactly as gradstab.train would."""
import pytest
import torch

import gradstab as gs

STEPS = 15


@pytest.fixture(autouse=True)
def no_tf32():
    """On a GPU, TF32 convolutions would round the grouped and the single convolution differently."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


TRAIN_OPTIONS = ("max_norm", "clip_value", "agc", "weight_decay", "warmup", "momentum", "optimizer")


def sequential(data, lrs, seeds, depth=2, arch="cnn", **knobs):
    """``gs.train`` of every (lr, seed), lrs-major, as ``gs.sweep`` orders its members."""
    build = gs.cnn if arch == "cnn" else gs.mlp
    options = {k: knobs.pop(k) for k in TRAIN_OPTIONS if k in knobs}
    return [gs.train(build(depth, seed=s, **knobs).to(data.x_train.dtype), data, lr=lr, steps=STEPS, seed=s,
                     **options) for lr in lrs for s in seeds]


def assert_same(batched, reference, loss_tol=(1e-4, 1e-5), norm_tol=(1e-2, 1e-5)):
    """Same configs, outcomes and layer names; losses and gradient norms equal within (rtol, atol)."""
    assert len(batched) == len(reference)
    for b, r in zip(batched, reference, strict=True):
        assert b.config == r.config
        assert (b.diverged, b.diverged_step, b.diverged_layer, b.diverged_parameter, b.reason) == (
            r.diverged, r.diverged_step, r.diverged_layer, r.diverged_parameter, r.reason)
        assert b.layer_names == r.layer_names and b.scale == r.scale and b.events == r.events == []
        torch.testing.assert_close(torch.tensor(b.loss), torch.tensor(r.loss), rtol=loss_tol[0], atol=loss_tol[1],
                                   equal_nan=True)
        torch.testing.assert_close(b.grad_norms, r.grad_norms, rtol=norm_tol[0], atol=norm_tol[1], equal_nan=True)
        torch.testing.assert_close(torch.tensor(b.grad_norm), torch.tensor(r.grad_norm), rtol=norm_tol[0],
                                   atol=norm_tol[1], equal_nan=True)
        if not r.diverged:
            assert b.test_accuracy == pytest.approx(r.test_accuracy, abs=1.5 / 450)
            assert b.train_accuracy == pytest.approx(r.train_accuracy, abs=1.5 / 1347)


def run_case(data, case, monkeypatch, steps=STEPS):
    """``gs.sweep`` of a case (model knobs and train options; ``lrs`` default [0.02, 0.1]) through the batched
    path (the fallback is disabled), and the same members trained one by one."""
    case = dict(case)
    data = data.flat() if case.get("arch") == "mlp" else data
    lrs, seeds = case.pop("lrs", [0.02, 0.1]), case.pop("seeds")
    with monkeypatch.context() as patch:
        patch.setitem(gs.sweep.__globals__, "train", None)
        batched = gs.sweep(data, lrs, depth=2, seeds=seeds, steps=steps, **case)
    assert [(h.config["lr"], h.config["seed"]) for h in batched] == [(lr, s) for lr in lrs for s in seeds]
    return batched, sequential(data, lrs, seeds, **case)


# Float32 parity runs with tanh. With ReLU it is luck: a unit whose input lies within rounding of 0 takes
# either side of the kink depending on how the kernel rounded, which moves the layer gradient by ~1e-5
# to 1e-3; the two trajectories then differ by that much, more units sit closer to 0 than the difference,
# and the flips cascade (lr=0.1, seed 1, plain width-8 CNN under no-AVX: stem gradient norms 1.2% apart at
# step 13; an MLP at lr=0.02 flipped at step 3). Lower learning rates or fewer steps only make it rarer.
# Tanh has no kink, so float32 differences stay at rounding level; the ReLU networks are checked in float64.
CASES = {
    "plain, one seed": dict(seeds=(0,), width=8),
    "plain, two seeds": dict(seeds=(0, 1), width=8),
    "batchnorm": dict(seeds=(0, 1), width=8, norm="batch"),
    "residual+bn, clipped": dict(seeds=(0, 1), width=8, norm="batch", residual=True, branch_scale=0.5,
                                 max_norm=0.5),
    "mlp": dict(seeds=(0, 1), arch="mlp", width=16, norm="batch"),
    "weight decay": dict(seeds=(0, 1), width=8, norm="batch", weight_decay=0.05),
    "warmup": dict(seeds=(0, 1), width=8, norm="batch", warmup=5),
    "no momentum": dict(seeds=(0, 1), width=8, norm="batch", momentum=0.0),
    "skipinit": dict(seeds=(0, 1), width=8, residual=True, skipinit=True),
    "skipinit+bn, clipped by value": dict(seeds=(0, 1), width=8, norm="batch", residual=True, skipinit=True,
                                          clip_value=0.05),
    "agc": dict(seeds=(0, 1), width=8, residual=True, agc=0.01),
    "mlp, skipinit+agc+weight decay": dict(seeds=(0, 1), arch="mlp", width=16, residual=True, skipinit=True,
                                           agc=0.01, weight_decay=0.05),
    "adam": dict(seeds=(0, 1), width=8, norm="batch", optimizer="adam", lrs=[1e-3, 1e-2]),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_batched_equals_sequential(digits, case, monkeypatch):
    assert_same(*run_case(digits, {"activation": "tanh", **case}, monkeypatch))


@pytest.fixture
def digits64(digits, monkeypatch):
    """The digits in float64, and sweep building float64 models."""
    for arch, build in (("cnn", gs.cnn), ("mlp", gs.mlp)):
        monkeypatch.setitem(gs.sweep.__globals__["ARCHS"], arch,
                            lambda depth, seed=0, build=build, **k: build(depth, seed=seed, **k).double())
    return gs.Split(digits.x_train.double(), digits.y_train, digits.x_test.double(), digits.y_test)


FLOAT64 = {  # ReLU, the book's activation
    "plain, two seeds": dict(seeds=(0, 1), width=8),
    "residual+bn, clipped": dict(seeds=(0, 1), width=8, norm="batch", residual=True, branch_scale=0.5,
                                 max_norm=0.5),
    "skipinit, agc, weight decay, warmup": dict(seeds=(0, 1), width=8, residual=True, skipinit=True, agc=0.01,
                                                weight_decay=0.05, warmup=5),
    "mlp, bn, skipinit, agc, clipped by value": dict(seeds=(0, 1), arch="mlp", width=16, norm="batch",
                                                     residual=True, skipinit=True, agc=0.01, clip_value=0.05),
    "adam, bn": dict(seeds=(0, 1), width=8, norm="batch", optimizer="adam", weight_decay=1e-3, lrs=[1e-2]),
}


@pytest.mark.parametrize("case", FLOAT64.values(), ids=FLOAT64.keys())
def test_float64_batched_equals_sequential_to_rounding(digits64, case, monkeypatch):
    """In float64 no kink or chaos can hide a difference: the losses must agree to ~1e-12 (the gradient norms
    are float32, as the monitor records them)."""
    assert_same(*run_case(digits64, case, monkeypatch), loss_tol=(1e-12, 1e-12), norm_tol=(1e-6, 0))


def test_columns_are_the_monitors_parameter_groups(digits, monkeypatch):
    """BatchNorm's affine parameters and SkipInit's gains are groups of their own, as the monitor counts them."""
    case = dict(seeds=(0,), width=8, norm="batch", residual=True, skipinit=True, lrs=[0.05])
    batched, reference = run_case(digits, case, monkeypatch)
    names = batched[0].layer_names
    assert names == ["stem.0", "blocks.0", "blocks.0.layer", "blocks.0.norm", "blocks.1", "blocks.1.layer",
                     "blocks.1.norm", "head"]
    assert batched[0].grad_norms[-1, names.index("blocks.0.norm")] > 0  # step 0: alpha = 0 blocks it
    assert_same(batched, reference)


def test_diverging_member_does_not_poison_the_others(digits64, monkeypatch):
    case = dict(seeds=(0,), width=8, residual=True, lrs=[0.05, 1e4, 0.1])
    batched, reference = run_case(digits64, case, monkeypatch)
    assert [h.diverged for h in batched] == [False, True, False]
    assert batched[1].steps == batched[1].diverged_step + 1 < STEPS
    assert_same(batched, reference, loss_tol=(1e-12, 1e-12), norm_tol=(1e-6, 0))


@pytest.mark.parametrize("knobs", [dict(dropout=0.1), dict(norm="layer"), dict(updates=True),
                                   dict(activations=True)], ids=str)
def test_unsupported_knobs_fall_back_to_train(digits, knobs):
    batched = gs.sweep(digits, [0.05], depth=2, seeds=(0,), steps=5, width=8, residual=True, skipinit=True,
                       warmup=2, **knobs)
    assert batched[0].config["skipinit"] and batched[0].config["warmup"] == 2
    options = {k: knobs.pop(k) for k in ("updates", "activations") if k in knobs}
    reference = gs.train(gs.cnn(2, seed=0, width=8, residual=True, skipinit=True, **knobs), digits, lr=0.05,
                         steps=5, seed=0, warmup=2, **options)
    assert batched[0].loss == reference.loss
    assert batched[0].update_ratios.shape == reference.update_ratios.shape
    assert batched[0].act_grad_norms.shape == reference.act_grad_norms.shape


def test_grid_labels_every_run(digits):
    variants = {"plain": {}, "clip": {"max_norm": 1.0}, "scaled": lambda depth: {"residual": True,
                                                                               "branch_scale": depth ** -0.5}}
    runs = gs.sweep_grid(digits, [1, 2], [0.05, 0.1], variants, steps=3, width=8)
    keys = [(h.config["depth"], h.config["variant"], h.config["lr"]) for h in runs]
    assert keys == [(d, v, lr) for d in (1, 2) for v in variants for lr in (0.05, 0.1)]
    assert runs[2].config["max_norm"] == 1.0 and runs[-1].config["branch_scale"] == 2 ** -0.5


@pytest.mark.parametrize("kwargs,name", [
    (dict(lrs=[]), "lrs"), (dict(lrs=[0.1, 0.0]), "lr"), (dict(lrs=[-1.0]), "lr"), (dict(depth=0), "depth"),
    (dict(seeds=()), "seeds"), (dict(arch="rnn"), "arch"), (dict(steps=0), "steps"), (dict(norm="group"), "norm"),
])
def test_bad_arguments_raise(digits, kwargs, name):
    kwargs = {"lrs": [0.1], "depth": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        gs.sweep(digits, kwargs.pop("lrs"), **kwargs)


def test_grid_needs_variants(digits):
    with pytest.raises(ValueError, match="variants"):
        gs.sweep_grid(digits, [2], [0.1], {})


def test_evaluate_false_skips_accuracy_on_both_paths(digits):
    import math
    batched = gs.sweep(digits, [0.05], depth=1, steps=2, width=4, evaluate=False)
    fallback = gs.sweep(digits, [0.05], depth=1, steps=2, width=4, dropout=0.1, evaluate=False)
    assert all(math.isnan(h.test_accuracy) for h in batched + fallback)
    assert batched[0].loss == pytest.approx(gs.sweep(digits, [0.05], depth=1, steps=2, width=4)[0].loss)


def test_grid_in_two_processes_equals_one(digits):
    if digits.device.type != "cpu":
        pytest.skip("worker processes are used on the CPU only")
    variants = {"plain": {}, "clip": {"max_norm": 0.5},
                "scaled": lambda d: {"residual": True, "branch_scale": d ** -0.5}}
    args = dict(depths=[1, 2], lrs=[0.05, 0.5], variants=variants, steps=3, width=4)
    serial, parallel = gs.sweep_grid(digits, **args), gs.sweep_grid(digits, **args, workers=2)
    assert [h.config for h in serial] == [h.config for h in parallel]
    assert [h.loss for h in serial] == [h.loss for h in parallel]
    with pytest.raises(ValueError, match="workers"):
        gs.sweep_grid(digits, **args, workers=0)


def test_other_train_options_fall_back_to_train_and_are_checked_as_train_checks_them(digits):
    batched = gs.sweep(digits, [0.05], depth=1, seeds=(0,), steps=3, width=4, skip_nonfinite=True)
    reference = gs.train(gs.cnn(1, seed=0, width=4), digits, lr=0.05, steps=3, seed=0, skip_nonfinite=True)
    assert batched[0].loss == reference.loss and batched[0].config == reference.config
    assert batched[0].config["skip_nonfinite"]
    with pytest.raises(ValueError, match="accumulate"):
        gs.sweep(digits, [0.05], depth=1, steps=3, width=4, accumulate=0)
    with pytest.raises(ValueError, match="warmup"):
        gs.sweep(digits, [0.05], depth=1, steps=3, width=4, warmup=-1)  # the batched path's own check


def test_batched_path_checks_the_data_as_train_does(digits):
    bad = gs.Split(digits.x_train, digits.y_train.float(), digits.x_test, digits.y_test.float())
    with pytest.raises(ValueError, match=r"data\.y_train holds float values"):
        gs.sweep(bad, [0.05], depth=1, steps=2, width=4)
