"""gradstab.diagnose: one-call gradient diagnosis of any model on one batch, with a remedy from the book."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradstab as gs
from gradstab.diagnose import GROWTH_PER_LAYER, NONE_NEEDED, Diagnosis, diagnose


@pytest.fixture(scope="module")
def batch(digits):
    flat = digits.flat()
    return flat.x_train[:64].cpu(), flat.y_train[:64].cpu()  # the models below are built on the CPU


def listed(d: Diagnosis) -> list[str]:
    return [name for h in d.layers for name in h.parameters]


class Sqrt(nn.Module):
    """A raw parameter followed by sqrt behind torch.where: finite loss, NaN gradient (issue 11)."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(64, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = x @ self.mix
        return self.head(torch.where(h > 0, torch.sqrt(h), torch.zeros_like(h)))


class Encoder(nn.Module):
    def __init__(self, dropout=0.1):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


class Lstm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def sequences(n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, 8, generator=gen), torch.randint(4, (n,), generator=gen)


def test_healthy_mlp_needs_no_remedy(batch):
    d = diagnose(gs.mlp(4, width=32, seed=0), batch, lr=0.01)
    assert d.findings == [] and d.remedy is NONE_NEEDED and d.remedy.text == "none needed"
    assert d.first_nonfinite_output is None and d.first_nonfinite_gradient is None and not d.input_nonfinite
    assert all(h.status == "ok" for h in d.layers) and not (d.dead or d.frozen or d.unreached)
    assert d.depth_order == ["stem.0", *(f"blocks.{i}.layer" for i in range(4)), "head"]
    assert 0.8 < d.growth_toward_input < 1.2  # He init: the critical gain, level across depth


def test_healthy_cnn_is_not_called_vanishing(digits):
    # the head's output gradient (the loss's own, after global average pooling over 8 x 8 positions) is
    # far larger than any conv layer's; it is left out of the depth fit, so a level CNN reads as level
    d = diagnose(gs.cnn(8, seed=0).to(digits.device), (digits.x_train[:64], digits.y_train[:64]), lr=0.1)
    assert d.remedy is NONE_NEEDED and 0.8 < d.growth_toward_input < 1.25
    head, last_conv = d.layers[-1].output_grad_rms, d.layers[-2].output_grad_rms
    assert head / last_conv > 50


def test_large_init_explodes_toward_the_input(batch):
    d = diagnose(gs.mlp(20, init=3.0, seed=0), batch)
    # ReLU at gain g: the backward signal grows g / sqrt(2) per layer (2.1), 2.12 for g = 3
    assert 1.9 < d.growth_toward_input < 2.4 and d.grows_toward == "input"
    assert d.ratio_last_first < 1e-4
    assert "clip by global norm" in d.remedy.text and "initialize" in d.remedy.text
    assert "ch1_introduction.ipynb" in d.remedy.pages and "ch2_4_missing.ipynb" in d.remedy.pages
    # the weight gradients alone would not show it: they stay level because activations grow as fast
    norms = [h.grad_norm for h in d.layers if h.depth is not None]
    assert max(norms) / min(norms) < 1e3 < 1 / d.ratio_last_first


def test_xavier_relu_vanishes_toward_the_input(digits):
    flat = digits.flat()
    d = diagnose(gs.mlp(30, init="xavier", width=128, seed=0), (flat.x_train[:128].cpu(), flat.y_train[:128].cpu()))
    assert 1 / d.growth_toward_input > GROWTH_PER_LAYER and d.grows_toward == "output"
    assert "vanishing" in d.remedy.symptom and "He initialization" in d.remedy.text


def test_nan_gradient_with_finite_loss_names_the_parameter(batch):
    d = diagnose(Sqrt(), batch)
    assert math.isfinite(d.loss) and d.first_nonfinite_output is None
    assert d.first_nonfinite_gradient == "mix"
    assert [h.status for h in d.layers] == ["non-finite", "ok"]
    assert "find_nan_op" in d.remedy.text and d.remedy.pages == ("ch5_3_robustness.ipynb",)
    assert all(math.isnan(h.update_ratio) for h in d.layers)  # no probe step over non-finite gradients


def test_forward_nan_names_the_first_module(batch):
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        net[2].weight[0, 0] = math.nan
    d = diagnose(net, batch)
    assert d.first_nonfinite_output == "2" and not d.input_nonfinite
    assert "'2'" in d.remedy.symptom and "ch5_3_robustness.ipynb" in d.remedy.pages


def test_nan_in_the_input_blames_the_data(batch):
    x, y = batch
    x = x.clone()
    x[3, 5] = math.nan
    d = diagnose(gs.mlp(2, seed=0), (x, y))
    assert d.input_nonfinite and d.first_nonfinite_output == "stem.0"
    assert "input batch" in d.remedy.symptom and "guarded_train" in d.remedy.text


class Parts(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(64, 32).requires_grad_(False)
        self.dead = nn.Linear(32, 32)
        self.unused = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)
        with torch.no_grad():
            self.dead.bias.fill_(-1e3)  # every ReLU after it is off: no gradient reaches it

    def forward(self, x):
        return self.head(F.relu(self.dead(F.relu(self.frozen(x)))))


def test_frozen_unreached_and_dead_parameters_are_listed(batch):
    d = diagnose(Parts(), batch)
    assert d.frozen == ["frozen.weight", "frozen.bias"]
    assert d.unreached == ["unused.weight", "unused.bias"]
    assert d.dead == ["dead.weight", "dead.bias"]
    assert [h.status for h in d.layers] == ["dead", "unreached", "ok"]
    assert "frozen.weight" not in listed(d)
    assert any("not used by this forward pass" in f.symptom for f in d.findings)
    assert d.remedy.symptom.startswith("parameters with a gradient of exactly 0")


def test_transformer_every_parameter_once_and_norms_add_up():
    x, y = sequences()
    torch.manual_seed(0)
    model = Encoder(dropout=0.0)
    d = diagnose(model, (x, y))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(listed(d)) == sorted(names) and len(listed(d)) == len(set(listed(d)))
    F.cross_entropy(model(x), y).backward()  # the same gradient, computed here on the model itself
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert math.isclose(math.sqrt(sum(h.grad_norm ** 2 for h in d.layers)), float(total), rel_tol=1e-5)
    assert "encoder.layers.0.self_attn" in d.depth_order and d.remedy is NONE_NEEDED


def test_lstm_every_parameter_once_and_recurrent_radius():
    x, y = sequences()
    torch.manual_seed(0)
    model = Lstm()
    d = diagnose(model, (x, y))
    names = [n for n, _ in model.named_parameters()]
    assert sorted(listed(d)) == sorted(names) and len(listed(d)) == len(set(listed(d)))
    w = model.lstm.weight_hh_l1.detach().double()
    radius = max(float(torch.linalg.eigvals(block).abs().max()) for block in w.chunk(4))
    assert math.isclose(d.recurrent_radius["lstm.weight_hh_l1"], radius, rel_tol=1e-6)
    assert set(d.recurrent_radius) == {"lstm.weight_hh_l0", "lstm.weight_hh_l1"}


def test_vanilla_rnn_with_large_recurrent_weights_gets_clipping():
    x, y = sequences()
    torch.manual_seed(0)
    rnn = nn.RNN(8, 16, batch_first=True)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(3.0 * torch.linalg.qr(torch.randn(16, 16))[0])  # orthogonal x 3: radius 3

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = rnn, nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    d = diagnose(Net(), (x, y))
    assert math.isclose(d.recurrent_radius["rnn.weight_hh_l0"], 3.0, rel_tol=1e-3)
    assert d.remedy.pages[0] == "ch5_4_recurrent.ipynb" and "clip by global norm" in d.remedy.text


def reference_step(model: nn.Module, batch, optimizer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(Δθ, θ') per module of one torch optimizer step on the model itself, parameters concatenated."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    optimizer(model.parameters()).step()
    out = {}
    for name, module in model.named_modules():
        own = [(f"{name}.{n}" if name else n, p) for n, p in module.named_parameters(recurse=False)]
        if own:
            out[name] = (torch.cat([(p.detach() - before[n]).flatten() for n, p in own]),
                         torch.cat([p.detach().flatten() for _, p in own]))
    return out


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adam", 1e-3), ("adamw", 0.01)])
def test_update_ratios_match_a_torch_optimizer_step(batch, optimizer, lr):
    d = diagnose(gs.mlp(3, seed=0), batch, lr=lr, optimizer=optimizer)
    make = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    steps = reference_step(gs.mlp(3, seed=0), batch, lambda params: make(params, lr=lr))
    for h in d.layers:  # ||θ' - θ|| / ||θ'||, θ' after the step, per module
        delta, after = steps[h.name]
        assert math.isclose(h.update_ratio, float(delta.norm() / after.norm()), rel_tol=1e-5)
    delta, after = (torch.cat(parts) for parts in zip(*steps.values(), strict=True))
    assert math.isclose(d.update_ratio, float(delta.norm() / after.norm()), rel_tol=1e-5)  # model-wide
    assert all(0 < h.update_ratio < 1 for h in d.layers)


def test_large_learning_rate_suggests_lower_lr_or_warmup(batch):
    d = diagnose(gs.mlp(4, width=32, seed=0), batch, lr=3.0)
    assert d.update_ratio > 0.1
    assert "learning rate" in d.remedy.text and d.remedy.pages[0] == "ch5_2_scalability.ipynb"
    adam = diagnose(gs.mlp(4, width=32, seed=0), batch, lr=0.1, optimizer="adam")
    assert "clipping alone does not shorten an Adam step" in adam.remedy.text
    x, y = sequences()
    torch.manual_seed(0)
    lstm = diagnose(Lstm(), (x, y), lr=5.0)  # SGD on a recurrent net: clipping first (5.4)
    assert lstm.remedy.pages[0] == "ch5_4_recurrent.ipynb" and "clip by global norm" in lstm.remedy.text


def test_output_gradient_combines_every_call_of_a_module():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))

    torch.manual_seed(0)
    model, x, y = Twice(), torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1])
    d = diagnose(model, (x, y))
    first = model.shared(x)
    second = model.shared(torch.tanh(first))
    first.retain_grad()
    second.retain_grad()
    F.cross_entropy(model.head(torch.tanh(second)), y).backward()
    expected = math.sqrt(float(first.grad.pow(2).sum() + second.grad.pow(2).sum()) / (2 * first.numel()))
    assert math.isclose(d.layers[0].output_grad_rms, expected, rel_tol=1e-5)
    assert d.depth_order == ["shared", "head"]


def test_model_state_is_left_exactly_as_it_was(batch):
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))
    model[4].eval()  # a mixed mode must survive too
    x, y = batch
    F.cross_entropy(model(x), y).backward()  # gradients already present
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: (p.grad, p.grad.clone()) for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    d = diagnose(model, batch, lr=1.0, optimizer="adam")
    assert d.layers  # it did measure something
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(p.grad is grads[n][0] and torch.equal(p.grad, grads[n][1]) for n, p in model.named_parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_gradient_hook_on_a_parameter_is_seen_and_state_survives_an_error(batch):
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    model[3].weight.register_hook(lambda g: torch.full_like(g, math.nan))  # training would step with NaN
    d = diagnose(model, batch)
    assert d.first_nonfinite_gradient == "3.weight" and d.first_nonfinite_output is None
    assert all(p.grad is None for p in model.parameters())

    def broken(output, y):  # fails after the forward pass changed BatchNorm's running statistics
        raise RuntimeError("loss failed")

    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="loss failed"):
        diagnose(model, batch, loss_fn=broken)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert all(torch.equal(p, params[n]) and p.grad is None for n, p in model.named_parameters())


def test_runs_on_the_test_device_and_leaves_its_random_state(digits, device):
    flat = digits.flat()  # on GRADSTAB_TEST_DEVICE (CPU by default)
    model = gs.mlp(3, seed=0, dropout=0.2).to(device)
    params = [p.detach().clone() for p in model.parameters()]
    cuda = device.type == "cuda"
    rng = torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state()
    d = diagnose(model, (flat.x_train[:64], flat.y_train[:64]), lr=0.05)
    assert d.remedy is NONE_NEEDED and all(h.status == "ok" for h in d.layers)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert torch.equal(torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state(), rng)
    with pytest.raises(ValueError, match="batch: x"):  # inputs on another device than the model
        diagnose(gs.mlp(1, seed=0).to("meta"), (flat.x_train[:4], flat.y_train[:4]))
    with pytest.raises(ValueError, match="batch: y"):
        diagnose(gs.mlp(1, seed=0).to("meta"), (flat.x_train[:4].to("meta"), flat.y_train[:4]))


def test_gradient_pass_draws_the_dropout_masks_a_plain_call_would(batch):
    # the NaN search runs a forward pass first; the random state is replayed so the measured pass is the
    # one the model would have run at this point: same masks, same loss
    model = nn.Sequential(nn.Linear(64, 32), nn.Dropout(0.5), nn.Linear(32, 10))
    torch.manual_seed(5)
    with torch.no_grad():
        expected = float(F.cross_entropy(model(batch[0]), batch[1]))
    torch.manual_seed(5)
    assert diagnose(model, batch).loss == expected
    model.eval()  # and in eval mode no dropout at all
    with torch.no_grad():
        assert diagnose(model, batch).loss == float(F.cross_entropy(model(batch[0]), batch[1]))


def test_as_dict_is_strict_json_and_text_and_html_render(batch):
    for d in (diagnose(gs.mlp(2, seed=0), batch), diagnose(Sqrt(), batch)):
        data = json.loads(json.dumps(d.as_dict(), allow_nan=False))
        assert data["remedy"]["text"] == d.remedy.text and len(data["layers"]) == len(d.layers)
        text, page = str(d), d._repr_html_()
        assert all(h.name in text and h.name in page for h in d.layers)
        assert f"remedy: {d.remedy}" in text and page.startswith("<table>") and repr(d) == text
    assert data["layers"][0]["grad_norm"] is None and data["layers"][0]["status"] == "non-finite"
    assert data["first_nonfinite_gradient"] == "mix" and "probe step: sgd at lr 0.001 not taken" in text


def test_tuple_inputs_custom_loss_and_optimizer_factory():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 1), nn.Linear(3, 1)

        def forward(self, u, v):
            return self.a(u) + self.b(v)

    torch.manual_seed(0)
    u, v, target, model = torch.randn(6, 4), torch.randn(6, 3), torch.randn(6, 1), Two()
    d = diagnose(model, ((u, v), target), loss_fn=F.mse_loss,
                 optimizer=lambda params: torch.optim.SGD(params, lr=0.5))
    assert [h.name for h in d.layers] == ["a", "b"] and d.settings["optimizer"] == "custom"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    F.mse_loss(model(u, v), target).backward()
    for h in d.layers:  # SGD at the factory's lr 0.5: Δθ = -0.5 g
        after = torch.cat([(before[n] - 0.5 * p.grad).flatten() for n, p in model.named_parameters()
                           if n.startswith(h.name)])
        assert math.isclose(h.update_ratio, 0.5 * h.grad_norm / float(after.norm()), rel_tol=1e-4)


def test_spectral_norm_and_tied_weights_are_counted_once(batch):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.utils.parametrizations.spectral_norm(nn.Linear(64, 64))
            self.dec = nn.Linear(64, 64)
            self.dec.weight = self.enc.parametrizations.weight.original  # tied
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.dec(torch.relu(self.enc(x))))

    d = diagnose(Tied(), batch)
    assert listed(d) == ["enc.bias", "enc.weight", "dec.bias", "head.weight", "head.bias"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(model="net"), "model"),
    (dict(batch=torch.zeros(3)), "batch"),
    (dict(batch=(torch.zeros(2, 64), torch.zeros(2, dtype=torch.long), 1)), "batch"),
    (dict(batch=("x", torch.zeros(2, dtype=torch.long))), "batch"),
    (dict(lr=0.0), "lr"),
    (dict(lr=-1.0), "lr"),
    (dict(optimizer="rmsprop"), "optimizer"),
    (dict(batch=(torch.zeros(2, 64), torch.zeros(2, 10))), "loss_fn"),
    (dict(loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none")), "loss_fn"),
    (dict(loss_fn="mse"), "loss_fn"),
    (dict(batch=(torch.zeros(2, 64), torch.tensor([0, 10]))), "batch"),
    (dict(batch=(torch.zeros(2, 64), torch.zeros(3, dtype=torch.long))), "batch"),
])
def test_bad_arguments_raise_value_error_naming_them(batch, kwargs, match):
    args = dict(model=gs.mlp(1, seed=0), batch=batch) | kwargs
    model, data = args.pop("model"), args.pop("batch")
    with pytest.raises(ValueError, match=match):
        diagnose(model, data, **args)


def test_a_model_without_trainable_parameters_is_refused(batch):
    with pytest.raises(ValueError, match="model"):
        diagnose(gs.mlp(1, seed=0).requires_grad_(False), batch)


class _LogBetween(nn.Module):
    """log of a ReLU output, written in forward between two modules: -inf where the ReLU gave 0."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.log(torch.relu(self.fc1(x))))


def test_a_nan_made_between_modules_is_told_apart_from_one_made_inside():
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    d = gs.diagnose(_LogBetween(), (x, y))
    assert d.first_nonfinite_output == "fc2" and d.nonfinite_before_output_module
    assert "between modules" in d.remedy.text and "already non-finite" in d.remedy.symptom
    assert d.as_dict()["nonfinite_before_output_module"] is True
    inside = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    with torch.no_grad():
        inside[1].weight[0, 0] = float("inf")
    d = gs.diagnose(inside, (x, y))
    assert d.first_nonfinite_output == "1" and not d.nonfinite_before_output_module
    assert "between modules" not in d.remedy.text
