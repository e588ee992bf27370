import math

import pytest
import torch

import gradstab as gs


def _run(digits, **kw):
    kw.setdefault("lr", 0.05)
    kw.setdefault("steps", 8)
    return gs.train(gs.cnn(kw.pop("depth", 2), width=8, **kw.pop("knobs", {})), digits, **kw)


def test_learns_on_digits(digits):
    h = gs.train(gs.cnn(2), digits, lr=0.05, steps=120)
    assert not h.diverged and h.steps == 120
    # margins that hold for every seed tried (0-2, 500, 1000, 1001: final/initial loss 0.11-0.34, accuracy 73-89%)
    assert h.loss[-1] < 0.5 * h.loss[0]
    assert h.test_accuracy > 0.5  # chance is 10%


def test_history_contents(digits):
    h = _run(digits, activations=True, updates=True)
    assert len(h.loss) == 8
    assert h.grad_norms.shape == (8, 4) and h.act_grad_norms.shape == (8, 4) and h.update_ratios.shape == (8, 4)
    assert h.layer_names[0] == "stem.0" and h.layer_names[-1] == "head"
    assert h.config["lr"] == 0.05 and h.config["depth"] == 2
    assert h.max_grad_norm == pytest.approx(float(h.grad_norms.max()))


def test_evaluate_false_skips_accuracy(digits):
    h = _run(digits, steps=2, evaluate=False)
    assert math.isnan(h.test_accuracy) and math.isnan(h.train_accuracy)
    assert not math.isnan(_run(digits, steps=2).test_accuracy)


def test_same_seed_same_history(digits):
    a, b = _run(digits, seed=3), _run(digits, seed=3)
    assert a.loss == b.loss
    assert torch.equal(a.grad_norms, b.grad_norms)
    assert a.loss != _run(digits, seed=4).loss


def test_divergence_is_reported_not_raised(digits):
    h = _run(digits, lr=1e4, steps=50, knobs={"residual": True})
    assert h.diverged and h.steps == h.diverged_step + 1
    assert h.diverged_layer in h.layer_names
    assert not math.isfinite(h.loss[-1]) or "non-finite" in h.reason


def test_forced_nan_stops_at_that_step(digits):
    model = gs.cnn(2, width=8)

    def poison(module, inputs, output):
        poison.calls += 1
        return output * float("nan") if poison.calls == 4 else output
    poison.calls = 0
    model.blocks[1].layer.register_forward_hook(poison)
    h = gs.train(model, digits, lr=0.01, steps=10)
    assert h.diverged and h.diverged_step == 3
    assert h.reason.startswith("loss became nan")
    assert h.diverged_layer in h.layer_names


def test_nan_gradient_in_one_layer_names_that_layer(digits):
    model = gs.cnn(3, width=8)
    model.blocks[1].layer.weight.register_hook(lambda g: g * float("nan"))
    h = gs.train(model, digits, lr=0.01, steps=5)
    assert h.diverged_step == 0 and h.diverged_layer == "blocks.1.layer"
    assert h.reason == "gradient became non-finite"


def test_loss_limit(digits):
    h = _run(digits, lr=0.05, steps=5, loss_limit=1.0)
    assert h.diverged and h.diverged_step == 0 and "loss_limit" in h.reason


def test_clipping_caps_the_step(digits):
    free = _run(digits, lr=0.5, steps=3, momentum=0.0, updates=True)
    clipped = _run(digits, lr=0.5, steps=3, momentum=0.0, updates=True, max_norm=1e-3)
    assert clipped.update_ratios.sum() < 0.1 * free.update_ratios.sum()


@pytest.mark.parametrize("opts", [{"optimizer": "adam", "lr": 1e-3}, {"clip_value": 0.01}, {"agc": 0.01},
                                  {"warmup": 5}, {"weight_decay": 1e-3}])
def test_options_run(digits, opts):
    h = _run(digits, **{"steps": 6, **opts})
    assert not h.diverged and h.steps == 6


def test_warmup_scales_first_steps(digits):
    cold = _run(digits, steps=2, momentum=0.0, updates=True, warmup=10)
    hot = _run(digits, steps=2, momentum=0.0, updates=True)
    ratio = cold.update_ratios[0, 0] / hot.update_ratios[0, 0]
    assert ratio == pytest.approx(0.1, rel=1e-3)


@pytest.mark.parametrize("kwargs, name", [
    ({"lr": 0}, "lr"), ({"lr": -0.1}, "lr"), ({"lr": float("nan")}, "lr"), ({"lr": float("inf")}, "lr"),
    ({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"), ({"optimizer": "rmsprop"}, "optimizer"),
    ({"max_norm": 0}, "max_norm"), ({"clip_value": -1}, "clip_value"), ({"agc": 0}, "agc"),
    ({"momentum": -0.5}, "momentum"), ({"warmup": -1}, "warmup"), ({"loss_limit": 0}, "loss_limit"),
])
def test_bad_arguments(digits, kwargs, name):
    with pytest.raises(ValueError, match=name):
        _run(digits, **kwargs)


def test_batch_of_one_with_batchnorm_rejected(digits):
    with pytest.raises(ValueError, match="batch_size"):
        gs.train(gs.cnn(2, norm="batch"), digits, lr=0.1, batch_size=1)
