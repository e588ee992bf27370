import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import gradstab as gs


def test_default_is_cpu_without_accelerators(monkeypatch):
    monkeypatch.delenv("GRADSTAB_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gs.device, "_mps_available", lambda: False)
    assert gs.pick_device() == torch.device("cpu")


def test_cuda_preferred_then_mps(monkeypatch):
    monkeypatch.delenv("GRADSTAB_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gs.pick_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gs.device, "_mps_available", lambda: True)
    assert gs.pick_device() == torch.device("mps")


def test_env_overrides(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("GRADSTAB_DEVICE", "cpu")
    assert gs.pick_device() == torch.device("cpu")


def test_explicit_argument_beats_env(monkeypatch):
    monkeypatch.setenv("GRADSTAB_DEVICE", "cuda")
    assert gs.pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "gpu0", "nonsense"])
def test_unknown_device_rejected(monkeypatch, name):
    monkeypatch.setenv("GRADSTAB_DEVICE", name)
    with pytest.raises(ValueError, match="device"):
        gs.pick_device()


def test_unavailable_cuda_rejected(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        gs.pick_device("cuda")


def test_seed_everything_seeds_all_generators():
    gs.seed_everything(7)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    gs.seed_everything(7)
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b
    gs.seed_everything(8)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) != a


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        gs.seed_everything(seed)


def test_use_threads_default_env_and_argument(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("GRADSTAB_THREADS", raising=False)
        assert gs.use_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("GRADSTAB_THREADS", "2")
        assert gs.use_threads() == 2 and torch.get_num_threads() == 2
        assert gs.use_threads(1) == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("raw", ["0", "-1", "two", ""])
def test_bad_thread_env(monkeypatch, raw):
    monkeypatch.setenv("GRADSTAB_THREADS", raw)
    with pytest.raises(ValueError, match="GRADSTAB_THREADS"):
        gs.use_threads()


def test_seeds_follow_the_held_out_base(monkeypatch):
    monkeypatch.delenv("GRADSTAB_SEED", raising=False)
    assert gs.seeds(3) == [0, 1, 2] and gs.base_seed() == 0
    monkeypatch.setenv("GRADSTAB_SEED", "1000")
    assert gs.seeds(2) == [1000, 1001]
    # every default seed moves with it: the model's weights and the training run's batches
    assert torch.equal(gs.mlp(2).stem[0].weight, gs.mlp(2, seed=1000).stem[0].weight)
    assert not torch.equal(gs.mlp(2).stem[0].weight, gs.mlp(2, seed=0).stem[0].weight)
    data = gs.load_digits().flat()
    assert gs.train(gs.mlp(2), data, lr=0.1, steps=2, evaluate=False).config["seed"] == 1000


@pytest.mark.parametrize("raw", ["-1", "x", "1.5"])
def test_bad_seed_base_rejected(monkeypatch, raw):
    monkeypatch.setenv("GRADSTAB_SEED", raw)
    with pytest.raises(ValueError, match="GRADSTAB_SEED"):
        gs.seeds(1)


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_seeds_count_checked(n):
    with pytest.raises(ValueError, match="n must be"):
        gs.seeds(n)


def test_import_changes_nothing_global():
    """Importing gradstab leaves torch's thread count alone and loads neither matplotlib nor scikit-learn."""
    code = ("import sys, torch; torch.set_num_threads(2); import gradstab; "
            "print(torch.get_num_threads(), 'matplotlib' in sys.modules, 'sklearn' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "GRADSTAB_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["2", "False", "False"]


def test_configure_cpu_sets_threads_and_flush(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("GRADSTAB_THREADS", raising=False)
    try:
        assert gs.configure_cpu(threads=2) == {"threads": 2, "flush_denormal": True}
        tiny = torch.tensor(1e-40)  # subnormal in float32
        assert float(tiny * 1.0) == 0.0  # flushed
        assert gs.configure_cpu(flush_denormal=False) == {"threads": 1, "flush_denormal": False}
        assert float(torch.tensor(1e-40) * 1.0) > 0.0
    finally:
        gs.configure_cpu()
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_configure_cpu_rejects_non_bool_flush(bad):
    with pytest.raises(ValueError, match="flush_denormal"):
        gs.configure_cpu(flush_denormal=bad)
