"""Data sets: scikit-learn's bundled handwritten digits (no download) with a fixed split."""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
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


def batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """Yield ``steps`` index tensors of ``batch_size``, walking seeded permutations of range(n)."""
    yield from itertools.islice(_seeded_rows(n, batch_size, seed), steps)


def _seeded_rows(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless :func:`batches`: a new permutation whenever fewer than ``batch_size`` rows are left."""
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(n, generator=gen), 0
    while True:
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


Batch = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # inputs, targets, training-set rows (or None)


def training_batches(data, batch_size: int, seed: int, device) -> tuple[Iterator[Batch], tuple]:
    """An endless stream of ``(x, y, rows)`` training batches from ``data``, and the tensors to check first.

    ``data`` is a :class:`Split` (batches of ``batch_size`` rows (all if fewer) from :func:`batches` with
    ``seed``; ``rows`` are their indices; the tensors to check are the whole training set), or any iterable
    of ``(x, y)`` pairs such as a DataLoader (re-iterated whenever exhausted, each pair moved to ``device``;
    ``rows`` is None; the tensors to check are the first pair). Raises ValueError if ``data`` is neither,
    yields no batch, or yields something other than a pair of tensors.
    """
    if isinstance(data, Split):
        n = len(data.y_train)
        stream = ((data.x_train[idx], data.y_train[idx], idx)
                  for idx in (rows.to(data.device) for rows in _seeded_rows(n, min(batch_size, n), seed)))
        return stream, (data.x_train, data.y_train)
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise ValueError(f"data must be a gradstab Split or an iterable of (x, y) batches such as a DataLoader, "
                         f"got {type(data).__name__}")
    stream = _repeat(data, torch.device(device))
    first = next(stream)
    return itertools.chain([first], stream), first[:2]


def _repeat(data: Iterable, device: torch.device) -> Iterator[Batch]:
    passes = 0
    while True:
        count = 0
        for batch in data:
            count += 1
            yield (*_pair(batch, device), None)
        if not count:
            after = " after its first pass (an iterator cannot be re-iterated: pass a list, a DataLoader or " \
                    "fewer steps)" if passes else ""
            raise ValueError(f"data yielded no batches{after}")
        passes += 1


def _pair(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"each batch of data must be a pair (x, y), got {type(batch).__name__}"
                         f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}")
    for value, name in zip(batch, ("data.x", "data.y"), strict=True):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor in every batch, got {type(value).__name__}")
    return tuple(t.to(device, non_blocking=True) for t in batch)
