"""gradstab: gradient stability toolkit for the book *Taming Exploding Gradients*.

Use it as ``import gradstab as gs``.
"""
from . import plots
from .claims import ClaimFailed, claim, claim_between
from .clip import adaptive_clip_grad_, agc_parameters, clip_grad_norm_, clip_grad_value_
from .data import Split, batches, load_digits
from .device import make_deterministic, pick_device, seed_everything
from .models import CNN, MLP, cnn, init_weights, mlp
from .monitor import GradientMonitor, weight_layers
from .norm import BatchNorm1d, BatchNorm2d
from .regularize import Dropout, decoupled_weight_decay_, l1_penalty, l2_penalty
from .train import History, accuracy, train

__version__ = "0.1.0"

__all__ = [
    "CNN",
    "MLP",
    "BatchNorm1d",
    "BatchNorm2d",
    "ClaimFailed",
    "Dropout",
    "GradientMonitor",
    "History",
    "Split",
    "accuracy",
    "adaptive_clip_grad_",
    "agc_parameters",
    "batches",
    "claim",
    "claim_between",
    "clip_grad_norm_",
    "clip_grad_value_",
    "cnn",
    "decoupled_weight_decay_",
    "init_weights",
    "l1_penalty",
    "l2_penalty",
    "load_digits",
    "make_deterministic",
    "mlp",
    "pick_device",
    "plots",
    "seed_everything",
    "train",
    "weight_layers",
]
