"""Shared helpers for the benchmarks: the machine, its compute ceiling, timing and Markdown tables."""
from __future__ import annotations

import os
import platform
import time

import torch
from torch.nn import functional as F

import gradstab

gradstab.configure_cpu()  # as the book runs: one thread (or $GRADSTAB_THREADS), subnormals flushed


def device() -> torch.device:
    """The benchmarks run on the CPU unless BENCH_DEVICE names another device."""
    return torch.device(os.environ.get("BENCH_DEVICE", "cpu"))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the numbers were measured on."""
    info = {"CPU": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch threads": torch.get_num_threads(), "python": platform.python_version(),
            "OS": f"{platform.system()} {platform.release()}"}
    if hasattr(os, "getloadavg"):
        info["load average at start (1 min)"] = f"{os.getloadavg()[0]:.2f}"
    if device().type == "cuda":
        info["GPU"] = torch.cuda.get_device_name(device())
    return info


def seconds(fn, dev: torch.device | None = None) -> float:
    """Wall-clock seconds of one call of ``fn``."""
    dev = dev or device()
    sync(dev)
    start = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - start


def rate(fn, flops: float, dev: torch.device, repeats: int = 5) -> float:
    """Best GFLOP/s of ``fn`` (which does ``flops`` operations) over ``repeats`` calls after a warm-up."""
    fn()
    return flops / min(seconds(fn, dev) for _ in range(repeats)) / 1e9


def ceilings(dev: torch.device) -> dict[str, float]:
    """GFLOP/s of one large matmul and of one large 3x3 convolution: what this machine can do at best."""
    a = torch.randn(2048, 2048, device=dev)
    x, w = torch.randn(256, 64, 16, 16, device=dev), torch.randn(64, 64, 3, 3, device=dev)
    return {"matmul 2048x2048x2048": rate(lambda: a @ a, 2 * 2048**3, dev),
            "conv 3x3, 64->64 ch, 256x16x16": rate(lambda: F.conv2d(x, w, padding=1),
                                                   2 * 256 * 16 * 16 * 64 * 64 * 9, dev)}


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; floats get 3 significant digits."""
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def verdict(value: float, goal: float, smaller_is_better: bool, unit: str = "") -> str:
    met = value <= goal if smaller_is_better else value >= goal
    sign = "<=" if smaller_is_better else ">="
    return f"{'met' if met else 'NOT met'}: {value:.3g}{unit} (goal {sign} {goal:g}{unit})"


def report(result: dict) -> None:
    """Print one benchmark's result (its text, then one line per goal), as when run on its own."""
    print(result["text"])
    for goal, line in result["goals"]:
        print(f"{goal}: {line}")
