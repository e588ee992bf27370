"""Which device to compute on, and how to make runs repeatable."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from ._check import positive_int

ENV_VAR = "GRADSTAB_DEVICE"
THREADS_VAR = "GRADSTAB_THREADS"
SEED_VAR = "GRADSTAB_SEED"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def pick_device(prefer: str | None = None) -> torch.device:
    """Return the device to use: ``prefer``, else ``$GRADSTAB_DEVICE``, else CUDA, then MPS, then CPU.

    An explicit choice that is not available raises a ValueError instead of silently
    falling back, so a run never lands on another device than the one asked for.
    """
    name = prefer or os.environ.get(ENV_VAR, "").strip() or None
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps'; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but CUDA is not available here")
    if device.type == "mps" and not _mps_available():
        raise ValueError(f"device {name!r} was requested but MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps'; got {name!r}")
    return device


def base_seed() -> int:
    """The first seed of every experiment: ``$GRADSTAB_SEED`` if set, else 0.

    Every ``seed=None`` in gradstab (models, :func:`~gradstab.train.train`, sweeps, probes, tasks)
    means this seed, and :func:`seeds` counts up from it. Setting ``GRADSTAB_SEED=1000`` therefore
    reruns a whole notebook on seeds it was never written for: the book's held-out check.
    Raises ValueError if the variable is not a non-negative integer.
    """
    raw = os.environ.get(SEED_VAR, "0").strip()
    if not raw.isdigit():
        raise ValueError(f"{SEED_VAR} must be a non-negative integer, got {raw!r}")
    return int(raw)


def resolve_seed(seed: int | None) -> int:
    """``seed`` itself if given (a non-negative int), else :func:`base_seed`."""
    if seed is None:
        return base_seed()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    return seed


def seeds(n: int) -> list[int]:
    """``n`` consecutive seeds starting at :func:`base_seed`: the seeds of one multi-seed claim.

    >>> seeds(3)  # with GRADSTAB_SEED unset
    [0, 1, 2]
    """
    positive_int("n", n)
    start = base_seed()
    return list(range(start, start + n))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices) with one call."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def make_deterministic(enabled: bool = True) -> None:
    """Ask torch for deterministic kernels (on GPU this may cost speed; some ops then raise).

    On CPU the same seed already gives the same numbers; on GPU, cuDNN's autotuner and
    atomic-add reductions can change the last bits between runs unless this is on.
    """
    torch.backends.cudnn.benchmark = not enabled
    torch.backends.cudnn.deterministic = enabled
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def use_threads(n: int | None = None) -> int:
    """Set torch's CPU thread count to ``n``, else ``$GRADSTAB_THREADS``, else 1; return it.

    Importing gradstab changes nothing; the book's notebooks call this through
    :func:`configure_cpu`. One thread is the default because the book's
    small networks gain little from more, and because a float reduction split across a
    different number of threads rounds differently: a chaotic training run (one near the
    edge of divergence) then takes another path. One thread makes the same seed give the
    same numbers on every CPU machine, which the book's checked claims rely on.
    """
    if n is None:
        raw = os.environ.get(THREADS_VAR, "1").strip()
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{THREADS_VAR} must be a positive integer, got {raw!r}")
        n = int(raw)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    torch.set_num_threads(n)
    return n


_FLUSH_DENORMAL = False  # what configure_cpu last set (torch has no getter); sweep workers copy it


def configure_cpu(threads: int | None = None, flush_denormal: bool = True) -> dict:
    """The CPU settings the book's claims are measured with; importing gradstab sets nothing.

    - threads: :func:`use_threads` (``threads``, else ``$GRADSTAB_THREADS``, else 1);
    - flush_denormal: ``torch.set_flush_denormal`` — treat subnormal floats (below about 1.2e-38
      in float32) as 0. The vanishing gradients of a dead layer are subnormal and make x86 CPUs
      roughly 10x slower; flushing them changes values only below that bound.

    Both settings are process-wide. Returns ``{"threads": n, "flush_denormal": bool}``.
    Raises ValueError for a bad thread count or a non-bool ``flush_denormal``.
    """
    global _FLUSH_DENORMAL
    if not isinstance(flush_denormal, bool):
        raise ValueError(f"flush_denormal must be True or False, got {flush_denormal!r}")
    n = use_threads(threads)
    supported = torch.set_flush_denormal(flush_denormal)  # False on CPUs without the mode
    _FLUSH_DENORMAL = flush_denormal and supported
    return {"threads": n, "flush_denormal": _FLUSH_DENORMAL}


def cpu_settings() -> dict:
    """The thread count and flush-denormal setting in force now (for worker processes to copy)."""
    return {"threads": torch.get_num_threads(), "flush_denormal": _FLUSH_DENORMAL}
