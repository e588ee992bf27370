"""Held-out model zoo: architectures the book never uses, checked the way issue 11 lists.

For every model: (a) the monitor counts each parameter that requires grad once (per-layer squares sum to
PyTorch's squared total norm, frozen parameters absent, a parameter without gradient NaN); (b) ``gs.train``
runs on generated data given as a Split, a list of batches or a DataLoader, and stops at step 0 naming the
parameter whose gradient is NaN while the loss is finite; (c) ``diagnose`` runs and lists every layer;
(d) AGC's exclusion taken from the forward pass leaves out exactly the classifier.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations
from torch.utils.data import DataLoader, TensorDataset

import gradstab as gs

from .conftest import (
    expected_group_norms,
    group_names,
    inject_nan,
    mentions,
    owner_of,
    snapshot,
    total_grad_norm,
    unchanged,
)

N_TRAIN, N_TEST, BATCH, STEPS, VOCAB, CLASSES = 32, 16, 8, 3, 11, 3


# -- the zoo ---------------------------------------------------------------------------------------------------
class TransformerClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.head(self.encoder(self.inp(x)).mean(1))


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True, bidirectional=True)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class GRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(4, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x):
        out, _ = self.gru(x)
        return self.head(out[:, -1])


class AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x):
        h = self.inp(x)
        mixed, _ = self.attn(h, h, h)
        return self.head(self.norm(h + mixed).mean(1))


class TiedLanguageModel(nn.Module):
    """Embedding and output projection share one weight (Press & Wolf 2017)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.mix = nn.Linear(8, 8)
        self.decoder = nn.Linear(8, VOCAB)
        self.decoder.weight = self.emb.weight

    def forward(self, tokens):
        return self.decoder(torch.tanh(self.mix(self.emb(tokens))))


def next_token_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class PartlyFrozen(nn.Module):
    """``inp`` frozen, ``mid.weight`` frozen (its bias trains), ``aux`` never used in forward."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, CLASSES)
        self.aux = nn.Linear(8, CLASSES)
        self.inp.requires_grad_(False)
        self.mid.weight.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.relu(self.mid(torch.relu(self.inp(x)))))


class SpectralNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = parametrizations.spectral_norm(nn.Linear(4, 8))
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.head(torch.relu(self.inp(x)))


class WeightNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = parametrizations.weight_norm(nn.Linear(4, 8))
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.head(torch.relu(self.inp(x)))


class Gain(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(8))

    def forward(self, h):
        return h * self.gain


class RawParameters(nn.Module):
    """A raw root parameter ``mix`` through a safe ``where(h > 0, sqrt(h), 0)``, and a custom module's raw gain."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(4, 8) / 2)
        self.scale = Gain()
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x):
        h = x @ self.mix
        positive = h > 0
        h = torch.where(positive, torch.sqrt(torch.where(positive, h, torch.ones_like(h))), torch.zeros_like(h))
        return self.head(self.scale(h))


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        return self.head(torch.tanh(self.shared(h)))


def conv_norm_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(2, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Conv1d(8, 8, 3, padding=1), nn.LayerNorm([8, 12]), nn.ReLU(),
        nn.Flatten(), nn.Linear(96, CLASSES),
    )


class EmbeddingBagClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8, padding_idx=0)
        self.bag = nn.EmbeddingBag(VOCAB, 8, mode="mean")
        self.head = nn.Linear(16, CLASSES)

    def forward(self, tokens):
        return self.head(torch.cat([self.emb(tokens).mean(1), self.bag(tokens)], dim=1))


class ClassifierFirst(nn.Module):
    """The classifier is declared before the body, so declaration order misleads."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, CLASSES)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())

    def forward(self, x):
        return self.head(self.body(x))


def floats(*shape):
    return lambda n, g: torch.randn(n, *shape, generator=g)


def tokens(length):
    return lambda n, g: torch.randint(0, VOCAB, (n, length), generator=g)


def labels(n, g):
    return torch.randint(0, CLASSES, (n,), generator=g)


def next_tokens(n, g):
    return torch.randint(0, VOCAB, (n, 5), generator=g)


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable
    poison: str  # a parameter (as in model.named_parameters()) whose gradient a test turns to NaN
    classifier: str  # the module that produces the output
    targets: Callable = labels
    loss_fn: Callable | None = None
    data: str = "split"  # how gs.train gets the data: "split", "batches" or "loader"
    optimizer: str = "sgd"  # a name, or "instance" for a torch.optim.AdamW built on the model
    frozen: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # groups that get no gradient: NaN, not 0
    names: dict[str, str] = field(default_factory=dict)  # model.named_parameters() name -> reported name


ZOO = [
    Case("transformer", TransformerClassifier, floats(6, 4), "encoder.layers.0.self_attn.in_proj_weight", "head",
         optimizer="adam",
         names={"encoder.layers.0.self_attn.in_proj_weight": "encoder.layers.0.self_attn.in_proj_weight"}),
    Case("lstm", LSTMClassifier, floats(6, 4), "lstm.weight_hh_l0", "head", data="batches",
         names={"lstm.weight_hh_l0": "lstm.weight_hh_l0", "lstm.weight_hh_l0_reverse": "lstm.weight_hh_l0_reverse"}),
    Case("gru", GRUClassifier, floats(6, 4), "gru.weight_ih_l1", "head", data="loader", optimizer="adamw"),
    Case("attention", AttentionBlock, floats(6, 4), "attn.in_proj_weight", "head", optimizer="instance",
         names={"attn.in_proj_weight": "attn.in_proj_weight", "norm.weight": "norm.weight"}),
    Case("tied_lm", TiedLanguageModel, tokens(5), "emb.weight", "decoder", targets=next_tokens,
         loss_fn=next_token_loss, data="batches", optimizer="adam"),
    Case("frozen", PartlyFrozen, floats(4), "mid.bias", "head", frozen=["inp.weight", "inp.bias", "mid.weight"],
         unused=["aux"]),
    Case("spectral_norm", SpectralNormed, floats(4), "inp.parametrizations.weight.original", "head",
         data="loader", names={"inp.parametrizations.weight.original": "inp.weight"}),
    Case("weight_norm", WeightNormed, floats(4), "inp.parametrizations.weight.original1", "head",
         optimizer="adamw"),
    Case("raw_parameter", RawParameters, floats(4), "mix", "head", data="batches",
         names={"mix": "mix", "scale.gain": "scale.gain"}),
    Case("called_twice", CalledTwice, floats(4), "shared.weight", "head", optimizer="instance"),
    Case("conv_norm", conv_norm_net, floats(2, 12), "1.weight", "7", data="loader", optimizer="adam"),
    Case("embedding_bag", EmbeddingBagClassifier, tokens(6), "bag.weight", "head"),
    Case("classifier_first", ClassifierFirst, floats(4), "body.0.weight", "head", data="batches"),
]


@pytest.fixture(params=ZOO, ids=[case.name for case in ZOO])
def case(request) -> Case:
    return request.param


@pytest.fixture
def model(case) -> nn.Module:
    torch.manual_seed(0)
    return case.build()


def sample(case: Case, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return case.inputs(n, g), case.targets(n, g)


def loss_kwargs(case: Case) -> dict:
    return {} if case.loss_fn is None else {"loss_fn": case.loss_fn}


def loss_of(case: Case, model: nn.Module, x, y) -> torch.Tensor:
    return (case.loss_fn or F.cross_entropy)(model(x), y)


def training_data(case: Case):
    x, y = sample(case, N_TRAIN, seed=1)
    if case.data == "split":
        return gs.Split(x, y, *sample(case, N_TEST, seed=2))
    if case.data == "batches":
        return list(zip(x.split(BATCH), y.split(BATCH), strict=True))[:STEPS]
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def fit(case: Case, model: nn.Module):
    if case.optimizer == "instance":  # an optimizer instance carries its own learning rate
        extra = {"optimizer": torch.optim.AdamW(model.parameters(), lr=1e-2)}
    else:
        extra = {"optimizer": case.optimizer, "lr": 1e-2}
    extra.update({"batch_size": BATCH} if case.data == "split" else {"evaluate": False})
    return gs.train(model, training_data(case), steps=STEPS, seed=0, **loss_kwargs(case), **extra)


def backward(case: Case, model: nn.Module):
    model.zero_grad(set_to_none=True)
    x, y = sample(case, BATCH, seed=3)
    loss = loss_of(case, model, x, y)
    loss.backward()
    return loss


def poisoned(case: Case, model: nn.Module) -> tuple[nn.Parameter, str, str]:
    """Turn ``case.poison``'s gradient to NaN; return it with its expected (group, name)."""
    param = model.get_parameter(case.poison)
    inject_nan(model, case.poison)
    group, name = owner_of(model, param)
    return param, group, case.names.get(case.poison, name)


# -- (a) the monitor --------------------------------------------------------------------------------------------
def test_monitor_counts_every_trainable_parameter_once(case, model):
    monitor = gs.GradientMonitor(model)
    backward(case, model)
    norms = monitor.record()

    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert norms.dtype == torch.float32 and norms.shape == (len(monitor.names),)
    assert monitor.names == group_names(model)
    assert len(monitor.param_names) == len(set(monitor.param_names)) == len(trainable)
    assert not set(case.frozen) & set(monitor.param_names)
    for raw, reported in case.names.items():
        assert reported in monitor.param_names, (raw, monitor.param_names)

    torch.testing.assert_close(norms, expected_group_norms(model), equal_nan=True)
    total = total_grad_norm(model)
    assert total > 0
    torch.testing.assert_close(norms.nan_to_num(0.0).square().sum().sqrt(), total.float(), rtol=1e-5, atol=0)

    missing = [monitor.names[i] for i in torch.isnan(norms).nonzero().flatten().tolist()]
    assert missing == case.unused  # no gradient = NaN, never 0
    assert not monitor.nonfinite(norms).any() and monitor.first_nonfinite(norms) is None
    logged = monitor.log_dict()
    assert all(f"grad_norm/{group}" in logged for group in monitor.names)


def test_monitor_flags_the_poisoned_parameter(case, model):
    monitor = gs.GradientMonitor(model)
    _, group, name = poisoned(case, model)
    loss = backward(case, model)
    assert torch.isfinite(loss)
    norms = monitor.record()
    flagged = [monitor.names[i] for i in monitor.nonfinite(norms).nonzero().flatten().tolist()]
    assert flagged == [group]
    assert monitor.first_nonfinite(norms) == group
    assert monitor.first_nonfinite_parameter() == name


# -- (b) gs.train -----------------------------------------------------------------------------------------------
def test_train_runs_with_finite_losses(case, model):
    history = fit(case, model)
    assert not history.diverged and history.diverged_parameter is None, history.reason
    assert len(history.loss) == STEPS and all(math.isfinite(v) for v in history.loss)
    assert history.layer_names == group_names(model)
    assert history.grad_norms.shape == (STEPS, len(history.layer_names))
    unused = torch.tensor([name in case.unused for name in history.layer_names])
    assert torch.isnan(history.grad_norms[:, unused]).all() and torch.isfinite(history.grad_norms[:, ~unused]).all()


def test_train_stops_at_step_zero_naming_the_parameter(case, model):
    _, group, name = poisoned(case, model)
    before = snapshot(model)
    history = fit(case, model)
    assert history.diverged and history.diverged_step == 0, history.reason
    assert history.diverged_parameter == name
    assert history.diverged_layer == group
    assert math.isfinite(history.loss[0])
    assert unchanged(model, before), "the step with a NaN gradient must not be taken"


# -- (c) diagnose -----------------------------------------------------------------------------------------------
def _diagnose(case: Case, model: nn.Module):
    from gradstab.diagnose import diagnose

    return diagnose(model, sample(case, BATCH, seed=3), **loss_kwargs(case))


def test_diagnose_lists_every_layer_once(case, model):
    before = snapshot(model)
    report = _diagnose(case, model)
    text, table = str(report), report._repr_html_()
    assert isinstance(report.as_dict(), dict) and "<table" in table and str(report.remedy)
    for group in group_names(model):
        assert mentions(text, group) and mentions(table, group), group
    for name in case.frozen:
        assert mentions(text, name), f"frozen parameter {name} not reported"
    for name in case.unused:
        assert mentions(text, name), f"unreached layer {name} not reported"
    if case.name == "tied_lm":
        assert not mentions(text, "decoder.weight"), "a tied weight is listed twice"
    assert unchanged(model, before), "diagnose must leave the model's parameters as they were"


def test_diagnose_names_the_poisoned_parameter(case, model):
    _, _, name = poisoned(case, model)
    report = _diagnose(case, model)
    assert mentions(str(report), name)
    assert name in str(report.as_dict())


# -- (d) AGC's exclusion ----------------------------------------------------------------------------------------
def test_agc_excludes_exactly_the_classifier(case, model):
    from gradstab.clip import agc_parameters, output_module

    x, _ = sample(case, BATCH, seed=3)
    chosen = agc_parameters(model, exclude=output_module(model, x))
    classifier = {id(p) for p in dict(model.named_modules())[case.classifier].parameters()}
    expected = {id(p) for p in model.parameters() if p.requires_grad} - classifier
    assert len(chosen) == len({id(p) for p in chosen})
    assert {id(p) for p in chosen if p.requires_grad} == expected


# -- data checks before the first step --------------------------------------------------------------------------
@pytest.mark.parametrize("broken, field_name", [
    (lambda s: gs.Split(s.x_train, s.y_train.float(), s.x_test, s.y_test), "y_train"),
    (lambda s: gs.Split(s.x_train, s.y_train[:-1], s.x_test, s.y_test), "y_train"),
    (lambda s: gs.Split(s.x_train, s.y_train, s.x_test, s.y_test[:-1]), "y_test"),
    (lambda s: gs.Split(s.x_train[:, :3], s.y_train, s.x_test[:, :3], s.y_test), r"x_train|data\.x"),
    (lambda s: gs.Split(s.x_train.double(), s.y_train, s.x_test.double(), s.y_test), r"x_train|data\.x"),
    (lambda s: list(zip(s.x_train.split(BATCH), s.y_train.float().split(BATCH), strict=True)), r"\by\b|target"),
], ids=["float targets", "train lengths", "test lengths", "feature count", "float64 inputs", "batches"])
def test_train_names_the_broken_field(broken, field_name):
    torch.manual_seed(0)
    case = ZOO[-1]
    split = broken(gs.Split(*sample(case, N_TRAIN, seed=1), *sample(case, N_TEST, seed=2)))
    extra = {"batch_size": BATCH} if isinstance(split, gs.Split) else {}
    with pytest.raises(ValueError, match=field_name):
        gs.train(case.build(), split, lr=1e-2, steps=1, **extra)


# -- the loop's other pieces on a held-out model ----------------------------------------------------------------
def test_optimizer_factory_and_scheduler_instance():
    torch.manual_seed(0)
    case = ZOO[-1]
    model, made = case.build(), []

    def factory(params):
        made.append(torch.optim.SGD(params, lr=0.1))
        return made[-1]

    gs.train(model, training_data(case), steps=STEPS, optimizer=factory, batch_size=BATCH,
             scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    assert len(made) == 1 and {id(p) for g in made[0].param_groups for p in g["params"]} == {
        id(p) for p in model.parameters()}
    assert made[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**STEPS)  # stepped once per update

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    gs.train(model, training_data(case), steps=STEPS, optimizer=opt, scheduler=scheduler, batch_size=BATCH)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**STEPS)


def test_skip_nonfinite_never_applies_a_nan_step():
    torch.manual_seed(0)
    case = next(c for c in ZOO if c.name == "lstm")
    model = case.build()
    inject_nan(model, case.poison)  # every step's gradient of lstm.weight_hh_l0 is NaN
    before = snapshot(model)
    history = gs.train(model, training_data(case), lr=1e-2, steps=STEPS, skip_nonfinite=True, evaluate=False)
    assert unchanged(model, before), history.reason


def test_monitor_rows_can_be_capped_and_reset():
    torch.manual_seed(0)
    case = ZOO[0]
    model = case.build()
    monitor = gs.GradientMonitor(model, max_rows=2)
    for _ in range(3):
        backward(case, model)
        last = monitor.record()
    assert monitor.history("grad").shape == (2, len(monitor.names))
    torch.testing.assert_close(monitor.history("grad")[-1], last)
    monitor.reset()
    assert monitor.history("grad").shape[0] == 0


def test_diagnose_sees_what_training_sees():
    """A gradient hook the user put on a parameter (here one that returns NaN) shapes the gradients that
    gs.train steps with; diagnose on the same model and batch must see the same gradients and name it."""
    from gradstab.diagnose import diagnose

    torch.manual_seed(0)
    case = ZOO[-1]
    model = case.build()
    model.get_parameter(case.poison).register_hook(lambda grad: torch.full_like(grad, math.nan))
    batch = sample(case, BATCH, seed=3)
    assert gs.train(model, [batch], lr=1e-2, steps=1, evaluate=False).diverged_parameter == case.poison
    assert mentions(str(diagnose(model, batch)), case.poison)
