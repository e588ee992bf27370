"""gradstab.explore: the kernel-free static explorer's HTML and the live ipywidgets explorer."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

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


def _fake(loss, acc=math.nan, diverged_step=None, layers=3, **config) -> gs.History:
    """A History built by hand, so a test controls the numbers exactly."""
    steps = len(loss)
    grads = torch.full((steps, layers), 0.5)
    return gs.History(loss=list(loss), layer_names=[f"l{k}" for k in range(layers)], grad_norms=grads,
                      act_grad_norms=grads.clone(), update_ratios=grads.clone(), test_accuracy=acc,
                      diverged=diverged_step is not None, diverged_step=diverged_step,
                      diverged_layer="l1" if diverged_step is not None else None,
                      reason="loss became nan" if diverged_step is not None else "",
                      config=dict(dict(depth=2, lr=0.1, variant="plain", steps=steps), **config))


def test_three_states_and_the_stall_threshold():
    assert explore.STALL_ACCURACY == 0.2 and explore.CHANCE_ACCURACY == 0.1
    just_below, at = explore.STALL_ACCURACY - 0.01, explore.STALL_ACCURACY
    assert explore.state(_fake([2.3] * 5, acc=just_below)) == "stalled"
    assert explore.state(_fake([2.3] * 5, acc=at)) == "learned"  # "below 20%" is strict
    assert explore.state(_fake([2.3, math.nan], acc=0.9, diverged_step=1)) == "diverged"
    # without a measured accuracy the loss rule decides: above 0.9 ln 10 is stalled
    assert explore.state(_fake([explore.STALL_LOSS + 0.05] * 12)) == "stalled"
    assert explore.state(_fake([explore.STALL_LOSS - 0.05] * 12)) == "learned"
    # the final loss is the mean of the last FINAL_STEPS steps, not one noisy minibatch
    assert explore.final_loss(_fake([9.0] * 3 + [1.0] * explore.FINAL_STEPS)) == pytest.approx(1.0)


def test_status_lines_say_which_state_and_the_rule():
    diverged = explore.status_line(_fake([2.3, 5.0, math.nan], diverged_step=2))
    assert diverged == "depth 2, learning rate 0.1, plain: ✗ diverged at step 2 (loss became nan; layer 1 (l1))"
    stalled = explore.status_line(_fake([2.3] * 5, acc=0.11))
    assert "– stalled: test accuracy 11%" in stalled and "chance is 10%" in stalled
    assert "stalled means below 20%" in stalled
    learned = explore.status_line(_fake([0.3] * 5, acc=0.91))
    assert learned.endswith("✓ learned: final loss 0.3, test accuracy 91%")


def test_no_accuracy_is_shown_when_it_was_not_measured():
    for h in (_fake([0.3] * 5), _fake([2.3] * 5)):
        line = explore.status_line(h)
        assert "not measured" in line and not re.search(r"accuracy \d", line) and "%" not in line.split(":", 1)[1]
    assert explore.measured_accuracy(_fake([0.3])) is None
    # a NaN accuracy must not reach the page either
    payload = explore.grid_payload([_fake([0.3] * 5)])
    assert "accuracy 0%" not in json.dumps(payload) and "nan%" not in json.dumps(payload)


def _path_points(d: str) -> list[list[tuple[float, float]]]:
    """The subpaths of an SVG path's d attribute (M/L with absolute coordinates) as lists of points."""
    runs = []
    for cmd, x, y in re.findall(r"([ML])(-?[\d.]+) (-?[\d.]+)", d):
        if cmd == "M":
            runs.append([])
        runs[-1].append((float(x), float(y)))
    return runs


def test_values_beyond_the_axis_are_marked_not_drawn_along_the_frame():
    h = _fake([2.0, 3.0, 5e5, 1e6, 2e6, 3.0, 2.0], acc=0.5)
    svg = explore.svg_figure(h, loss_range=(1.0, 100.0))
    assert svg.count("class='gsx-off'") == 1, "one excursion above the axis: one triangle"
    assert "off the axis" in svg  # the legend explains the triangle
    loss_path = re.search(r"<path d='(M[^']*)' fill='none' stroke='#d62728'", svg).group(1)
    runs = _path_points(loss_path)
    assert len(runs) == 2, "the line stops at the frame and starts again where the values come back"
    top = 44.0
    for pts in runs:
        on_top = [y == top for _, y in pts]
        assert not any(a and b for a, b in zip(on_top, on_top[1:], strict=False)), "a flat line along the frame"
        assert all(top <= y <= 224.0 for _, y in pts)
    assert runs[0][-1][1] == top and runs[1][0][1] == top
    assert "gsx-off" not in explore.svg_figure(_fake([2.0, 3.0, 2.5], acc=0.5), loss_range=(1.0, 100.0))
    # below the axis: a downward triangle on the bottom edge
    low = explore.svg_figure(_fake([2.0, 1e-6, 2.0], acc=0.5), loss_range=(1.0, 100.0))
    assert low.count("class='gsx-off'") == 1 and "224h10" not in low.split("gsx-off")[0]


def test_axes_have_two_log_ticks_and_even_integer_ticks():
    for lo, hi in [(1.0, 10.0), (0.1, 1000.0), (1e-3, 1e3), (1e-8, 1e4)]:
        assert len(explore._log_ticks(lo, hi)) >= 2
    for top in (1, 7, 9, 16, 59, 150):
        ticks = explore._int_ticks(top)
        gaps = {b - a for a, b in zip(ticks, ticks[1:], strict=False)}
        assert ticks[0] == 0 and ticks[-1] <= top and len(gaps) == 1 and 2 <= len(ticks) <= 7
    assert explore._range([2.2, 2.3, 2.4], 3) == (1.0, 10.0)  # a flat curve still spans a whole decade
    svg = explore.svg_figure(_fake([2.2, 2.3, 2.4], acc=0.5))
    labels = re.findall(r"<g font-size='10' text-anchor='end'>(.*?)</g>", svg)
    assert len(labels) == 2 and all(part.count("<text") >= 2 for part in labels)


def test_static_html_has_sliders_figures_and_status_lines(runs):
    ex = explore.static_explorer(runs, title="test grid", notice="watch the deep plain runs")
    html = ex._repr_html_()
    assert html.count('type="range"') == 2 and 'class="gsx-depth"' in html and 'class="gsx-lr"' in html
    assert html.count('type="radio"') == 2 and "watch the deep plain runs" in html and "gsx-notice" in html
    assert "<script src" not in html and "http" not in html.replace("http://www.w3.org/2000/svg", "")
    p = _payload(html, ex.id)
    assert p["depths"] == [2, 8] and p["lrs"] == [0.1, 3.0] and p["variants"] == ["plain", "clip"]
    by = {(h.config["depth"], h.config["lr"], h.config["variant"]): h for h in runs}
    for key, run in p["runs"].items():
        di, li, vi = map(int, key.split("_"))
        h = by[p["depths"][di], p["lrs"][li], p["variants"][vi]]
        assert run["state"] == explore.state(h)
        assert run["status"] == {lang: explore.status_line(h, lang) for lang in explore.LANGUAGES}
        assert run["svg"].startswith("<svg class='gsx-svg'") and run["svg"].count("<path") >= 3
    bad = p["runs"]["1_1_0"]  # plain, depth 8, lr 3
    assert bad["state"] == "diverged" and "gsx-diverged" in bad["svg"] and "✗ diverged at step" in bad["status"]["en"]
    assert p["runs"]["1_1_1"]["state"] != "diverged"  # clipped
    assert "<svg class='gsx-svg'" in html.split("<script")[0], "the first setting is drawn without JavaScript"
    assert 0 < ex.size() == len(html.encode())


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
        ex = explore.static_explorer([h])
        html = ex._repr_html_()
    finally:
        h.config["variant"] = "plain"
    assert "</script><b>" not in html
    script = html.split(f'id="{ex.id}-data">', 1)[1].split("</script>", 1)[0]
    assert json.loads(script)["variants"] == ["</script><b>x"]


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


def test_grid_runs_are_the_live_explorers_runs(data):
    """The static explorer's runs come from run_one: the same setting gives the same numbers, state and line."""
    swept = explore.grid(data, [2, 8], [0.1, 3.0], variants=["plain", "clip"], steps=8, seeds=[0, 1])
    assert len(swept) == 16 and [h.config["seed"] for h in swept[:2]] == [0, 1]
    assert "diverged" in {explore.state(h) for h in swept}, "the grid needs a diverging run"
    for h in swept:
        cfg = h.config
        alone = explore.run_one(data, cfg["depth"], cfg["lr"], cfg["variant"], steps=8, seed=cfg["seed"])
        assert list(map(repr, h.loss)) == list(map(repr, alone.loss)), "bit-identical losses (nan included)"
        assert h.diverged_step == alone.diverged_step
        assert repr(h.test_accuracy) == repr(alone.test_accuracy)
        assert explore.state(h) == explore.state(alone)
        assert explore.status_line(h) == explore.status_line(alone)
    with pytest.raises(ValueError, match="seeds"):
        explore.grid(data, [2], [0.1], seeds=[])


@pytest.mark.parametrize("kwargs, match", [
    (dict(depths=[2, 0], lrs=[0.1]), r"depths\[1\]"), (dict(depths=[2], lrs=[0.1, -1.0]), r"lrs\[1\]"),
    (dict(depths=[2], lrs=[0.1], width=0), "width"), (dict(depths=[], lrs=[0.1]), "depths"),
    (dict(depths=[2], lrs=[0.1], steps=0), "steps"),
])
def test_grid_checks_its_settings_before_training(data, kwargs, match, monkeypatch):
    monkeypatch.setattr(explore, "run_one", lambda *a, **k: pytest.fail("trained before checking the input"))
    with pytest.raises(ValueError, match=match):
        explore.grid(data, **kwargs)


def test_static_and_live_explorers_show_the_same_line(data):
    pytest.importorskip("ipywidgets")
    shown = explore.grid(data, [4], [0.1, 1.0], variants=["plain", "clip"], steps=8)
    payload = explore.grid_payload(shown)
    live = explore.live_explorer(data, steps=8, notice="look here")
    assert "look here" in live.notice.value
    by_setting = {(h.config["depth"], h.config["lr"], h.config["variant"]): h for h in shown}
    for key, run in payload["runs"].items():
        di, li, vi = map(int, key.split("_"))
        setting = (payload["depths"][di], payload["lrs"][li], payload["variants"][vi])
        live.update(depth=setting[0], lr=setting[1], clip=setting[2] == "clip")
        assert html_unescape(live.status.value).endswith(run["status"]["en"] + "</b>")
        assert live.history.loss == by_setting[setting].loss  # the same run, not just the same verdict


def html_unescape(text: str) -> str:
    from html import unescape

    return unescape(text)


def test_svg_figure_marks_divergence(runs):
    svg = explore.svg_figure(runs[3])
    assert svg.startswith("<svg") and "gsx-diverged" in svg and "diverged" in svg
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
    assert live.figure.value != before and "data-setting='3|" in live.figure.value
    assert "batchnorm" in live.status.value and live.history.config["norm"] == "batch"
    stats = explore.measure_latency(live, [dict(depth=2), dict(depth=4)])
    assert stats["worst"] >= stats["median"] > 0 and len(stats["times"]) == 2


def test_live_slider_change_updates_output(live):
    live.depth.value = 5  # what a reader's drag does: the observer retrains in the background
    assert live.wait(60)
    assert "data-setting='5|" in live.figure.value and "depth 5" in live.status.value


def test_live_diverging_run_is_shown_not_raised(live):
    live.update(depth=16, lr=3.0)
    assert live.history.diverged
    assert "✗ diverged" in live.status.value and "gsx-diverged" in live.figure.value
    assert explore.STATE_COLORS["diverged"] in live.status.value


def test_live_rapid_moves_draw_only_the_last(live):
    drawn = []
    show = live._show
    live._show = lambda h: (drawn.append(h), show(h))
    for depth in (2, 3, 4, 5, 6, 7):
        live.depth.value = depth
    assert live.wait(60)
    assert drawn and len(drawn) < 6
    assert drawn[-1].config["depth"] == 7 and "data-setting='7|" in live.figure.value


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


# --- languages: the Chinese edition's explorers ---------------------------------------------------

def test_chinese_status_lines_follow_the_english_ones():
    diverged = _fake([2.3, 5.0, math.nan], diverged_step=2, variant="batchnorm+clip")
    assert explore.status_line(diverged, "zh_CN") == \
        "深度 2，学习率 0.1，批量归一化+裁剪：✗ 在第 2 步发散（损失变为 nan；第 1 层（l1））"
    stalled = explore.status_line(_fake([2.3] * 5, acc=0.11), "zh_CN")
    assert stalled.startswith("深度 2，学习率 0.1，无补救：– 停滞：测试准确率 11%") and "低于 20% 即为停滞" in stalled
    learned = explore.status_line(_fake([0.3] * 5, acc=0.91), "zh_CN")
    assert learned.endswith("✓ 学会：最终损失 0.3，测试准确率 91%")
    unmeasured = explore.status_line(_fake([0.3] * 5), "zh_CN")
    assert unmeasured.endswith("（未测测试准确率）") and "%" not in unmeasured
    # every divergence reason gs.train writes has a Chinese form; an unknown one is shown as it is
    text = explore.TEXT["zh_CN"]
    assert explore._reason("gradient became non-finite", text) == "梯度出现非有限值"
    assert explore._reason("loss 1.2e+04 exceeded loss_limit=1e+04", text) == "损失 1.2e+04 超过 loss_limit=1e+04"
    assert explore._reason("something new", text) == "something new"
    # the same keys in every language, so no label is missing in one of them
    assert all(explore.TEXT[lang].keys() == explore.TEXT["en"].keys() for lang in explore.LANGUAGES)
    with pytest.raises(ValueError, match="language"):
        explore.status_line(diverged, "fr")


def test_static_explorer_carries_both_languages_or_one(runs):
    ex = explore.static_explorer(runs, title={"en": "grid", "zh_CN": "网格"}, notice="look")
    p = _payload(ex._repr_html_(), ex.id)
    assert p["languages"] == ["en", "zh_CN"]
    assert p["text"]["zh_CN"]["title"] == "网格" and p["text"]["en"]["title"] == "grid"
    assert p["text"]["zh_CN"]["notice"] == "look" and p["text"]["zh_CN"]["variant_labels"] == ["无补救", "裁剪"]
    assert all(set(run["status"]) == {"en", "zh_CN"} for run in p["runs"].values())
    zh = explore.static_explorer(runs, title={"zh_CN": "网格"}, language="zh_CN")
    html = zh._repr_html_()
    p = _payload(html, zh.id)
    assert p["languages"] == ["zh_CN"] and all(list(run["status"]) == ["zh_CN"] for run in p["runs"].values())
    before_script = html.split("<script")[0]
    assert ">深度<" in before_script and ">学习率<" in before_script and "无补救" in before_script
    assert "learning rate" not in before_script, "a Chinese-only explorer shows no English label without JavaScript"
    only_zh = explore.static_explorer(runs, notice={"en": "", "zh_CN": "看深度 8"})
    html = only_zh._repr_html_()
    assert "看深度 8" in html and 'style="display:none;' in html, "a notice in one language only is kept, hidden"
    with pytest.raises(ValueError, match="missing \\['zh_CN'\\]"):
        explore.static_explorer(runs, title={"en": "grid only in English"})
    with pytest.raises(ValueError, match="language"):
        explore.static_explorer(runs, language="de")


def test_live_explorer_speaks_chinese(data):
    pytest.importorskip("ipywidgets")
    live = explore.live_explorer(data, steps=4, notice="看这里", language="zh_CN")
    assert live.depth.description == "深度" and live.lr.description == "学习率"
    assert [t.description for t in live.toggles.values()] == ["批量归一化", "残差（缩放）", "裁剪 ‖g‖≤1"]
    assert "注意看：" in live.notice.value and "深度 8，学习率 0.1，无补救：" in html_unescape(live.status.value)
    with pytest.raises(ValueError, match="language"):
        explore.live_explorer(data, steps=2, language="xx")
