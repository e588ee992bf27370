import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import gradstab as gs  # noqa: E402


def run(acc=0.9, diverged=False, step=None, grad=1.0, **config):
    loss = [2.0, 1.0] + ([math.nan] if diverged else [])
    return gs.History(loss=loss, layer_names=["a"], grad_norms=torch.full((len(loss), 1), grad),
                      act_grad_norms=torch.zeros(0, 1), update_ratios=torch.zeros(0, 1), diverged=diverged,
                      diverged_step=step, test_accuracy=acc, config=config)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_digits_grid_one_row_per_class():
    images = torch.randn(30, 1, 8, 8)
    labels = torch.arange(30) % 3
    fig = gs.plots.digits_grid(images, labels, per_class=4, title="Digits")
    assert len(fig.axes) == 3 * 4
    assert fig._suptitle.get_text() == "Digits"
    assert [fig.axes[4 * r].get_ylabel() for r in range(3)] == ["0", "1", "2"]
    with pytest.raises(ValueError, match="per_class"):
        gs.plots.digits_grid(images, labels, per_class=0)


def test_class_counts_bars_match_bincount():
    y_train, y_test = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([1, 2])
    fig = gs.plots.class_counts({"train": y_train, "test": y_test})
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights == [2, 1, 3, 0, 1, 1]
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "test"]


def test_comparison_bars_marks_divergence():
    fig = gs.plots.comparison_bars({"ok": run(acc=0.95, grad=2.0), "bad": run(diverged=True, step=7, grad=1e5)},
                                   title="T")
    acc_ax, grad_ax = fig.axes
    labels = dict(zip(acc_ax.get_yticks(), [t.get_text() for t in acc_ax.get_yticklabels()], strict=True))
    assert labels == {1: "ok", 0: "bad"}  # first run on top
    assert "diverged at step 7" in texts(fig) and "95.0%" in texts(fig)
    assert grad_ax.get_xscale() == "log" and acc_ax.get_xlabel() and grad_ax.get_xlabel()
    assert fig._suptitle.get_text() == "T"


@pytest.mark.parametrize("metric", ["loss", "accuracy"])
def test_phase_diagram_one_panel_per_variant(metric):
    runs = [run(acc=0.5, variant=v, depth=d, lr=lr, diverged=(v == "plain" and lr == 1.0), step=3)
            for v in ("plain", "bn", "res", "clip") for d in (2, 4, 8) for lr in (0.1, 1.0)]
    fig = gs.plots.phase_diagram(runs, metric=metric)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["plain", "bn", "res", "clip"]
    crosses = [line for line in panels[0].lines if line.get_marker() == "x"]
    assert len(crosses) == 3  # one per depth at lr 1.0
    assert not [line for line in panels[1].lines if line.get_marker() == "x"]
    assert len(panels[1].texts) == 6  # every finished cell carries its value
    assert panels[2].get_xlabel() and panels[0].get_ylabel() and fig._suptitle.get_text()  # a 2 x 2 grid
    assert panels[0].get_position().y0 > panels[2].get_position().y0
    with pytest.raises(ValueError, match="metric"):
        gs.plots.phase_diagram(runs, metric="f1")


def _monitored(steps=3, max_rows=None):
    from torch.nn import functional as F

    from gradstab.monitor import GradientMonitor

    model = gs.mlp(2, width=8)
    monitor = GradientMonitor(model, activations=True, max_rows=max_rows)
    with monitor:
        for seed in range(steps):
            gen = torch.Generator().manual_seed(seed)
            model.zero_grad()
            F.cross_entropy(model(torch.randn(4, 64, generator=gen)), torch.arange(4)).backward()
            monitor.record()
    return monitor


def _as_history(monitor):
    return gs.History(loss=[1.0] * len(monitor.history()), layer_names=monitor.names, grad_norms=monitor.history(),
                      act_grad_norms=monitor.history("act_grad"), update_ratios=monitor.history("update_ratio"))


def test_gradient_flow_takes_a_monitor_or_a_history():
    monitor = _monitored()
    fig = gs.plots.gradient_flow({"monitor": monitor, "history": _as_history(monitor)}, step=1)
    from_monitor, from_history = fig.axes[0].lines
    assert from_monitor.get_ydata().tolist() == monitor.history()[1].tolist()
    assert from_history.get_ydata().tolist() == monitor.history()[1].tolist()
    capped = _monitored(max_rows=2)  # keeps steps 1 and 2: step 5 shows the last one
    line = gs.plots.gradient_flow({"capped": capped}, step=5).axes[0].lines[0]
    assert line.get_ydata().tolist() == monitor.history()[2].tolist()


@pytest.mark.parametrize("kind", ["grad", "act_grad"])
def test_gradient_heatmap_takes_a_monitor(kind):
    monitor = _monitored()
    fig = gs.plots.gradient_heatmap(monitor, kind=kind, title="T")
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (len(monitor.names), 3)
    assert torch.allclose(torch.as_tensor(image.data), monitor.history(kind).T)
    with pytest.raises(ValueError, match="kind"):
        gs.plots.gradient_heatmap(monitor, kind="weights")
    with pytest.raises(ValueError, match="History or a GradientMonitor"):
        gs.plots.gradient_heatmap({"grad": 1.0})


# --- the book's figure style ----------------------------------------------------------------------

def test_book_style_sets_readable_svg_text(monkeypatch):
    monkeypatch.setattr(matplotlib, "rcParams", matplotlib.RcParams(matplotlib.rcParams.copy()))
    gs.plots.use_book_style()
    assert matplotlib.rcParams["svg.fonttype"] == "none"  # text stays text: searchable, sized in the page
    assert min(matplotlib.rcParams[k] for k in ("font.size", "xtick.labelsize", "legend.fontsize")) >= 10


@pytest.mark.parametrize("label, same_as", [
    ("plain", "no clipping"), ("clip ‖g‖≤1", "clip by norm"), ("BatchNorm + clip", "batchnorm"),
    ("residual, a = 1/√32", "Residual"), ("SkipInit", "skipinit (learned a)"), ("warmup 200 steps", "warmup"),
    ("AGC, lambda = 0.005", "agc"),
])
def test_one_colour_per_configuration(label, same_as):
    assert gs.plots.color(label) == gs.plots.color(same_as)


def test_configurations_get_different_colours():
    names = ["plain", "clip", "clip by value", "batchnorm", "layernorm", "residual", "skipinit", "agc", "warmup"]
    assert len({gs.plots.color(n) for n in names}) == len(names)
    others = {gs.plots.color(name) for name in ("LSTM", "GRU", "something else", "a model")}
    assert others <= set(gs.plots.OTHER_COLORS) and not others & {value for _, value in gs.plots.PALETTE}


def test_label_colors_shade_labels_that_share_a_configuration():
    assert gs.plots.label_colors(["plain", "clip"]) == {name: gs.plots.color(name) for name in ("plain", "clip")}
    shades = gs.plots.label_colors(["residual a=1", "residual a=1/4", "residual a=1/16", "plain"])
    assert len(set(shades.values())) == 4 and shades["plain"] == gs.plots.color("plain")
    purple = matplotlib.colors.to_rgb(gs.plots.color("residual"))
    residuals = ("residual a=1", "residual a=1/4", "residual a=1/16")
    lightness = [sum(matplotlib.colors.to_rgb(shades[k])) for k in residuals]
    assert lightness == sorted(lightness) and lightness[0] < sum(purple) < lightness[-1]


def test_clip_axis_marks_the_points_beyond_the_limit():
    fig, ax = plt.subplots()
    ax.plot([0, 1, 2, 3], [1.0, 10.0, 1e6, 1e9], color="#123456")
    ax.plot([0, 1], [0.5, 2.0])
    assert gs.plots.clip_axis(ax, 1e3) == 2
    assert ax.get_ylim()[1] == 1e3
    marks = [line for line in ax.get_lines() if line.get_marker() == "^" and len(line.get_xdata())]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [2.0, 3.0] and marks[0].get_color() == "#123456"
    assert list(marks[0].get_ydata()) == [1e3, 1e3]
    assert "off the chart" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_clip_axis_marks_nothing_when_everything_fits_and_rejects_bad_limits():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1.0, 2.0])
    ax.axvline(0.5)
    ax.axhline(100.0)  # reference lines are drawn partly in axes coordinates: never marked
    assert gs.plots.clip_axis(ax, 10.0, bottom=0.5) == 0 and ax.get_legend() is None
    with pytest.raises(ValueError, match="bottom"):
        gs.plots.clip_axis(ax, 1.0, bottom=2.0)


def test_heatmaps_share_a_colour_scale_when_asked():
    quiet, loud = run(grad=1e-2), run(grad=1e4)
    scales = [gs.plots.gradient_heatmap(h, vmin=1e-3, vmax=1e5).axes[0].images[0].norm for h in (quiet, loud)]
    assert [(n.vmin, n.vmax) for n in scales] == [(1e-3, 1e5), (1e-3, 1e5)]


@pytest.mark.parametrize("limits, match", [(dict(vmin=0.0), "vmin"), (dict(vmax=-1.0), "vmax"),
                                           (dict(vmin=1.0, vmax=1.0), "below")])
def test_heatmap_rejects_colour_limits_a_log_scale_cannot_take(limits, match):
    with pytest.raises(ValueError, match=match):
        gs.plots.gradient_heatmap(run(), **limits)


def test_clip_axis_keeps_the_axis_upright_when_everything_is_off_the_chart():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1e5, 1e6])
    ax.set(yscale="log", ylim=(1e4, 1e7))  # the current bottom lies above the new top
    assert gs.plots.clip_axis(ax, 1e3) == 2
    assert ax.get_ylim() == (1e2, 1e3)
