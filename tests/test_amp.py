"""gradstab.amp: the GradScaler skips non-finite steps, and clipping must see unscaled gradients."""
from __future__ import annotations

import math

import pytest
import torch

import gradstab as gs
from gradstab.amp import amp_train, autocast_dtype, fp16_underflow


@pytest.fixture(scope="module")
def flat(digits):
    return digits.flat()  # conftest's digits, on GRADSTAB_TEST_DEVICE (CPU by default)


def test_overflowing_scale_skips_steps_and_halves(flat):
    h = amp_train(gs.mlp(2), flat, lr=0.05, steps=20, dtype="float16", init_scale=2.0**24)
    assert h.skipped and h.skipped == list(range(len(h.skipped)))  # the first steps, in a row
    for s in h.skipped:
        assert h.scale[s + 1] == h.scale[s] / 2
    assert h.scale[-1] < 2.0**24 and len(h.loss) == 20


def test_growth_doubles_scale_after_clean_steps(flat):
    h = amp_train(gs.mlp(1), flat, lr=0.01, steps=12, dtype="bfloat16", init_scale=4.0, growth_interval=5)
    assert not h.skipped and h.scale[0] == 4.0 and h.scale[5] == 8.0 and h.scale[10] == 16.0


def test_clipping_scaled_gradients_stalls_training(flat):
    good = amp_train(gs.mlp(2), flat, lr=0.05, steps=60, dtype="bfloat16", max_norm=1.0)
    bad = amp_train(gs.mlp(2), flat, lr=0.05, steps=60, dtype="bfloat16", max_norm=1.0, unscale_before_clip=False)
    assert bad.grad_norm[-1] > 1000 * good.grad_norm[-1]  # the clipper saw S x the true norm
    assert good.test_accuracy > 0.8 and bad.test_accuracy < 0.5


def test_without_scaler_scale_is_one(flat):
    h = amp_train(gs.mlp(1), flat, lr=0.05, steps=5, dtype="bfloat16", loss_scaling=False)
    assert h.scale == [1.0] * 5 and not h.skipped and "skipped" in h.summary()


def test_fp16_underflow():
    g = [torch.tensor([1e-9, 1e-3, 0.0])]
    assert fp16_underflow(g) == 0.5
    assert fp16_underflow(g, scale=2.0**16) == 0.0
    assert fp16_underflow([torch.zeros(3)]) == 0.0


def test_autocast_dtype():
    assert autocast_dtype("cpu") == "bfloat16"
    assert autocast_dtype(torch.device("cuda")) == "float16"


@pytest.mark.parametrize("kwargs", [dict(dtype="float8"), dict(lr=-1.0), dict(init_scale=0.0),
                                    dict(growth_interval=0), dict(max_norm=0.0), dict(optimizer="lbfgs")])
def test_bad_arguments(flat, kwargs):
    args = dict(lr=0.1, steps=1) | kwargs
    with pytest.raises(ValueError):
        amp_train(gs.mlp(1), flat, **args)


def test_amp_history_is_the_one_history(flat):
    from gradstab.train import History

    h = amp_train(gs.mlp(1), flat, lr=0.05, steps=3, dtype="bfloat16")
    assert isinstance(h, History) and gs.AmpHistory is History and h.config["amp"] == "bfloat16"
    assert h.grad_norms.shape[0] == 3 and len(h.grad_norm) == 3


def test_loss_scaler_piece():
    from gradstab.amp import LossScaler

    plain = LossScaler(None, torch.device("cpu"))
    assert not plain.enabled and plain.scale == 1.0
    assert LossScaler("float16", torch.device("cpu")).enabled and not LossScaler("bfloat16", "cpu").enabled
    scaler = LossScaler("bfloat16", "cpu", loss_scaling=True, init_scale=8.0)
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    scaler.backward((p * 3).sum())
    assert torch.equal(p.grad, torch.full((2,), 24.0))  # scaled by S = 8
    scaler.unscale(opt)
    assert torch.equal(p.grad, torch.full((2,), 3.0)) and scaler.step(opt, scaler.scale)
    p.grad = torch.tensor([math.inf, 0.0])
    assert not scaler.step(opt, scaler.scale) and scaler.scale == 4.0  # inf gradient: skipped, scale halved
    with pytest.raises(ValueError, match="loss_scaling"):
        LossScaler(None, "cpu", loss_scaling=True)
