import math

import pytest
import torch

import gradstab as gs
from gradstab.report import CHANCE_LOSS, best_run, comparison_rows, comparison_table, final_loss, phase_grid


def run(loss, acc=0.9, diverged=False, step=None, grad=1.0, seconds=0.5, **config):
    """A hand-made History (no training needed)."""
    n = len(loss)
    norms = torch.full((n, 2), grad)
    return gs.History(loss=list(loss), layer_names=["a", "b"], grad_norms=norms, act_grad_norms=torch.zeros(0, 2),
                      update_ratios=torch.zeros(0, 2), diverged=diverged, diverged_step=step, test_accuracy=acc,
                      seconds=seconds, config=config)


def test_final_loss_averages_the_tail_and_is_nan_when_diverged():
    assert final_loss(run([5.0] * 5 + [1.0, 2.0, 3.0]), last=3) == pytest.approx(2.0)
    assert final_loss(run([4.0, 2.0]), last=10) == pytest.approx(3.0)
    assert math.isnan(final_loss(run([1.0, math.nan], diverged=True, step=1)))
    with pytest.raises(ValueError, match="last"):
        final_loss(run([1.0]), last=0)


def test_comparison_rows_keep_order_and_values():
    rows = comparison_rows({"b": run([1.0], acc=0.5, grad=3.0, seconds=1.25),
                            "a": run([1.0, math.nan], diverged=True, step=1, grad=7.0)})
    assert [r.label for r in rows] == ["b", "a"]
    assert rows[0].test_accuracy == 0.5 and rows[0].max_grad_norm == 3.0 and rows[0].seconds == 1.25
    assert rows[1].diverged and rows[1].diverged_step == 1


def test_comparison_table_markdown():
    table = comparison_table({"clip | 1.0": run([1.0], acc=0.987, grad=12.345, seconds=2.0),
                              "baseline": run([1.0, math.nan], diverged=True, step=38, grad=6.8e4)})
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| configuration | test accuracy |")
    assert lines[2] == "| clip \\| 1.0 | 98.7% | 12.3 | no | 2.00 |"
    assert lines[3] == "| baseline | — | 6.8e+04 | yes, at step 38 | 0.50 |"
    with pytest.raises(ValueError, match="histories"):
        comparison_table({})


def test_best_run_ignores_diverged_runs():
    runs = {"x": run([1.0], acc=0.6), "y": run([1.0], acc=0.99, diverged=True, step=3), "z": run([1.0], acc=0.8)}
    assert best_run(runs) == "z"
    with pytest.raises(ValueError, match="diverged"):
        best_run({"y": runs["y"]})


def test_phase_grid_arranges_and_averages_seeds():
    runs = [run([1.0], acc=a, variant=v, depth=d, lr=lr)
            for v, a in (("plain", 0.2), ("bn", 0.9)) for d in (2, 8) for lr in (0.1, 0.01)]
    runs.append(run([3.0], acc=0.4, variant="bn", depth=8, lr=0.1))  # a second seed of one cell
    runs.append(run([1.0, math.nan], diverged=True, step=1, variant="plain", depth=8, lr=0.1))
    g = phase_grid(runs, metric="accuracy")
    assert g.variants == ["plain", "bn"] and g.depths == [2, 8] and g.lrs == [0.01, 0.1]
    assert g.values.shape == (2, 2, 2)
    assert g.cell("bn", 8, 0.1)[0] == pytest.approx(0.65)
    value, diverged = g.cell("plain", 8, 0.1)
    assert diverged and math.isnan(value)
    assert g.cell("plain", 2, 0.01) == (pytest.approx(0.2), False)
    loss = phase_grid(runs, metric="loss")
    assert loss.cell("bn", 8, 0.1)[0] == pytest.approx(2.0)


def test_phase_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="metric"):
        phase_grid([run([1.0], variant="a", depth=1, lr=0.1)], metric="f1")
    with pytest.raises(ValueError, match="variant"):
        phase_grid([run([1.0], depth=1, lr=0.1)])
    with pytest.raises(ValueError, match="histories"):
        phase_grid([])


def test_chance_loss_is_log_ten():
    assert CHANCE_LOSS == pytest.approx(2.302585, abs=1e-6)


def test_markdown_table_rows_separator_and_escaped_pipes():
    text = gs.report.markdown_table(("a", "b"), [(1, "x|y"), (2.5, None)])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |", "| 2.5 | None |"]


def test_markdown_table_rejects_a_row_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"rows\[1\] has 1 cells; the header has 2"):
        gs.report.markdown_table(("a", "b"), [(1, 2), (3,)])
