"""gradstab.curvature: Hessian-vector products and the sharpness, against known spectra and PyTorch's Hessian."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradstab as gs


class Quadratic(nn.Module):
    """The loss 0.5 theta^T A theta (with ``half_quadratic``): its Hessian is A, whatever the input."""

    def __init__(self, n: int):
        super().__init__()
        self.theta = nn.Parameter(torch.linspace(-1.0, 1.0, n, dtype=torch.float64))

    def forward(self, x):
        return self.theta.expand(len(x), -1)


def with_spectrum(eigenvalues, seed=0):
    """A symmetric matrix with the given eigenvalues and a random orthogonal eigenbasis."""
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def half_quadratic(a):
    def loss_fn(out, y):
        theta = out[0]
        return 0.5 * theta @ a @ theta
    return loss_fn


def tiny_mlp(device, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double().to(device)


def tiny_batch(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    return x.to(device), y.to(device)


def full_hessian(model, loss_fn, x, y):
    """The Hessian w.r.t. all parameters, flattened, by torch.autograd.functional.hessian."""
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in params]

    def loss_of(flat):
        pieces = torch.split(flat, sizes)
        state = {n: v.view_as(p) for n, v, p in zip(names, pieces, params, strict=True)}
        return loss_fn(torch.func.functional_call(model, state, (x,)), y)

    return torch.autograd.functional.hessian(loss_of, torch.cat([p.reshape(-1) for p in params]))


def test_quadratic_sharpness_is_the_top_eigenvalue():
    spectrum = [7.5, 3.0, 1.0, 0.5, -2.0, 0.1]
    model, a = Quadratic(6), with_spectrum(spectrum)
    x = torch.zeros(1, 1)
    result = gs.sharpness(model, half_quadratic(a), x, x, tol=1e-10, iterations=500)
    assert result.converged
    assert result.value == pytest.approx(7.5, rel=1e-4)
    top = torch.linalg.eigh(a).eigenvectors[:, -1]
    assert abs(float(result.vector @ top)) == pytest.approx(1.0, abs=1e-4)
    assert result.stable_lr == pytest.approx(2 / 7.5, rel=1e-4)


def test_negative_curvature_that_dominates_is_shifted_away():
    model, a = Quadratic(4), with_spectrum([-10.0, 3.0, 1.0, -1.0], seed=1)
    x = torch.zeros(1, 1)
    result = gs.sharpness(model, half_quadratic(a), x, x, tol=1e-10, iterations=2000)
    assert result.value == pytest.approx(3.0, rel=1e-4)


def test_sharpness_matches_torch_hessian_on_a_tiny_mlp(device):
    model = tiny_mlp(device)
    x, y = tiny_batch(device)
    top = float(torch.linalg.eigvalsh(full_hessian(model, F.mse_loss, x, y))[-1])
    result = gs.sharpness(model, F.mse_loss, x, y, tol=1e-10, iterations=2000)
    assert result.value == pytest.approx(top, rel=1e-4)
    assert result.vector.device.type == torch.device(device).type and result.vector.dtype == torch.float64


def test_hvp_equals_hessian_times_vector(device):
    model = tiny_mlp(device, seed=3)
    x, y = tiny_batch(device, seed=3)
    h = full_hessian(model, F.mse_loss, x, y)
    v = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device)
    hv = gs.hessian_vector_product(model, F.mse_loss, x, y, v)
    torch.testing.assert_close(hv, h @ v, rtol=1e-9, atol=1e-12)


def test_warm_start_converges_in_fewer_iterations():
    model = tiny_mlp("cpu", seed=1)
    x, y = tiny_batch("cpu", seed=1)
    before = gs.sharpness(model, F.mse_loss, x, y, tol=1e-8, iterations=5000)
    with torch.no_grad():  # a small change of the parameters, as one training step makes
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    cold = gs.sharpness(model, F.mse_loss, x, y, tol=1e-8, iterations=5000)
    warm = gs.sharpness(model, F.mse_loss, x, y, start=before.vector, tol=1e-8, iterations=5000)
    assert warm.value == pytest.approx(cold.value, rel=1e-5)
    assert warm.iterations < cold.iterations / 2


def test_same_seed_same_result():
    model = tiny_mlp("cpu")
    x, y = tiny_batch("cpu")
    a = gs.sharpness(model, F.mse_loss, x, y, seed=4, iterations=7, tol=1e-14)
    b = gs.sharpness(model, F.mse_loss, x, y, seed=4, iterations=7, tol=1e-14)
    assert a.value == b.value and a.iterations == b.iterations == 7 and not a.converged


def test_grads_and_mode_are_left_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 2)).double()
    x, y = tiny_batch("cpu")
    marks = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), marks, strict=True):
        p.grad = g.clone()
    model.eval()
    gs.sharpness(model, F.mse_loss, x, y, iterations=5)
    assert not model.training
    model.train()
    n = sum(p.numel() for p in model.parameters())
    gs.hessian_vector_product(model, F.mse_loss, x, y, torch.ones(n, dtype=torch.float64))
    assert model.training
    for p, g in zip(model.parameters(), marks, strict=True):
        assert torch.equal(p.grad, g)
    bare = tiny_mlp("cpu")
    gs.sharpness(bare, F.mse_loss, x, y, iterations=3)
    assert all(p.grad is None for p in bare.parameters())


def test_batchnorm_running_statistics_are_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).double().train()
    x, y = tiny_batch("cpu")
    before = {n: b.clone() for n, b in model.named_buffers()}
    gs.sharpness(model, F.mse_loss, x, y, iterations=5)
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    model(x)  # control: a plain forward pass in train mode does move them
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])


def test_eval_mode_is_what_is_measured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 2)).double()
    x, y = tiny_batch("cpu")
    model.eval()
    with_dropout_off = gs.sharpness(model, F.mse_loss, x, y, tol=1e-10, iterations=2000).value
    plain = nn.Sequential(model[0], model[1], model[3])
    assert with_dropout_off == pytest.approx(gs.sharpness(plain, F.mse_loss, x, y, tol=1e-10,
                                                          iterations=2000).value, rel=1e-6)


@pytest.mark.parametrize("kwargs, name", [
    (dict(model="not a model"), "model"),
    (dict(model=nn.ReLU()), "model"),
    (dict(loss_fn=3), "loss_fn"),
    (dict(x=[1.0, 2.0]), "x"),
    (dict(y=torch.zeros(3, 2)), "rows"),
    (dict(start=torch.ones(4)), "start"),
    (dict(start="warm"), "start"),
    (dict(start="zeros"), "start"),
    (dict(start="nan"), "start"),
    (dict(seed=True), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(iterations=0), "iterations"),
    (dict(tol=0.0), "tol"),
    (dict(tol=math.nan), "tol"),
])
def test_bad_input_raises_value_error_naming_it(kwargs, name):
    model = tiny_mlp("cpu")
    x, y = tiny_batch("cpu")
    n = sum(p.numel() for p in model.parameters())
    args = dict(model=model, loss_fn=F.mse_loss, x=x, y=y)
    args.update(kwargs)
    if kwargs.get("start") == "zeros":
        args["start"] = torch.zeros(n, dtype=torch.float64)
    elif kwargs.get("start") == "nan":
        args["start"] = torch.full((n,), math.nan, dtype=torch.float64)
    model_, loss_fn, x_, y_ = (args.pop(k) for k in ("model", "loss_fn", "x", "y"))
    with pytest.raises(ValueError, match=name):
        gs.sharpness(model_, loss_fn, x_, y_, **args)


def test_hvp_bad_vector_and_nonfinite_loss():
    model = tiny_mlp("cpu")
    x, y = tiny_batch("cpu")
    with pytest.raises(ValueError, match="vector"):
        gs.hessian_vector_product(model, F.mse_loss, x, y, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="not finite"):
        gs.sharpness(model, F.mse_loss, x, torch.full_like(y, math.inf))
