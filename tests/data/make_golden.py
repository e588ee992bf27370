"""Record tests/data/golden_histories.json: what the book's own models did under the training loops of commit
afe06fc (separate train, guarded_train and amp_train), so that tests/test_train.py can check the one loop that
replaced them reproduces those histories.

Run from the repository root with the code to record on the path, e.g.
``git archive afe06fc src | tar -x -C /tmp/old && PYTHONPATH=/tmp/old/src .venv/bin/python tests/data/make_golden.py``.
Each case is stored with its own recipe (function, model, data, keyword arguments), which the test replays.
"""
from __future__ import annotations

import json
import math
import pathlib
import platform

import torch

import gradstab as gs

STEPS = 20
CASES = {
    "cnn4": dict(fn="train", model=["cnn", 4, {}], data="digits", kwargs=dict(lr=0.05)),
    "cnn2 monitored": dict(fn="train", model=["cnn", 2, {"width": 8}], data="digits",
                           kwargs=dict(lr=0.05, activations=True, updates=True)),
    "mlp4 max_norm": dict(fn="train", model=["mlp", 4, {}], data="flat", kwargs=dict(lr=0.1, max_norm=0.5)),
    "mlp4 clip_value": dict(fn="train", model=["mlp", 4, {}], data="flat", kwargs=dict(lr=0.1, clip_value=0.01)),
    "mlp4 agc": dict(fn="train", model=["mlp", 4, {}], data="flat", kwargs=dict(lr=0.1, agc=0.01)),
    "mlp4 warmup": dict(fn="train", model=["mlp", 4, {}], data="flat", kwargs=dict(lr=0.1, warmup=5)),
    "mlp4 adam": dict(fn="train", model=["mlp", 4, {}], data="flat", kwargs=dict(lr=1e-3, optimizer="adam")),
    "mlp4 weight_decay": dict(fn="train", model=["mlp", 4, {}], data="flat",
                              kwargs=dict(lr=0.05, weight_decay=1e-2, momentum=0.0)),
    "cnn8 residual, gradient overflows": dict(fn="train", model=["cnn", 8, {"residual": True}], data="digits",
                                              kwargs=dict(lr=1.0)),
    "cnn16 residual, loss nan": dict(fn="train", model=["cnn", 16, {"residual": True}], data="digits",
                                     kwargs=dict(lr=0.5)),
    "mlp4 loss_limit": dict(fn="train", model=["mlp", 4, {}], data="flat", kwargs=dict(lr=0.05, loss_limit=2.0)),
    "guarded nan row": dict(fn="guarded_train", model=["mlp", 4, {}], data="nan row 7", kwargs=dict(lr=0.05)),
    "guarded scaled rows": dict(fn="guarded_train", model=["mlp", 4, {}], data="scaled rows",
                                kwargs=dict(lr=0.05, steps=40)),
    "amp bfloat16": dict(fn="amp_train", model=["mlp", 4, {}], data="flat", kwargs=dict(lr=0.05, dtype="bfloat16")),
    "amp float16 overflow": dict(fn="amp_train", model=["mlp", 4, {}], data="flat",
                                 kwargs=dict(lr=0.05, dtype="float16", init_scale=2.0**24, growth_interval=5)),
    "amp clip scaled": dict(fn="amp_train", model=["mlp", 4, {}], data="flat",
                            kwargs=dict(lr=0.05, dtype="bfloat16", max_norm=1.0, unscale_before_clip=False)),
}


def dataset(name: str, digits: gs.Split) -> gs.Split:
    flat = digits.flat()
    if name == "digits":
        return digits
    if name == "flat":
        return flat
    if name == "nan row 7":
        return gs.corrupt(flat, [7])
    eighth = list(gs.batches(len(flat.y_train), 64, 9, 0))[8]  # rows of step 8's batch (seed 0)
    return gs.corrupt(flat, eighth[:2].tolist(), scale=1000.0)


def run(case: dict, digits: gs.Split):
    arch, depth, knobs = case["model"]
    model = (gs.cnn if arch == "cnn" else gs.mlp)(depth, seed=0, **knobs)
    fn = {"train": gs.train, "guarded_train": gs.guarded_train, "amp_train": gs.amp_train}[case["fn"]]
    return fn(model, dataset(case["data"], digits), **{"steps": STEPS, "seed": 0, **case["kwargs"]})


def numbers(values) -> list:
    """Floats as JSON can hold them (nan and inf as strings)."""
    return [v if math.isfinite(v) else str(v) for v in map(float, values)]


def record(history) -> dict:
    out = {"loss": numbers(history.loss), "test_accuracy": numbers([history.test_accuracy])[0]}
    for name in ("grad_norms", "act_grad_norms", "update_ratios"):
        if hasattr(history, name):
            out[name] = [numbers(row) for row in getattr(history, name).tolist()]
    for name in ("layer_names", "diverged", "diverged_step", "diverged_layer", "reason", "skipped"):
        if hasattr(history, name):
            out[name] = getattr(history, name)
    for name in ("grad_norm", "scale"):
        if hasattr(history, name):
            out[name] = numbers(getattr(history, name))
    if hasattr(history, "events"):
        out["events"] = [dict(step=e.step, kind=e.kind, row=e.row, restored_to=e.restored_to) for e in history.events]
    return out


def main() -> None:
    gs.configure_cpu(threads=1)
    digits = gs.load_digits("cpu")
    golden = {"steps": STEPS, "torch": torch.__version__, "machine": platform.machine(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cases": {}}
    for name, case in CASES.items():
        golden["cases"][name] = {"recipe": case, "history": record(run(case, digits))}
        print(name, golden["cases"][name]["history"].get("diverged_step"), golden["cases"][name]["history"]["loss"][-1])
    path = pathlib.Path(__file__).with_name("golden_histories.json")
    path.write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    main()
