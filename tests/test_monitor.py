import torch
from torch import nn
from torch.nn import functional as F

import gradstab as gs


def _backward(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


def test_layers_are_the_weight_layers_in_order():
    model = gs.cnn(3, norm="batch")
    monitor = gs.GradientMonitor(model)
    assert monitor.names == ["stem.0", "blocks.0.layer", "blocks.1.layer", "blocks.2.layer", "head"]


def test_grad_norms_match_hand_computation():
    model = gs.cnn(3)
    monitor = gs.GradientMonitor(model)
    _backward(model)
    norms = monitor.record()
    for name, value in zip(monitor.names, norms, strict=True):
        module = model.get_submodule(name)
        by_hand = torch.sqrt(sum(p.grad.norm() ** 2 for p in module.parameters(recurse=False)))
        torch.testing.assert_close(value, by_hand)


def test_history_stacks_steps():
    model = gs.cnn(2)
    monitor = gs.GradientMonitor(model)
    for seed in range(3):
        _backward(model, seed)
        monitor.record()
    hist = monitor.history()
    assert hist.shape == (3, 4) and hist.device.type == "cpu"
    assert not torch.equal(hist[0], hist[1])


def test_activation_gradients_match_retained_grads():
    model = gs.cnn(2)
    outputs = {}

    def keep(name):
        def hook(module, inputs, output):
            output.retain_grad()
            outputs[name] = output
        return hook
    handles = [m.register_forward_hook(keep(n)) for n, m in gs.weight_layers(model)]
    with gs.GradientMonitor(model, activations=True) as monitor:
        _backward(model)
        monitor.record()
    for h in handles:
        h.remove()
    expected = torch.stack([outputs[n].grad.norm() for n in monitor.names])
    torch.testing.assert_close(monitor.history("act_grad")[0], expected)


def test_detach_leaves_no_hooks():
    model = gs.cnn(2)
    with gs.GradientMonitor(model, activations=True):
        assert any(m._forward_hooks for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())


def test_update_ratio_matches_sgd_step():
    model = gs.mlp(1, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gs.GradientMonitor(model, updates=True)
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


def test_first_nonfinite():
    monitor = gs.GradientMonitor(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)))
    assert monitor.first_nonfinite(torch.tensor([1.0, 2.0, 3.0])) is None
    assert monitor.first_nonfinite(torch.tensor([1.0, float("inf"), float("nan")])) == "1"


def test_missing_grads_count_as_zero():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model(torch.randn(1, 2))[:, 0].sum().backward()
    model[0].weight.grad = None
    monitor = gs.GradientMonitor(model)
    assert torch.isfinite(monitor.record()).all()
