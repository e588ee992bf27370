"""gradstab.recurrent: hand-written RNN/LSTM/GRU match torch's; tasks are seeded and checked."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import gradstab as gs
from gradstab.recurrent import RecurrentClassifier, rnn, sequence_task, state_gradients

TORCH = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_matches_torch_recurrent_layer(cell):
    model = rnn(cell, input_size=3, hidden=5, num_classes=2, recurrent_gain=1.3, memory_bias=1.0)
    ref = TORCH[cell](3, 5, batch_first=True)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(model.ih.weight)
        ref.weight_hh_l0.copy_(model.hh.weight)
        ref.bias_ih_l0.copy_(model.ih.bias)
        ref.bias_hh_l0.copy_(model.hh.bias)
    x = torch.randn(4, 7, 3, generator=torch.Generator().manual_seed(0))
    out = ref(x)[0]
    assert torch.allclose(torch.stack(model.states(x), dim=1), out, atol=1e-6)


def test_same_seed_same_weights_and_monitor_sees_recurrent_layers():
    a, b = rnn("lstm", seed=3), rnn("lstm", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert gs.weight_layers(a) and [n for n, _ in gs.weight_layers(a)] == ["ih", "hh", "head"]


def test_memory_bias_sets_forget_gate():
    model = rnn("lstm", hidden=4, memory_bias=2.0)
    assert torch.all(model.ih.bias[4:8] == 2.0) and torch.all(model.ih.bias[:4] == 0)


def test_first_token_task_labels_and_determinism():
    d = sequence_task("first", length=6, n_train=32, n_test=8, symbols=5, seed=1, device="cpu")
    assert d.x_train.shape == (32, 6, 5) and d.x_test.shape == (8, 6, 5)
    assert torch.equal(d.x_train[:, 0].argmax(1), d.y_train)
    again = sequence_task("first", length=6, n_train=32, n_test=8, symbols=5, seed=1, device="cpu")
    assert torch.equal(d.x_train, again.x_train)


def test_adding_task_labels():
    d = sequence_task("adding", length=10, n_train=64, n_test=8, device="cpu")
    values, marks = d.x_train[..., 0], d.x_train[..., 1]
    assert torch.all(marks.sum(1) == 2)
    assert torch.all(marks[:, :5].sum(1) == 1)
    total = (values * marks).sum(1)
    assert torch.equal((total > 1).long(), d.y_train)


def test_state_gradients_grow_with_gain(device):
    d = sequence_task("first", length=30, n_train=64, n_test=8, device=device)
    small = state_gradients(rnn("rnn", recurrent_gain=0.5).to(device), d.x_train, d.y_train)
    large = state_gradients(rnn("rnn", recurrent_gain=3.0).to(device), d.x_train, d.y_train)
    assert small.shape == (30,)
    assert small[0] / small[-1] < 1e-3 and large[0] / large[-1] > 1e3


def test_trains_through_gs_train(device):
    d = sequence_task("first", length=5, n_train=256, n_test=64, symbols=4, device=device)
    h = gs.train(rnn("gru", input_size=4, num_classes=4), d, lr=0.01, optimizer="adam", steps=60)
    assert not h.diverged and h.test_accuracy > 0.5 and h.grad_norms.shape == (60, 3)


@pytest.mark.parametrize("kwargs", [dict(cell="transformer"), dict(hidden=0), dict(recurrent_gain=-1.0),
                                    dict(num_classes=1), dict(memory_bias=float("nan"))])
def test_bad_model_arguments(kwargs):
    with pytest.raises(ValueError):
        RecurrentClassifier(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(name="copy"), dict(length=1), dict(n_train=0), dict(symbols=1),
                                    dict(seed=-1)])
def test_bad_task_arguments(kwargs):
    with pytest.raises(ValueError):
        sequence_task(**kwargs)


def test_wrong_input_shape():
    with pytest.raises(ValueError, match="shape"):
        rnn("rnn", input_size=3)(torch.zeros(2, 5, 4))
