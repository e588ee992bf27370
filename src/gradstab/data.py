"""Data sets: scikit-learn's bundled handwritten digits (no download) with a fixed split."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._check import positive_float
from .device import pick_device


@dataclass(frozen=True)
class Split:
    """Train and test tensors. Images are (N, 1, 8, 8) float32, labels (N,) int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def to(self, device) -> Split:
        return Split(*(t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test)))

    def flat(self) -> Split:
        """The same split with each image flattened to 64 features (for MLPs)."""
        return Split(self.x_train.flatten(1), self.y_train, self.x_test.flatten(1), self.y_test)


def load_digits(device=None, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """The 1,797 8x8 digit images shipped with scikit-learn, split stratified by class.

    Pixels (0..16) are standardized with the training set's mean and standard deviation,
    so the first layer sees inputs of unit scale. The same ``seed`` always gives the same split.
    """
    positive_float("test_fraction", test_fraction)
    if not test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits as _sk_load_digits  # here, so importing gradstab skips sklearn
    from sklearn.model_selection import train_test_split

    digits = _sk_load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        range(len(y)), test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    split = Split((x_train - mean) / std, y[idx_train], (x_test - mean) / std, y[idx_test])
    return split.to(pick_device() if device is None else torch.device(device))


def batches(n: int, batch_size: int, steps: int, seed: int):
    """Yield ``steps`` index tensors of ``batch_size``, walking seeded permutations of range(n)."""
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        yield order[pos : pos + batch_size]
        pos += batch_size
