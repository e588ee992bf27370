import pytest
import torch

import gradstab as gs

torch.set_num_threads(1)  # tiny models: one thread is as fast and avoids oversubscription


@pytest.fixture(scope="session")
def digits():
    return gs.load_digits("cpu")
