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


def sequential(data, lrs, seeds, depth=2, arch="cnn", max_norm=None, **knobs):
    build = gs.cnn if arch == "cnn" else gs.mlp
    return [gs.train(build(depth, seed=s, **knobs), data, lr=lr, steps=STEPS, seed=s, max_norm=max_norm)
            for lr in lrs for s in seeds]


def assert_same(batched, reference):
    assert len(batched) == len(reference)
    for b, r in zip(batched, reference, strict=True):
        assert b.config == r.config
        assert (b.diverged, b.diverged_step, b.diverged_layer, b.reason) == (
            r.diverged, r.diverged_step, r.diverged_layer, r.reason)
        assert b.layer_names == r.layer_names
        torch.testing.assert_close(torch.tensor(b.loss), torch.tensor(r.loss), rtol=1e-4, atol=1e-5,
                                   equal_nan=True)
        torch.testing.assert_close(b.grad_norms, r.grad_norms, rtol=1e-2, atol=1e-5, equal_nan=True)
        if not r.diverged:
            assert b.test_accuracy == pytest.approx(r.test_accuracy, abs=1.5 / 450)
            assert b.train_accuracy == pytest.approx(r.train_accuracy, abs=1.5 / 1347)


CASES = {
    "plain, one seed": dict(seeds=(0,), width=8),
    "plain, two seeds": dict(seeds=(0, 1), width=8),
    "batchnorm": dict(seeds=(0, 1), width=8, norm="batch"),
    "residual+bn, clipped": dict(seeds=(0, 1), width=8, norm="batch", residual=True, branch_scale=0.5,
                                 max_norm=0.5),
    "mlp": dict(seeds=(0, 1), arch="mlp", width=16, norm="batch"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_batched_equals_sequential(digits, case):
    data = digits.flat() if case.get("arch") == "mlp" else digits
    lrs, case = [0.02, 0.1], dict(case)
    seeds = case.pop("seeds")
    batched = gs.sweep(data, lrs, depth=2, seeds=seeds, steps=STEPS, **case)
    assert [(h.config["lr"], h.config["seed"]) for h in batched] == [(lr, s) for lr in lrs for s in seeds]
    assert_same(batched, sequential(data, lrs, seeds, **case))


def test_float64_batched_equals_sequential_to_rounding(digits, monkeypatch):
    """In float64 chaos cannot hide a difference: the two must agree to ~1e-12."""
    monkeypatch.setitem(gs.sweep.__globals__["ARCHS"], "cnn", lambda depth, seed=0, **k: gs.cnn(
        depth, seed=seed, **k).double())
    data = gs.Split(digits.x_train.double(), digits.y_train, digits.x_test.double(), digits.y_test)
    knobs = dict(width=8, norm="batch", residual=True, branch_scale=0.5)
    batched = gs.sweep(data, [0.1], depth=2, seeds=(0, 1), steps=STEPS, max_norm=0.5, **knobs)
    for b, s in zip(batched, (0, 1), strict=True):
        r = gs.train(gs.cnn(2, seed=s, **knobs).double(), data, lr=0.1, steps=STEPS, seed=s, max_norm=0.5)
        torch.testing.assert_close(torch.tensor(b.loss), torch.tensor(r.loss), rtol=1e-12, atol=1e-12)


def test_diverging_member_does_not_poison_the_others(digits):
    lrs = [0.05, 1e4, 0.1]
    batched = gs.sweep(digits, lrs, depth=2, steps=STEPS, width=8, residual=True)
    assert [h.diverged for h in batched] == [False, True, False]
    assert batched[1].steps == batched[1].diverged_step + 1 < STEPS
    assert_same(batched, sequential(digits, lrs, (0,), width=8, residual=True))


def test_unsupported_knobs_fall_back_to_train(digits):
    batched = gs.sweep(digits, [0.05], depth=2, steps=5, width=8, residual=True, skipinit=True, warmup=2,
                       updates=True)
    assert batched[0].config["skipinit"] and batched[0].config["warmup"] == 2
    assert batched[0].update_ratios.shape == (5, 4)
    reference = gs.train(gs.cnn(2, width=8, residual=True, skipinit=True), digits, lr=0.05, steps=5, warmup=2)
    assert batched[0].loss == reference.loss


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
