import os

import pytest

import gradstab as gs

gs.configure_cpu()  # the settings the book runs with: one thread (unless $GRADSTAB_THREADS), subnormals flushed


@pytest.fixture(scope="session")
def device():
    """CPU by default; GRADSTAB_TEST_DEVICE=cuda runs the device-aware tests on a GPU."""
    return gs.pick_device(os.environ.get("GRADSTAB_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="session")
def digits(device):
    return gs.load_digits(device)
