"""Parity of gradstab.norm.BatchNorm1d/2d with torch.nn.BatchNorm1d/2d."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradstab.norm import BatchNorm1d, BatchNorm2d

ATOL = 1e-5
C = 4
STEPS = 3

# (id, our class, torch class, input shape)
CASES = [
    ("1d-2D", BatchNorm1d, nn.BatchNorm1d, (8, C)),
    ("1d-3D", BatchNorm1d, nn.BatchNorm1d, (5, C, 6)),
    ("2d", BatchNorm2d, nn.BatchNorm2d, (3, C, 4, 5)),
]
case_params = pytest.mark.parametrize("ours_cls,ref_cls,shape", [c[1:] for c in CASES], ids=[c[0] for c in CASES])


def assert_close(a, b, atol=ATOL):
    assert a is not None and b is not None
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= atol


def make_pair(ours_cls, ref_cls, **kwargs):
    ours, ref = ours_cls(C, **kwargs), ref_cls(C, **kwargs)
    with torch.no_grad():  # non-trivial affine params so the affine path is exercised
        if ref.weight is not None:
            ref.weight.uniform_(0.5, 1.5)
        if ref.bias is not None:
            ref.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def random_input(shape, seed):
    g = torch.Generator().manual_seed(seed)
    # non-zero mean / non-unit scale per channel so the running stats move visibly
    scale = torch.rand(shape[1], generator=g) * 3 + 0.5
    shift = torch.randn(shape[1], generator=g) * 2
    view = [1, shape[1]] + [1] * (len(shape) - 2)
    return torch.randn(shape, generator=g) * scale.view(view) + shift.view(view)


def forward_backward(module, x, grad_out):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(grad_out)
    return y.detach(), x.grad


@case_params
@pytest.mark.parametrize(
    "affine,bias",
    [(True, True), (False, True), (True, False)],
    ids=["affine", "no_affine", "affine_no_bias"],
)
@pytest.mark.parametrize(
    "momentum,track",
    [(0.3, True), (None, True), (0.1, False)],  # momentum is unused without running stats
    ids=["track-m0.3", "track-cma", "no_track"],
)
def test_train_then_eval_matches_torch(ours_cls, ref_cls, shape, affine, bias, momentum, track):
    ours, ref = make_pair(ours_cls, ref_cls, affine=affine, momentum=momentum, track_running_stats=track, bias=bias)
    for step in range(STEPS):
        x = random_input(shape, seed=step)
        grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(100 + step))
        y_o, gx_o = forward_backward(ours, x, grad_out)
        y_r, gx_r = forward_backward(ref, x, grad_out)
        assert_close(y_o, y_r)
        assert_close(gx_o, gx_r)
        if affine:
            assert_close(ours.weight.grad, ref.weight.grad)
        else:
            assert ours.weight is None
        if affine and bias:
            assert_close(ours.bias.grad, ref.bias.grad)
        else:
            assert ours.bias is None
        if track:
            assert_close(ours.running_mean, ref.running_mean)
            assert_close(ours.running_var, ref.running_var)
            assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == step + 1
        else:
            assert ours.running_mean is None and ours.running_var is None
            assert ours.num_batches_tracked is None

    if track:  # the stats must really have moved away from (0, 1)
        assert ours.running_mean.abs().max() > 0.1

    ours.eval()
    ref.eval()
    x = random_input(shape, seed=99)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(199))
    y_o, gx_o = forward_backward(ours, x, grad_out)
    y_r, gx_r = forward_backward(ref, x, grad_out)
    assert_close(y_o, y_r)
    assert_close(gx_o, gx_r)
    if track:  # eval must not touch running stats
        assert ours.num_batches_tracked.item() == STEPS
        assert_close(ours.running_mean, ref.running_mean)


@case_params
def test_eval_uses_running_stats_not_batch_stats(ours_cls, ref_cls, shape):
    ours, _ = make_pair(ours_cls, ref_cls)
    with torch.no_grad():
        ours.running_mean.fill_(2.0)
        ours.running_var.fill_(4.0)
        ours.weight.fill_(1.0)
        ours.bias.fill_(0.0)
    ours.eval()
    x = random_input(shape, seed=3)
    expected = (x - 2.0) / torch.sqrt(torch.tensor(4.0 + ours.eps))
    assert_close(ours(x), expected)


@case_params
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("affine,bias", [(True, True), (False, True), (True, False)])
def test_state_dict_keys_and_buffers_match_torch(ours_cls, ref_cls, shape, track, affine, bias):
    kwargs = {"affine": affine, "track_running_stats": track, "bias": bias}
    ours, ref = ours_cls(C, **kwargs), ref_cls(C, **kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert dict(ours.named_buffers()).keys() == dict(ref.named_buffers()).keys()
    assert dict(ours.named_parameters()).keys() == dict(ref.named_parameters()).keys()
    for key, value in ref.state_dict().items():
        assert ours.state_dict()[key].dtype == value.dtype
        assert_close(ours.state_dict()[key].float(), value.float())
    assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]


@case_params
def test_load_state_dict_both_ways(ours_cls, ref_cls, shape):
    ours, ref = make_pair(ours_cls, ref_cls)
    for step in range(3):
        ref(random_input(shape, seed=step))

    # torch -> ours
    fresh = ours_cls(C)
    fresh.load_state_dict(ref.state_dict())
    assert fresh.num_batches_tracked.item() == 3
    fresh.eval()
    ref.eval()
    x = random_input(shape, seed=42)
    assert_close(fresh(x), ref(x))

    # ours -> torch
    for step in range(3):
        ours(random_input(shape, seed=10 + step))
    back = ref_cls(C)
    back.load_state_dict(ours.state_dict())
    back.eval()
    ours.eval()
    assert_close(back(x), ours(x))
    assert back.num_batches_tracked.item() == 3


@case_params
def test_does_not_call_torch_batch_norm(ours_cls, ref_cls, shape, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch batch_norm must not be used")

    monkeypatch.setattr(torch.nn.functional, "batch_norm", forbidden)
    monkeypatch.setattr(torch, "batch_norm", forbidden)
    ours = ours_cls(C)
    ours(random_input(shape, seed=0))
    ours.eval()
    ours(random_input(shape, seed=1))


def test_float64_module_matches_torch():
    ours, ref = make_pair(BatchNorm2d, nn.BatchNorm2d)
    ours.double()
    ref.double()
    x = random_input((3, C, 2, 2), seed=0).double()
    y = ours(x)
    assert y.dtype == torch.float64
    assert_close(y, ref(x), atol=1e-12)
    assert_close(ours.running_var, ref.running_var, atol=1e-12)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("cls", [BatchNorm1d, BatchNorm2d])
def test_bad_constructor_arguments(cls):
    with pytest.raises(ValueError, match=r"num_features must be >= 1, got 0"):
        cls(0)
    with pytest.raises(ValueError, match="num_features"):
        cls(-3)
    with pytest.raises(ValueError, match="eps"):
        cls(C, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        cls(C, eps=-1e-5)
    with pytest.raises(ValueError, match="momentum"):
        cls(C, momentum=-0.1)
    with pytest.raises(ValueError, match="momentum"):
        cls(C, momentum=1.5)
    cls(C, momentum=0.0)
    cls(C, momentum=1.0)
    cls(C, momentum=None)


@pytest.mark.parametrize("shape", [(C,), (2, C, 3, 3), (2, C, 3, 3, 3)])
def test_batchnorm1d_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"input must be 2D or 3D \(N, C\[, L\]\)"):
        BatchNorm1d(C)(torch.randn(shape))


@pytest.mark.parametrize("shape", [(2, C), (2, C, 3), (2, C, 3, 3, 3)])
def test_batchnorm2d_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"input must be 4D \(N, C, H, W\)"):
        BatchNorm2d(C)(torch.randn(shape))


@case_params
def test_channel_mismatch(ours_cls, ref_cls, shape):
    bad = list(shape)
    bad[1] = C + 1
    with pytest.raises(ValueError, match=rf"input has {C + 1} channels but num_features={C}"):
        ours_cls(C)(torch.randn(bad))
    m = ours_cls(C).eval()
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(bad))


@pytest.mark.parametrize(
    "cls,shape",
    [(BatchNorm1d, (1, C)), (BatchNorm1d, (1, C, 1)), (BatchNorm2d, (1, C, 1, 1))],
)
def test_single_value_per_channel_in_training(cls, shape):
    m = cls(C)
    with pytest.raises(ValueError, match="more than one value per channel"):
        m(torch.randn(shape))
    assert m.num_batches_tracked.item() == 0  # rejected before touching the stats
    # torch also needs batch stats (and rejects this) when no running stats are tracked
    with pytest.raises(ValueError, match="more than one value per channel"):
        cls(C, track_running_stats=False).eval()(torch.randn(shape))
    # eval with running stats is fine, like torch
    m.eval()
    assert m(torch.randn(shape)).shape == shape
    # N=1 with L>1 / H*W>1 is also fine in training
    big = (1, C, 3) if len(shape) == 3 else (1, C, 2, 2) if len(shape) == 4 else (2, C)
    cls(C)(torch.randn(big))


# ------------------------------------------------------------ dtypes: statistics in float32, as torch

LOW = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # about two units in the last place, relative


def assert_close_low(a, b, rtol):
    """Equal up to a couple of roundings of the low-precision result, relative to the largest value
    (with float16 weights torch rounds at other places than we do). inf matches inf: a float16 running
    variance above 65504 overflows in torch's module as in ours."""
    scale = b.float().nan_to_num(posinf=0).abs().max().item()
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("x_dtype", list(LOW), ids=["float16", "bfloat16"])
@pytest.mark.parametrize("same_dtype", [True, False], ids=["module-same", "module-float32"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_low_precision_input_matches_torch(x_dtype, same_dtype, momentum):
    """Channels with variance above 65504 (float16's largest number): statistics must not overflow."""
    module_dtype = x_dtype if same_dtype else torch.float32
    ours, ref = make_pair(BatchNorm2d, nn.BatchNorm2d, momentum=momentum)
    ours.to(module_dtype)
    ref.to(module_dtype)
    atol = LOW[x_dtype]
    for step in range(STEPS):
        x = (random_input((6, C, 4, 4), seed=step) * 400).to(x_dtype)  # std up to ~1400, var up to ~2e6
        assert x.float().var(dim=(0, 2, 3)).max() > 65504
        grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(50 + step)).to(x_dtype)
        y_o, gx_o = forward_backward(ours, x, grad_out)
        y_r, gx_r = forward_backward(ref, x, grad_out)
        assert y_o.dtype == y_r.dtype == x_dtype and gx_o.dtype == x_dtype
        assert torch.isfinite(y_o).all() and y_o.float().abs().max() > 1  # not the zeros of an overflow
        assert_close_low(y_o, y_r, atol)
        assert_close_low(gx_o, gx_r, atol)
        assert ours.running_var.dtype == ref.running_var.dtype == module_dtype
        assert_close_low(ours.running_var, ref.running_var, atol)
        assert_close_low(ours.running_mean, ref.running_mean, atol)
    ours.eval()
    ref.eval()
    x = (random_input((6, C, 4, 4), seed=9) * 400).to(x_dtype)
    y_o, y_r = ours(x), ref(x)
    assert y_o.dtype == x_dtype
    assert_close_low(y_o, y_r, atol)


@pytest.mark.parametrize(
    "module_dtype,x_dtype",
    [(torch.float32, torch.float64), (torch.float64, torch.float32), (torch.float16, torch.float32),
     (torch.bfloat16, torch.float16)],
)
def test_mixed_dtypes_torch_refuses_are_refused(module_dtype, x_dtype):
    x = random_input((3, C, 2, 2), seed=0).to(x_dtype)
    with pytest.raises(RuntimeError):
        nn.BatchNorm2d(C, dtype=module_dtype)(x)
    for train in (True, False):
        with pytest.raises(ValueError, match=f"input dtype must be the module's.*got {x_dtype}"):
            BatchNorm2d(C, dtype=module_dtype).train(train)(x)
    with pytest.raises(ValueError, match="dtype"):
        BatchNorm1d(C)(torch.ones(3, C, dtype=torch.long))
    # without parameters or running stats there is no module dtype: any float input works
    y = BatchNorm2d(C, affine=False, track_running_stats=False)(x)
    assert y.dtype == x_dtype


# ------------------------------------------------------------- state dicts: torch's own checkpoints


def test_version_1_checkpoint_without_counter_loads_like_torch():
    src = nn.BatchNorm2d(C)
    src(random_input((3, C, 2, 2), seed=0))
    state = src.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    for cls in (BatchNorm2d, nn.BatchNorm2d):
        module = cls(C)
        module.load_state_dict(state)  # strict
        assert module.num_batches_tracked.item() == 0
        assert torch.equal(module.running_mean, src.running_mean)
    state._metadata[""]["version"] = 2  # a version-2 checkpoint must have it
    for cls in (BatchNorm2d, nn.BatchNorm2d):
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            cls(C).load_state_dict(state)


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch"])
def test_cumulative_average_continues_after_loading(direction):
    """momentum=None averages over num_batches_tracked batches: the counter must travel with the stats."""
    src_cls, dst_cls = (nn.BatchNorm1d, BatchNorm1d) if direction == "torch->ours" else (BatchNorm1d, nn.BatchNorm1d)
    src = src_cls(C, momentum=None)
    for step in range(4):
        src(random_input((8, C), seed=step))
    dst = dst_cls(C, momentum=None)
    dst.load_state_dict(src.state_dict())
    assert dst.num_batches_tracked.item() == 4
    x = random_input((8, C), seed=7)
    src(x)
    dst(x)  # the fifth batch gets weight 1/5 in both
    assert_close(dst.running_mean, src.running_mean)
    assert_close(dst.running_var, src.running_var)
    fresh = dst_cls(C, momentum=None)
    fresh(x)  # a counter left at 0 would give this batch weight 1
    assert (fresh.running_mean - src.running_mean).abs().max() > 0.1


def test_strict_loading_reports_mismatches_like_torch():
    tracked = nn.BatchNorm2d(C).state_dict()
    for cls in (BatchNorm2d, nn.BatchNorm2d):
        with pytest.raises(RuntimeError, match="Unexpected key"):
            cls(C, track_running_stats=False).load_state_dict(tracked)
        result = cls(C, track_running_stats=False).load_state_dict(tracked, strict=False)
        assert sorted(result.unexpected_keys) == ["num_batches_tracked", "running_mean", "running_var"]
        with pytest.raises(RuntimeError, match="size mismatch"):
            cls(C + 1).load_state_dict(tracked)


@pytest.mark.parametrize("train", [True, False])
def test_whole_model_checkpoint_from_torch_batchnorm(train):
    """A gs.cnn checkpoint saved with torch's BatchNorm loads strictly into the scratch-BatchNorm net and back."""
    import gradstab as gs

    ref = gs.cnn(3, seed=0, norm="batch")
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref(x)  # move the running stats
    ours = gs.cnn(3, seed=1, norm="batch_scratch")
    ours.load_state_dict(ref.state_dict())
    ref.train(train)
    ours.train(train)
    assert_close(ours(x), ref(x))
    back = gs.cnn(3, seed=2, norm="batch")
    back.load_state_dict(ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values(),
                                                  strict=True))
