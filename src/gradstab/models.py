"""Networks with the knobs the book turns: depth, width, normalization, residual, init, dropout.

Every network is ``stem -> depth hidden blocks -> head``. A block is
``linear map -> [norm] -> activation -> [dropout]``; with ``residual=True`` it becomes
``x + branch_scale * block(x)`` (``skipinit=True`` makes the scale a learned scalar that
starts at 0, De & Smith 2020).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._check import one_of, positive_float, positive_int
from .device import resolve_seed

NORMS = ("none", "batch", "batch_scratch", "layer")
INITS = ("he", "xavier")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "linear": nn.Identity}


def _norm(norm: str, width: int, conv: bool) -> nn.Module:
    if norm == "none":
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm2d(width) if conv else nn.BatchNorm1d(width)
    if norm == "batch_scratch":
        from .norm import BatchNorm1d, BatchNorm2d

        return BatchNorm2d(width) if conv else BatchNorm1d(width)
    return nn.GroupNorm(1, width) if conv else nn.LayerNorm(width)  # "layer"


def _dropout(p: float) -> nn.Module:
    if p == 0:
        return nn.Identity()
    from .regularize import Dropout

    return Dropout(p)


def init_weights(model: nn.Module, init="he", bias_std: float = 0.0) -> nn.Module:
    """Initialize every Conv/Linear weight in place; biases are drawn from N(0, bias_std^2) (0: set to zero).

    ``"he"``: N(0, 2/fan_in) (He et al. 2015); ``"xavier"``: N(0, 2/(fan_in+fan_out))
    (Glorot & Bengio 2010); a number g: N(0, g^2/fan_in), so g = sqrt(2) equals ``"he"``.
    With a gain g and ``bias_std`` s this is the random network of mean-field theory with
    sigma_w^2 = g^2 and sigma_b^2 = s^2 (Poole et al. 2016; see :mod:`gradstab.theory`).
    """
    gain = _check_init(init)
    positive_float("bias_std", bias_std, allow_zero=True)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_out, fan_in = module.weight.shape[0], module.weight[0].numel()
            std = math.sqrt(2 / (fan_in + fan_out)) if init == "xavier" else gain / math.sqrt(fan_in)
            with torch.no_grad():
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.normal_(0.0, bias_std) if bias_std > 0 else module.bias.zero_()
    return model


def _check_init(init) -> float | None:
    if isinstance(init, str):
        one_of("init", init, INITS)
        return math.sqrt(2) if init == "he" else None
    if isinstance(init, bool) or not isinstance(init, (int, float)):
        raise ValueError(f"init must be 'he', 'xavier' or a positive number (a gain); got {init!r}")
    return positive_float("init", init)


class Block(nn.Module):
    """One hidden layer: ``map -> norm -> activation -> dropout``, optionally residual."""

    def __init__(self, layer: nn.Module, norm: nn.Module, act: nn.Module, drop: nn.Module,
                 residual: bool, branch_scale: float, skipinit: bool):
        super().__init__()
        self.layer, self.norm, self.act, self.drop = layer, norm, act, drop
        self.residual = residual
        if skipinit:
            self.alpha = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("alpha", torch.tensor(float(branch_scale)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop(self.act(self.norm(self.layer(x))))
        return x + self.alpha * out if self.residual else out


class _Net(nn.Module):
    """Shared constructor logic for the CNN and the MLP."""

    conv = False

    def __init__(self, depth, width, norm, residual, branch_scale, skipinit, init, dropout, activation,
                 in_size, num_classes, bias_std):
        super().__init__()
        positive_int("depth", depth)
        positive_int("width", width)
        one_of("norm", norm, NORMS)
        one_of("activation", activation, tuple(ACTIVATIONS))
        positive_float("branch_scale", branch_scale, allow_zero=True)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        _check_init(init)
        positive_float("bias_std", bias_std, allow_zero=True)
        self.config = dict(depth=depth, width=width, norm=norm, residual=residual, branch_scale=branch_scale,
                           skipinit=skipinit, init=init, dropout=dropout, activation=activation,
                           bias_std=bias_std)
        act = ACTIVATIONS[activation]
        self.stem = nn.Sequential(self._map(in_size, width), act())
        self.blocks = nn.Sequential(*(
            Block(self._map(width, width, bias=norm == "none"), _norm(norm, width, self.conv), act(),
                  _dropout(dropout), residual, branch_scale, skipinit)
            for _ in range(depth)
        ))
        self.head = nn.Linear(width, num_classes)
        init_weights(self, init, bias_std)

    def _map(self, n_in, n_out, bias=True):
        return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias) if self.conv else nn.Linear(n_in, n_out, bias=bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


class CNN(_Net):
    """A CNN for (N, C, 8, 8) images: 3x3 conv stem, ``depth`` 3x3 conv blocks, global average pool, linear head.

    The spatial size is kept (padding 1), so depth changes nothing but the number of layers.
    """

    conv = True

    def __init__(self, depth: int, width: int = 16, norm: str = "none", residual: bool = False,
                 branch_scale: float = 1.0, skipinit: bool = False, init="he", dropout: float = 0.0,
                 activation: str = "relu", in_channels: int = 1, num_classes: int = 10, bias_std: float = 0.0):
        super().__init__(depth, width, norm, residual, branch_scale, skipinit, init, dropout, activation,
                         in_channels, num_classes, bias_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.stem[0].in_channels:
            raise ValueError(f"input must have shape (N, {self.stem[0].in_channels}, H, W); got {tuple(x.shape)}")
        return self.head(self.features(x).mean(dim=(2, 3)))


class MLP(_Net):
    """A fully connected net: linear stem, ``depth`` hidden blocks of ``width`` units, linear head."""

    def __init__(self, depth: int, width: int = 64, norm: str = "none", residual: bool = False,
                 branch_scale: float = 1.0, skipinit: bool = False, init="he", dropout: float = 0.0,
                 activation: str = "relu", in_features: int = 64, num_classes: int = 10, bias_std: float = 0.0):
        super().__init__(depth, width, norm, residual, branch_scale, skipinit, init, dropout, activation,
                         in_features, num_classes, bias_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.stem[0].in_features:
            raise ValueError(f"input must have shape (N, {self.stem[0].in_features}); got {tuple(x.shape)}")
        return self.head(self.features(x))


def cnn(depth: int, seed: int | None = None, **knobs) -> CNN:
    """Build a :class:`CNN` with its weights drawn from ``seed`` (same seed, same weights;
    ``None``: :func:`~gradstab.device.base_seed`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(resolve_seed(seed))
        return CNN(depth, **knobs)


def mlp(depth: int, seed: int | None = None, **knobs) -> MLP:
    """Build an :class:`MLP` with its weights drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(resolve_seed(seed))
        return MLP(depth, **knobs)
