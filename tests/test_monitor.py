import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradstab as gs
from gradstab.monitor import GradientMonitor, parameter_groups, weight_layers


def _backward(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


# --- models the book never uses ---------------------------------------------------------------------

class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.embed = nn.Linear(4, 16)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mid(self.embed(tokens))).mean(1))


class RawParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(4, 4) / 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(x[:, -1] @ self.mix))


def frozen_mlp():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    model[2].requires_grad_(False)
    return model


def spectral_mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.utils.parametrizations.spectral_norm(nn.Linear(8, 8)),
                         nn.ReLU(), nn.Linear(8, 3))


class Flat(nn.Module):
    """Adapts a (N, T, 4) sequence batch to a model that takes (N, 4)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x[:, -1])


MODELS = {
    "transformer": (Encoder, lambda g: torch.randn(5, 6, 4, generator=g)),
    "lstm": (Recurrent, lambda g: torch.randn(5, 6, 4, generator=g)),
    "tied": (Tied, lambda g: torch.randint(0, 10, (5, 6), generator=g)),
    "raw": (RawParameter, lambda g: torch.randn(5, 6, 4, generator=g)),
    "frozen": (lambda: Flat(frozen_mlp()), lambda g: torch.randn(5, 6, 4, generator=g)),
    "spectral": (lambda: Flat(spectral_mlp()), lambda g: torch.randn(5, 6, 4, generator=g)),
}


def _trained_step(kind, seed=0):
    make, inputs = MODELS[kind]
    torch.manual_seed(seed)
    model = make()
    gen = torch.Generator().manual_seed(seed)
    x = inputs(gen)
    y = torch.randint(0, 3, (len(x),), generator=gen)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return model


@pytest.mark.parametrize("kind", list(MODELS))
def test_layer_norms_split_the_total_gradient_norm(kind):
    model = _trained_step(kind)
    monitor = GradientMonitor(model)
    norms = monitor.record()
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    assert torch.isfinite(norms).all()
    torch.testing.assert_close(norms.square().sum(), total.square(), rtol=1e-5, atol=0)
    # every trainable parameter is listed once (model.parameters() yields a tied weight once)
    assert len(monitor.param_names) == len(set(monitor.param_names)) == sum(p.requires_grad for p in model.parameters())


def test_groups_of_a_transformer_encoder():
    monitor = GradientMonitor(Encoder())
    layer = "encoder.layers.0"
    assert monitor.names[:7] == ["embed", f"{layer}.self_attn", f"{layer}.self_attn.out_proj", f"{layer}.linear1",
                                 f"{layer}.linear2", f"{layer}.norm1", f"{layer}.norm2"]
    assert monitor.param_names[2:4] == [f"{layer}.self_attn.in_proj_weight", f"{layer}.self_attn.in_proj_bias"]
    assert monitor.names[-1] == "head" and len(monitor.names) == 1 + 2 * 6 + 1


def test_lstm_weights_form_one_group():
    groups = dict(parameter_groups(Recurrent()))
    assert list(groups) == ["lstm", "head"]
    assert [n for n, _ in groups["lstm"]] == [f"lstm.{kind}_{m}_l{k}" for k in range(2) for kind in ("weight", "bias")
                                              for m in ("ih", "hh")]


def test_tied_weight_is_counted_once_under_its_first_owner():
    model = _trained_step("tied")
    monitor = GradientMonitor(model)
    assert monitor.names == ["embed", "mid"] and monitor.param_names == ["embed.weight", "mid.weight", "mid.bias"]
    # the shared weight's gradient holds both uses; counted once, the layer norm is its norm
    torch.testing.assert_close(monitor.record()[0], model.embed.weight.grad.norm())


def test_frozen_parameters_are_left_out():
    monitor = GradientMonitor(frozen_mlp())
    assert monitor.names == ["0", "4"] and "2.weight" not in monitor.param_names
    half = frozen_mlp()
    half[2].bias.requires_grad_(True)
    assert GradientMonitor(half).param_names == ["0.weight", "0.bias", "2.bias", "4.weight", "4.bias"]
    with pytest.raises(ValueError, match="requires grad"):
        GradientMonitor(nn.Linear(2, 2).requires_grad_(False))


def test_spectral_norm_is_counted_through_its_original():
    model = _trained_step("spectral")
    monitor = GradientMonitor(model)
    assert monitor.names == ["model.0", "model.2", "model.4"]
    assert monitor.param_names[2:4] == ["model.2.bias", "model.2.weight"]
    original = model.model[2].parametrizations.weight.original
    by_hand = torch.sqrt(original.grad.norm() ** 2 + model.model[2].bias.grad.norm() ** 2)
    torch.testing.assert_close(monitor.record()[1], by_hand)
    assert [n for n, _ in weight_layers(model)] == ["model.0", "model.2", "model.4"]


def test_parametrized_root_and_raw_root_parameters_name_their_group():
    root = nn.utils.parametrizations.spectral_norm(nn.Linear(3, 3))
    assert [(g, [n for n, _ in ps]) for g, ps in parameter_groups(root)] == [("bias", ["bias"]),
                                                                             ("weight", ["weight"])]
    assert GradientMonitor(RawParameter()).names == ["mix", "head"]


def test_missing_gradient_is_nan_and_not_flagged():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    model(torch.randn(3, 2)).sum().backward()
    model[1].weight.grad = model[1].bias.grad = None
    model[2].bias.grad = None  # a layer with one of its two gradients is measured over that one
    monitor = GradientMonitor(model)
    norms = monitor.record()
    assert math.isnan(norms[1]) and torch.isfinite(norms[[0, 2]]).all()
    torch.testing.assert_close(norms[2], model[2].weight.grad.norm())
    assert not monitor.nonfinite(norms).any() and monitor.first_nonfinite(norms) is None
    model.zero_grad(set_to_none=True)
    assert torch.isnan(monitor.record()).all() and monitor.first_nonfinite_parameter() is None


def test_nonfinite_gradient_is_flagged_by_layer_and_parameter():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    model(torch.randn(3, 2)).sum().backward()
    model[0].weight.grad = None
    model[1].bias.grad[0] = float("nan")
    model[2].weight.grad[0, 0] = float("inf")
    monitor = GradientMonitor(model)
    norms = monitor.record()
    assert monitor.nonfinite(norms).tolist() == [False, True, True]
    assert monitor.first_nonfinite(norms) == "1"
    assert monitor.first_nonfinite_parameter() == "1.bias"
    with pytest.raises(ValueError, match="norms"):
        monitor.nonfinite(torch.zeros(2))


@pytest.mark.parametrize("scale", [1.0, 7e18])
def test_layer_norm_is_torchs_total_norm_of_its_gradients(scale):
    model = nn.Linear(2, 2)
    monitor = GradientMonitor(nn.Sequential(model))
    model.weight.grad = torch.full((2, 2), scale)
    model.bias.grad = torch.full((2,), scale * 10 / 7)  # at 7e18 the two norms are finite, their squares' sum not
    norms = monitor.record()
    expected = torch.nn.utils.get_total_norm([model.weight.grad, model.bias.grad])
    torch.testing.assert_close(norms[0], expected, equal_nan=True)
    assert bool(monitor.nonfinite(norms)[0]) == (scale > 1)
    assert monitor.first_nonfinite_parameter() is None  # each parameter's own norm is finite


# --- the book's models: the same layers and numbers as the monitor of weight layers ---------------------

@pytest.mark.parametrize("make", [lambda: gs.cnn(3, norm="none"), lambda: gs.mlp(4, norm="none")])
def test_book_models_keep_the_weight_layer_numbers(make):
    model = make()
    monitor = GradientMonitor(model)
    x = torch.randn(8, 1, 8, 8) if isinstance(model, gs.CNN) else torch.randn(8, 64)
    F.cross_entropy(model(x), torch.arange(8)).backward()
    old = [(name, module) for name, module in model.named_modules()
           if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.ndim >= 2]
    assert monitor.names == [name for name, _ in old]
    by_hand = torch.stack([torch.stack(torch._foreach_norm([p.grad for p in m.parameters(recurse=False)])).float()
                           .square().sum().sqrt() for _, m in old])
    assert torch.equal(monitor.record(), by_hand)


def test_batchnorm_and_skipinit_get_their_own_layers():
    model = gs.cnn(3, norm="batch", residual=True, skipinit=True)
    blocks = [f"blocks.{k}{part}" for k in range(3) for part in ("", ".layer", ".norm")]
    assert GradientMonitor(model).names == ["stem.0", *blocks, "head"]


def test_grad_norms_match_hand_computation():
    model = gs.cnn(3)
    monitor = GradientMonitor(model)
    _backward(model)
    norms = monitor.record()
    assert norms.dtype == torch.float32 and norms.shape == (len(monitor.names),)
    for name, value in zip(monitor.names, norms, strict=True):
        module = model.get_submodule(name)
        by_hand = torch.sqrt(sum(p.grad.norm() ** 2 for p in module.parameters(recurse=False)))
        torch.testing.assert_close(value, by_hand)


def test_history_stacks_steps():
    model = gs.cnn(2)
    monitor = GradientMonitor(model)
    for seed in range(3):
        _backward(model, seed)
        monitor.record()
    hist = monitor.history()
    assert hist.shape == (3, 4) and hist.device.type == "cpu"
    assert not torch.equal(hist[0], hist[1])
    with pytest.raises(ValueError, match="kind"):
        monitor.history("weights")


def test_max_rows_keeps_the_newest_and_reset_forgets():
    model = gs.cnn(2)
    capped, full = GradientMonitor(model, max_rows=2), GradientMonitor(model)
    for seed in range(4):
        _backward(model, seed)
        capped.record()
        full.record()
    assert torch.equal(capped.history(), full.history()[2:])
    capped.reset()
    assert capped.history().shape == (0, 4) and capped.log_dict() == {}
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="max_rows"):
            GradientMonitor(model, max_rows=bad)


def test_log_dict_is_the_last_row():
    model = gs.mlp(1, width=8)
    monitor = GradientMonitor(model, updates=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in range(2):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(4, 64, generator=torch.Generator().manual_seed(seed))),
                        torch.arange(4)).backward()
        monitor.record()
        monitor.before_step()
        opt.step()
        monitor.after_step()
    logged = monitor.log_dict()
    assert list(logged) == [f"{stat}/{name}" for stat in ("grad_norm", "update_ratio") for name in monitor.names]
    assert [logged[f"grad_norm/{n}"] for n in monitor.names] == monitor.history()[-1].tolist()
    assert [logged[f"update_ratio/{n}"] for n in monitor.names] == monitor.history("update_ratio")[-1].tolist()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="model"):
        GradientMonitor("net")
    with pytest.raises(ValueError, match="activations"):
        GradientMonitor(nn.Linear(2, 2), activations="yes")


# --- output gradients -------------------------------------------------------------------------------

def test_activation_gradients_match_retained_grads():
    model = gs.cnn(2)
    outputs = {}

    def keep(name):
        def hook(module, inputs, output):
            output.retain_grad()
            outputs[name] = output
        return hook
    handles = [m.register_forward_hook(keep(n)) for n, m in gs.weight_layers(model)]
    with GradientMonitor(model, activations=True) as monitor:
        _backward(model)
        monitor.record()
    for h in handles:
        h.remove()
    expected = torch.stack([outputs[n].grad.norm() for n in monitor.names])
    torch.testing.assert_close(monitor.history("act_grad")[0], expected)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.shared(torch.tanh(self.shared(x))))


def test_a_module_called_twice_combines_its_calls():
    model = Twice()
    outputs = []

    def keep(module, inputs, output):
        output.retain_grad()
        outputs.append(output)
    handle = model.shared.register_forward_hook(keep)
    with GradientMonitor(model, activations=True) as monitor:
        model(torch.randn(4, 3)).square().sum().backward()
        monitor.record()
    handle.remove()
    shared, head, unused = monitor.history("act_grad")[0]
    torch.testing.assert_close(shared, torch.sqrt(outputs[0].grad.norm() ** 2 + outputs[1].grad.norm() ** 2))
    assert math.isnan(unused) and torch.isfinite(head)


def test_tuple_outputs_use_their_first_tensor():
    model = Recurrent()
    outputs = {}

    def keep(module, inputs, output):
        output[0].retain_grad()
        outputs["lstm"] = output[0]
    handle = model.lstm.register_forward_hook(keep)
    with GradientMonitor(model, activations=True) as monitor:
        F.cross_entropy(model(torch.randn(5, 6, 4)), torch.tensor([0, 1, 2, 0, 1])).backward()
        monitor.record()
    handle.remove()
    torch.testing.assert_close(monitor.history("act_grad")[0, 0], outputs["lstm"].grad.norm())
    assert torch.isfinite(monitor.history("act_grad")[0]).all()


def test_detach_leaves_no_hooks():
    model = gs.cnn(2)
    with GradientMonitor(model, activations=True):
        assert any(m._forward_hooks for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())


def test_update_ratio_matches_sgd_step():
    model = gs.mlp(1, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradientMonitor(model, updates=True)
    x, y = torch.randn(4, 64), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model(x), y).backward()
    grads = {n: torch.sqrt(sum(p.grad.norm() ** 2 for p in model.get_submodule(n).parameters(recurse=False)))
             for n in monitor.names}
    monitor.before_step()
    opt.step()
    monitor.after_step()
    ratio = monitor.history("update_ratio")[0]
    for name, r in zip(monitor.names, ratio, strict=True):
        weights = torch.sqrt(sum(p.norm() ** 2 for p in model.get_submodule(name).parameters(recurse=False)))
        torch.testing.assert_close(r, 0.1 * grads[name] / weights)


def test_fsdp2_sharded_parameters(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        for layer in (model[0], model[2], model):
            fully_shard(layer)
        monitor = GradientMonitor(model, activations=True, updates=True)
        with monitor:
            F.cross_entropy(model(torch.randn(5, 4)), torch.tensor([0, 1, 2, 0, 1])).backward()
            norms = monitor.record()
            monitor.before_step()
            torch.optim.SGD(model.parameters(), lr=0.1).step()
            monitor.after_step()
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).full_tensor()
        assert type(norms) is torch.Tensor and monitor.first_nonfinite(norms) is None
        torch.testing.assert_close(norms.square().sum(), total.square())
        assert torch.isfinite(monitor.history("act_grad")).all()
        assert (monitor.history("update_ratio") > 0).all()
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:Using backward.. with create_graph=True")
def test_rows_hold_no_autograd_graph_after_create_graph():
    model = gs.mlp(1, width=8)
    monitor = GradientMonitor(model, activations=True)
    with monitor:
        F.cross_entropy(model(torch.randn(4, 64)), torch.arange(4)).backward(create_graph=True)
        norms = monitor.record()
    assert model.head.weight.grad.requires_grad  # the gradients carry a graph ...
    assert not norms.requires_grad and not monitor.history("act_grad").requires_grad  # ... the rows do not
    model.zero_grad(set_to_none=True)


def test_half_precision_gradients_are_measured_in_float32():
    model = nn.Sequential(nn.Linear(4, 4)).half()
    model[0].weight.grad = torch.full((4, 4), 3e4, dtype=torch.float16)  # norm 1.2e5 > float16's max 65504
    model[0].bias.grad = torch.ones(4, dtype=torch.float16)
    monitor = GradientMonitor(model)
    norms = monitor.record()
    assert norms.dtype == torch.float32 and norms.item() == pytest.approx((16 * 9e8 + 4) ** 0.5, rel=1e-4)
    assert not monitor.nonfinite(norms).any() and monitor.first_nonfinite_parameter() is None


def test_float64_models_are_measured_in_float64_then_stored_in_float32():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).double()
    with GradientMonitor(model, activations=True) as monitor:
        model(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
        norms = monitor.record()
    by_hand = torch.stack([torch.sqrt(m.weight.grad.norm() ** 2 + m.bias.grad.norm() ** 2) for m in model]).float()
    torch.testing.assert_close(norms, by_hand)
    assert monitor.history("act_grad").dtype == torch.float32 and torch.isfinite(monitor.history("act_grad")).all()


def test_sparse_embedding_gradients_are_measured_like_dense_ones():
    """nn.Embedding(sparse=True) gives a sparse .grad (repeated ids as duplicate entries): its norm is the dense one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 2))
    ids = torch.tensor([[1, 1, 3], [3, 5, 1]])  # repeated ids: the uncoalesced gradient has duplicates
    monitor = gs.GradientMonitor(model)
    model(ids).square().sum().backward()
    norms = monitor.record()
    assert model[0].weight.grad.is_sparse
    torch.testing.assert_close(norms[0], model[0].weight.grad.to_dense().norm())
    assert monitor.first_nonfinite_parameter() is None and not bool(monitor.nonfinite(norms).any())
