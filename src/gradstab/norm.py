"""Batch normalization written from plain tensor ops (parity with ``torch.nn.BatchNorm*``).

Training mode, per channel ``c`` over every dim except dim 1::

    mu_c    = mean(x[:, c])
    var_c   = mean((x[:, c] - mu_c) ** 2)                 # biased, used to normalize
    y[:, c] = (x[:, c] - mu_c) / sqrt(var_c + eps) * weight_c + bias_c

    running_mean <- (1 - m) * running_mean + m * mu
    running_var  <- (1 - m) * running_var  + m * var * n / (n - 1)   # unbiased

with ``m = momentum``, or ``m = 1 / num_batches_tracked`` (cumulative moving average)
when ``momentum is None``. Eval mode normalizes with the running statistics, unless
``track_running_stats=False``, in which case the batch statistics are used (as torch does).
The backward pass is left to autograd.

Dtypes, as torch: the input has the module's dtype, or is float16/bfloat16 with a float32 module
(mixed precision). Statistics and normalization are computed in float32 for float16/bfloat16 input (a
float16 channel whose variance exceeds 65504 would otherwise overflow) and in the input's dtype otherwise;
the output has the input's dtype and the running statistics keep the module's.

State dicts are interchangeable with torch's (same keys, dtypes and version 2 metadata); a version-1
checkpoint without ``num_batches_tracked`` loads with the counter at 0, as in torch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._check import positive_float

__all__ = ["BatchNorm1d", "BatchNorm2d"]

LOW_PRECISION = (torch.float16, torch.bfloat16)  # statistics of these are computed in float32


class _BatchNorm(nn.Module):
    """Shared implementation; subclasses define the accepted input ranks."""

    _version = 2  # same as torch's BatchNorm (state dicts carry num_batches_tracked)
    _ranks: tuple[int, ...] = ()
    _layout = ""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features!r}")
        positive_float("eps", eps)
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1] or be None, got {momentum}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats

        factory = {"device": device, "dtype": dtype}
        self.register_parameter("weight", nn.Parameter(torch.empty(num_features, **factory)) if affine else None)
        self.register_parameter(
            "bias",
            nn.Parameter(torch.empty(num_features, **factory)) if affine and bias else None,
        )
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """running_mean <- 0, running_var <- 1, num_batches_tracked <- 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset running stats; weight <- 1, bias <- 0 (when present)."""
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Load as torch's BatchNorm does: a checkpoint older than version 2 has no ``num_batches_tracked``
        and gets the module's current counter (0 for a fresh module) instead of a missing-key error."""
        key = prefix + "num_batches_tracked"
        if local_metadata.get("version", 1) < 2 and self.track_running_stats and key not in state_dict:
            state_dict[key] = self.num_batches_tracked
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _module_dtype(self) -> torch.dtype | None:
        tensor = self.weight if self.weight is not None else self.running_mean
        return None if tensor is None else tensor.dtype

    def _check_input(self, x: Tensor) -> None:
        if x.dim() not in self._ranks:
            ranks = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(f"input must be {ranks} {self._layout}, got {x.dim()}D input")
        if x.shape[1] != self.num_features:
            raise ValueError(f"input has {x.shape[1]} channels but num_features={self.num_features}")
        module = self._module_dtype()
        mixed = x.dtype in LOW_PRECISION and module == torch.float32
        if not x.is_floating_point() or not (module is None or x.dtype == module or mixed):
            raise ValueError(
                f"input dtype must be the module's ({module}), or float16/bfloat16 with a float32 module; "
                f"got {x.dtype}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` of shape (N, C, *) per channel; returns a tensor of the same shape and dtype.

        Raises ValueError for a wrong rank, channel count or dtype (see the module docstring), and for
        one value per channel when batch statistics are needed."""
        self._check_input(x)
        reduce_dims = [0, *range(2, x.dim())]
        shape = [1, self.num_features] + [1] * (x.dim() - 2)
        dtype = torch.float32 if x.dtype in LOW_PRECISION else x.dtype  # the statistics' dtype
        h = x.to(dtype)

        use_batch_stats = self.training or self.running_mean is None
        if use_batch_stats:
            n = x.numel() // self.num_features
            if n <= 1:
                raise ValueError(
                    "batch statistics need more than one value per channel "
                    f"(N * spatial size = {n}); got input of shape {tuple(x.shape)}"
                )
            mean = h.mean(dim=reduce_dims)
            var = h.var(dim=reduce_dims, unbiased=False)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean, var, n)
        else:
            mean, var = self.running_mean.to(dtype), self.running_var.to(dtype)

        y = (h - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(dtype).view(shape)
        if self.bias is not None:
            y = y + self.bias.to(dtype).view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, n: int) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            m = 1.0 / float(self.num_batches_tracked)
        else:
            m = self.momentum
        unbiased_var = var * (n / (n - 1))  # in the statistics' dtype, stored in the module's
        self.running_mean.copy_((1.0 - m) * self.running_mean.to(mean.dtype) + m * mean)
        self.running_var.copy_((1.0 - m) * self.running_var.to(var.dtype) + m * unbiased_var)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) input; statistics per channel C."""

    _ranks = (2, 3)
    _layout = "(N, C[, L])"


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) input; statistics per channel C."""

    _ranks = (4,)
    _layout = "(N, C, H, W)"
