"""gradstab.explore: the kernel-free static explorer's HTML and the live ipywidgets explorer."""
from __future__ import annotations

import json
import math
import re

import pytest

import gradstab as gs
from gradstab import explore


@pytest.fixture(scope="module")
def data():
    return gs.load_digits(device="cpu")


@pytest.fixture(scope="module")
def runs(data):
    """A tiny grid; plain depth 8 at learning rate 3 diverges within a few steps."""
    return [explore.run_one(data, d, lr, v, steps=8) for v in ("plain", "clip") for d in (2, 8) for lr in (0.1, 3.0)]


def _payload(html: str, explorer_id: str) -> dict:
    match = re.search(rf'<script type="application/json" id="{explorer_id}-data">(.*?)</script>', html, re.S)
    assert match, "the grid's numbers must be embedded as JSON"
    return json.loads(match.group(1))


def test_variant_names_round_trip():
    assert explore.variant_name() == "plain"
    assert explore.variant_name(batchnorm=True, clip=True) == "batchnorm+clip"
    assert explore.variant_flags("residual+clip") == {"batchnorm": False, "residual": True, "clip": True}
    model_kw, train_kw = explore.variant_kwargs("batchnorm+residual", depth=16)
    assert model_kw == {"norm": "batch", "residual": True, "branch_scale": 0.25} and train_kw == {"max_norm": None}
    with pytest.raises(ValueError, match="variant part"):
        explore.variant_flags("dropout")


def test_run_one_records_setting_and_divergence(runs):
    by = {(h.config["variant"], h.config["depth"], h.config["lr"]): h for h in runs}
    assert by["plain", 8, 3.0].diverged, "the fixture needs one diverging run"
    assert not by["plain", 2, 0.1].diverged
    assert by["clip", 8, 3.0].config["max_norm"] == explore.CLIP_NORM


def test_static_html_has_sliders_json_and_divergence(runs):
    ex = explore.static_explorer(runs, title="test grid")
    html = ex._repr_html_()
    assert html.count('type="range"') == 2 and 'class="gsx-depth"' in html and 'class="gsx-lr"' in html
    assert html.count('type="radio"') == 2
    assert "<script src" not in html and "http" not in html.replace("http://www.w3.org/2000/svg", "")
    p = _payload(html, ex.id)
    assert p["depths"] == [2, 8] and p["lrs"] == [0.1, 3.0] and p["variants"] == ["plain", "clip"]
    first = p["runs"]["0_0_0"]  # plain, depth 2, lr 0.1
    h = runs[0]
    assert first["loss"] == pytest.approx([float(f"{v:.3g}") for v in h.loss])
    assert len(first["g0"]) == h.grad_norms.shape[1]
    assert first["g0"][0] == pytest.approx(float(h.grad_norms[0, 0]), rel=1e-2)
    bad = p["runs"]["1_1_0"]  # plain, depth 8, lr 3
    assert bad["diverged"] and bad["dstep"] == runs[3].diverged_step and bad["dlayer"]
    assert not p["runs"]["1_1_1"]["diverged"]  # clipped
    assert "diverged at step" in html  # the JavaScript's status text


def test_static_ids_are_unique_and_deterministic(runs):
    a, b = explore.static_explorer(runs), explore.static_explorer(runs)
    assert a.id != b.id
    assert a.id.rsplit("-", 1)[0] == b.id.rsplit("-", 1)[0]  # same numbers, same hash part
    html = a._repr_html_()
    assert html.count(f'id="{a.id}"') == 1 and f'name="{a.id}-variant"' in html
    assert b.id not in html


def test_static_json_cannot_close_its_script_tag(runs):
    h = runs[0]
    h.config["variant"] = "</script><b>x"
    try:
        html = explore.static_explorer([h])._repr_html_()
    finally:
        h.config["variant"] = "plain"
    assert "</script><b>" not in html


def test_static_rejects_bad_grids(runs):
    with pytest.raises(ValueError, match="histories"):
        explore.static_explorer([])
    with pytest.raises(ValueError, match="two runs"):
        explore.static_explorer([runs[0], runs[0]])
    h = runs[0]
    saved = h.config.pop("depth")
    try:
        with pytest.raises(ValueError, match="depth"):
            explore.static_explorer([h])
    finally:
        h.config["depth"] = saved


def test_grid_matches_run_one(data):
    swept = explore.grid(data, [3], [0.05, 0.2], variants=["plain"], steps=6)
    assert [(h.config["depth"], h.config["lr"], h.config["variant"]) for h in swept] == [(3, 0.05, "plain"),
                                                                                            (3, 0.2, "plain")]
    alone = explore.run_one(data, 3, 0.2, "plain", steps=6)
    assert swept[1].loss == pytest.approx(alone.loss, rel=1e-4)


def test_svg_figure_marks_divergence(runs):
    svg = explore.svg_figure(runs[3])
    assert svg.startswith("<svg") and "gsx-diverged" in svg
    assert "gsx-diverged" not in explore.svg_figure(runs[0])


# --- live explorer ---------------------------------------------------------------------------

@pytest.fixture
def live(data):
    pytest.importorskip("ipywidgets")
    return explore.live_explorer(data, steps=8, debounce=0.05)


def test_live_update_redraws_and_times(live):
    before = live.figure.value
    assert before.startswith("<svg") and "depth 8" in live.status.value
    seconds = live.update(depth=3, lr=0.02, batchnorm=True)
    assert isinstance(seconds, float) and 0 < seconds < 60
    assert live.depth.value == 3 and live.toggles["batchnorm"].value
    assert live.figure.value != before and 'data-setting="3|' in live.figure.value
    assert "batchnorm" in live.status.value and live.history.config["norm"] == "batch"
    stats = explore.measure_latency(live, [dict(depth=2), dict(depth=4)])
    assert stats["worst"] >= stats["median"] > 0 and len(stats["times"]) == 2


def test_live_slider_change_updates_output(live):
    live.depth.value = 5  # what a reader's drag does: the observer retrains in the background
    assert live.wait(60)
    assert 'data-setting="5|' in live.figure.value and "depth 5" in live.status.value


def test_live_diverging_run_is_shown_not_raised(live):
    live.update(depth=16, lr=3.0)
    assert live.history.diverged
    assert "diverged" in live.status.value and "gsx-diverged" in live.figure.value


def test_live_rapid_moves_draw_only_the_last(live):
    drawn = []
    show = live._show
    live._show = lambda h: (drawn.append(h), show(h))
    for depth in (2, 3, 4, 5, 6, 7):
        live.depth.value = depth
    assert live.wait(60)
    assert drawn and len(drawn) < 6
    assert drawn[-1].config["depth"] == 7 and 'data-setting="7|' in live.figure.value


def test_live_rejects_bad_arguments(data):
    pytest.importorskip("ipywidgets")
    with pytest.raises(ValueError, match="depths"):
        explore.live_explorer(data, depths=(8, 2))
    with pytest.raises(ValueError, match="arch"):
        explore.live_explorer(data, arch="rnn")
    ex = explore.live_explorer(data, steps=2)
    with pytest.raises(ValueError, match="update"):
        ex.update(width=3)
    assert not math.isnan(ex.update(depth=1))
