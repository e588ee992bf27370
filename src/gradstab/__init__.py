"""gradstab: gradient stability toolkit for the book *Taming Exploding Gradients*.

Use it as ``import gradstab as gs``.
"""
from . import explore, report, theory
from .amp import AmpHistory, amp_train, autocast_dtype, fp16_underflow
from .claims import ClaimFailed, Spread, claim, claim_between, claim_median, claim_seeds, spread
from .clip import adaptive_clip_grad_, agc_parameters, clip_grad_norm_, clip_grad_value_, output_module
from .curvature import Sharpness, hessian_vector_product, sharpness
from .data import Split, batches, load_digits
from .device import (
    base_seed,
    configure_cpu,
    make_deterministic,
    pick_device,
    seed_everything,
    seeds,
    use_threads,
)
from .diagnose import Diagnosis, LayerHealth, Remedy, diagnose
from .distributed import run_distributed
from .exercise import check_answer
from .guard import (
    Checkpoint,
    GuardedRun,
    NanSource,
    SpikeDetector,
    corrupt,
    find_nan_op,
    first_nonfinite_output,
    grads_finite,
    guarded_train,
)
from .models import CNN, MLP, cnn, init_weights, mlp
from .monitor import GradientMonitor, parameter_groups, weight_layers
from .norm import BatchNorm1d, BatchNorm2d
from .probe import Profile, gradient_through_time, growth_per_layer, linear_gradient_norms, signal_profile
from .recurrent import RecurrentClassifier, rnn, sequence_task, state_gradients
from .regularize import Dropout, decoupled_weight_decay_, l1_penalty, l2_penalty
from .report import best_run, comparison_table, final_loss, phase_grid
from .sweep import sweep, sweep_grid
from .train import History, accuracy, train

__version__ = "0.1.0"



def __getattr__(name: str):
    """``gs.plots`` is imported on first use, so that importing gradstab does not load matplotlib."""
    if name == "plots":
        import importlib

        return importlib.import_module(".plots", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AmpHistory",
    "Checkpoint",
    "GuardedRun",
    "NanSource",
    "RecurrentClassifier",
    "SpikeDetector",
    "amp_train",
    "autocast_dtype",
    "corrupt",
    "find_nan_op",
    "first_nonfinite_output",
    "fp16_underflow",
    "grads_finite",
    "guarded_train",
    "rnn",
    "sequence_task",
    "state_gradients",
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
    "output_module",
    "batches",
    "claim",
    "claim_between",
    "claim_median",
    "claim_seeds",
    "spread",
    "Spread",
    "seeds",
    "base_seed",
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
    "explore",
    "seed_everything",
    "use_threads",
    "configure_cpu",
    "sweep",
    "sweep_grid",
    "train",
    "weight_layers",
    "parameter_groups",
    "diagnose",
    "run_distributed",
    "check_answer",
    "Diagnosis",
    "LayerHealth",
    "Remedy",
    "theory",
    "Profile",
    "gradient_through_time",
    "growth_per_layer",
    "linear_gradient_norms",
    "signal_profile",
    "report",
    "best_run",
    "comparison_table",
    "final_loss",
    "phase_grid",
    "Sharpness",
    "hessian_vector_product",
    "sharpness",
]
