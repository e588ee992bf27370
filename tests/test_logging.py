"""The monitor logs to TensorBoard through torch.utils.tensorboard: an example that is also a test."""
import pytest
import torch
from torch.nn import functional as F

import gradstab as gs
from gradstab.monitor import GradientMonitor

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402


def test_log_dict_to_tensorboard(tmp_path):
    model = gs.mlp(2, width=8, norm="layer")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradientMonitor(model, activations=True, updates=True)
    logged = []
    with monitor, SummaryWriter(log_dir=str(tmp_path)) as writer:
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            opt.zero_grad()
            F.cross_entropy(model(torch.randn(4, 64, generator=gen)), torch.arange(4)).backward()
            monitor.record()
            monitor.before_step()
            opt.step()
            monitor.after_step()
            values = monitor.log_dict()
            for tag, value in values.items():
                writer.add_scalar(tag, value, step)
            logged.append(values)

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert sorted(tags) == sorted(logged[0]) and len(tags) == 3 * len(monitor.names)
    assert "grad_norm/blocks.0.norm" in tags  # LayerNorm's affine parameters are a layer of their own
    for tag in tags:
        read = events.Scalars(tag)
        assert [e.step for e in read] == [0, 1, 2]
        expected = torch.tensor([row[tag] for row in logged])
        torch.testing.assert_close(torch.tensor([e.value for e in read]), expected)  # stored as float32
    history = {"grad_norm": monitor.history("grad"), "act_grad_norm": monitor.history("act_grad"),
               "update_ratio": monitor.history("update_ratio")}
    for stat, rows in history.items():
        for i, name in enumerate(monitor.names):
            read = torch.tensor([e.value for e in events.Scalars(f"{stat}/{name}")])
            torch.testing.assert_close(read, rows[:, i])
