"""Slider explorers over depth x learning rate x remedy.

Two faces of one idea, one engine and one drawing:

* :func:`live_explorer` (Jupyter with a kernel): ipywidgets sliders; every move retrains a
  small network with :func:`run_one` and redraws its loss curve and per-layer gradient norms.
* :func:`static_explorer` (the rendered book, no kernel, no network): a grid of runs trained by
  the same :func:`run_one` when the notebook executes (:func:`grid`); each setting's figure is
  drawn by the same :func:`svg_figure` and embedded in the page, and a few lines of JavaScript
  swap in the chosen setting's figure and status line.

Every run ends in one of three states (:func:`state`): *diverged* (a loss or gradient became
non-finite), *stalled* (finite, but test accuracy below :data:`STALL_ACCURACY`, near chance) or
*learned*. Both explorers print the same :func:`status_line`.

A *variant* names the remedies switched on: ``"plain"`` or a ``+``-joined subset of
``batchnorm``, ``residual`` (branch scaled by 1/sqrt(depth)) and ``clip`` (global norm 1).

Both explorers speak English or Chinese (``language``: one of ``LANGUAGES``): labels, status lines and the
names of the remedies. The static explorer can carry both and pick the page's language (``language="auto"``),
so the English and the Chinese edition of the book show one executed output each in its own language. The
figures' axis labels stay English.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import statistics
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from html import escape

import torch

from ._check import one_of, positive_float, positive_int
from .data import Split
from .device import resolve_seed
from .models import cnn, mlp
from .train import History, train

REMEDIES = ("batchnorm", "residual", "clip")
CLIP_NORM = 1.0
LOSS_AXIS = (1e-3, 1e3)  # loss-axis limits: a loss above 1e3 has exploded, and is marked on the top edge
_ids = itertools.count()
LANGUAGES = ("en", "zh_CN")
# Every word an explorer shows, by language (the Chinese follows the book's glossary).
TEXT = {
    "en": dict(
        depth="depth", lr="learning rate", lr_axis="learning rate (log scale)", remedy="remedy:",
        notice_label="What to notice:", variants=dict(plain="plain", batchnorm="batchnorm", residual="residual",
                                                 clip="clip"),
        toggles=("BatchNorm", "residual (scaled)", f"clip ‖g‖≤{CLIP_NORM:g}"),
        setting="depth {depth}, learning rate {lr}, {variant}: ", missing="no run was computed for this setting",
        failed="could not train this setting: {error}",
        diverged="✗ diverged at step {step} ({reason}{layer})", layer="; layer {index} ({name})",
        layer_name="; layer {name}",
        stalled_acc="– stalled: test accuracy {acc:.0%}, final loss {loss:.3g} (chance is {chance:.0%}; stalled "
                    "means below {stall:.0%})",
        stalled_loss="– stalled: final loss {loss:.3g}, test accuracy not measured (guessing gives ln 10 = "
                     "{ln10:.2f}; stalled means a loss above {stall:.2f})",
        learned="✓ learned: final loss {loss:.3g}{tested}", tested=", test accuracy {acc:.0%}",
        untested=" (test accuracy not measured)", reasons=()),
    "zh_CN": dict(
        depth="深度", lr="学习率", lr_axis="学习率（对数刻度）", remedy="补救措施：", notice_label="注意看：",
        variants=dict(plain="无补救", batchnorm="批量归一化", residual="残差", clip="裁剪"),
        toggles=("批量归一化", "残差（缩放）", f"裁剪 ‖g‖≤{CLIP_NORM:g}"),
        setting="深度 {depth}，学习率 {lr}，{variant}：", missing="这一设置没有计算过",
        failed="无法训练这一设置：{error}",
        diverged="✗ 在第 {step} 步发散（{reason}{layer}）", layer="；第 {index} 层（{name}）",
        layer_name="；层 {name}",
        stalled_acc="– 停滞：测试准确率 {acc:.0%}，最终损失 {loss:.3g}（随机猜测为 {chance:.0%}；低于 {stall:.0%} "
                    "即为停滞）",
        stalled_loss="– 停滞：最终损失 {loss:.3g}，未测测试准确率（随机猜测的损失为 ln 10 = {ln10:.2f}；损失高于 "
                     "{stall:.2f} 即为停滞）",
        learned="✓ 学会：最终损失 {loss:.3g}{tested}", tested="，测试准确率 {acc:.0%}", untested="（未测测试准确率）",
        # gs.train's divergence reasons (train.py), English pattern -> Chinese
        reasons=((r"loss became (\S+)", r"损失变为 \1"), (r"gradient became non-finite", "梯度出现非有限值"),
                 (r"loss (\S+) exceeded loss_limit=(\S+)", r"损失 \1 超过 loss_limit=\2"))),
}


# --- what a variant means -------------------------------------------------------------------

def variant_name(batchnorm: bool = False, residual: bool = False, clip: bool = False) -> str:
    """``"plain"`` or the remedies switched on, joined by ``+`` in the order of ``REMEDIES``."""
    on = [name for name, flag in zip(REMEDIES, (batchnorm, residual, clip), strict=True) if flag]
    return "+".join(on) or "plain"


def variant_flags(variant: str) -> dict[str, bool]:
    """Inverse of :func:`variant_name`: ``{"batchnorm": .., "residual": .., "clip": ..}``."""
    parts = [] if variant == "plain" else variant.split("+")
    for part in parts:
        one_of("variant part", part, REMEDIES)
    return {name: name in parts for name in REMEDIES}


def variant_kwargs(variant: str, depth: int) -> tuple[dict, dict]:
    """(keyword arguments for :func:`~gradstab.models.cnn`, keyword arguments for :func:`~gradstab.train.train`)."""
    flags = variant_flags(variant)
    model = dict(norm="batch" if flags["batchnorm"] else "none")
    if flags["residual"]:
        model.update(residual=True, branch_scale=1 / math.sqrt(depth))
    return model, dict(max_norm=CLIP_NORM if flags["clip"] else None)


ARCHS = ("mlp", "cnn")
_WIDTH = {"mlp": 32, "cnn": 8}


def run_one(data: Split, depth: int, lr: float, variant: str = "plain", *, arch: str = "mlp", steps: int = 60,
            width: int | None = None, batch_size: int = 64, seed: int | None = None, cancelled=None) -> History:
    """Train one small network for the explorers; ``history.config`` gets ``depth``, ``lr`` and ``variant``.

    ``arch`` is ``"mlp"`` (default width 32, on the flattened images: cheap enough to retrain
    on every slider move) or ``"cnn"`` (default width 8). ``cancelled`` (optional, a function
    returning bool) is polled before every forward pass; when it returns True the run stops by
    raising :class:`Superseded`.
    """
    positive_int("depth", depth)
    one_of("arch", arch, ARCHS)
    model_kw, train_kw = variant_kwargs(variant, depth)
    if arch == "mlp":
        model = mlp(depth, seed=seed, width=width or _WIDTH[arch], **model_kw)
        data = data.flat() if data.x_train.ndim > 2 else data
    else:
        model = cnn(depth, seed=seed, width=width or _WIDTH[arch], **model_kw)
    if cancelled is not None:
        model.register_forward_pre_hook(lambda module, args: _stop_if(cancelled))
    history = train(model, data, lr=lr, steps=steps, batch_size=batch_size, seed=seed, **train_kw)
    history.config.update(depth=depth, lr=lr, variant=variant, arch=arch)
    return history


def _check_width(width: int | None) -> int | None:
    """``width`` if it is None (the architecture's default) or an integer >= 1, else ValueError."""
    return None if width is None else positive_int("width", width)


class Superseded(Exception):
    """A live-explorer run stopped because a newer slider setting arrived."""


def _stop_if(cancelled) -> None:
    if cancelled():
        raise Superseded


def grid(data: Split, depths: Sequence[int], lrs: Sequence[float],
         variants: Sequence[str] = ("plain", "batchnorm", "residual", "clip"), *, arch: str = "mlp",
         steps: int = 60, width: int | None = None, batch_size: int = 64, seeds: Sequence[int] | None = None
         ) -> list[History]:
    """Every (variant, depth, lr, seed), each trained by :func:`run_one`; one seed's runs are the input
    :func:`static_explorer` expects.

    The runs go through the same code path as the live explorer's (:func:`run_one`, that is
    :func:`gradstab.train.train`), so a setting shows the same numbers in both explorers on one
    machine. ``seeds`` (default: the one seed :func:`~gradstab.device.base_seed`) are recorded in
    ``history.config["seed"]``. Returns the runs variant-major, then depth, then lr, then seed.
    """
    one_of("arch", arch, ARCHS)
    seeds = [resolve_seed(None)] if seeds is None else [resolve_seed(s) for s in seeds]
    if not seeds or not depths or not lrs:
        raise ValueError(f"seeds, depths and lrs must each hold at least one value; got seeds={seeds}, "
                         f"depths={list(depths)}, lrs={list(lrs)}")
    for k, depth in enumerate(depths):
        positive_int(f"depths[{k}]", depth)
    for k, lr in enumerate(lrs):
        positive_float(f"lrs[{k}]", lr)
    _check_width(width)
    positive_int("steps", steps)
    positive_int("batch_size", batch_size, minimum=2)
    for variant in variants:
        variant_flags(variant)
    if arch == "mlp" and data.x_train.ndim > 2:
        data = data.flat()
    runs = []
    for variant in variants:
        for depth in depths:
            for lr in lrs:
                for seed in seeds:
                    runs.append(run_one(data, depth, lr, variant, arch=arch, steps=steps, width=width,
                                        batch_size=batch_size, seed=seed))  # train records the seed in config
    return runs


# --- what happened in a run: diverged, stalled or learned --------------------------------------

#: Test accuracy of guessing among the ten digit classes.
CHANCE_ACCURACY = 0.1
#: A finite run whose test accuracy is below this has stalled near chance (the rule for a stalled run).
STALL_ACCURACY = 0.2
#: Used only when a run's accuracy was not measured, where a final loss above 0.9 ln 10 counts as stalled.
STALL_LOSS = 0.9 * math.log(10)
#: The "final loss" of a status line is the mean training loss of the last ``FINAL_STEPS`` steps.
FINAL_STEPS = 10
#: The three ways an explorer run ends, as returned by state().
STATES = ("diverged", "stalled", "learned")
#: Status-line colour of each state (a learned run keeps the page's text colour).
STATE_COLORS = {"diverged": "#d62728", "stalled": "#a65f00", "learned": ""}


def final_loss(history: History) -> float:
    """Mean training loss over the last :data:`FINAL_STEPS` steps (nan without finite steps)."""
    tail = [v for v in history.loss[-FINAL_STEPS:] if math.isfinite(v)]
    return sum(tail) / len(tail) if tail else math.nan


def measured_accuracy(history: History) -> float | None:
    """The run's test accuracy, or None when it was not measured (a NaN)."""
    acc = history.test_accuracy
    return None if acc is None or not math.isfinite(acc) else float(acc)


def state(history: History) -> str:
    """``"diverged"`` (a loss or gradient became non-finite), ``"stalled"`` (finite, but test accuracy below
    :data:`STALL_ACCURACY`; when no accuracy was measured, final loss above :data:`STALL_LOSS`) or ``"learned"``."""
    if history.diverged:
        return "diverged"
    acc = measured_accuracy(history)
    if acc is not None:
        return "stalled" if acc < STALL_ACCURACY else "learned"
    loss = final_loss(history)
    return "stalled" if not math.isfinite(loss) or loss > STALL_LOSS else "learned"


def texts(language: str) -> dict:
    """The ``TEXT`` entry of one of ``LANGUAGES``; raises ValueError for another."""
    return TEXT[one_of("language", language, LANGUAGES)]


def variant_label(variant: str, language: str = "en") -> str:
    """A variant's name as the explorer shows it: ``"batchnorm+clip"`` -> ``"批量归一化+裁剪"`` in Chinese."""
    names = texts(language)["variants"]
    return "+".join(names.get(part, part) for part in variant.split("+"))


def _reason(reason: str, text: dict) -> str:
    for pattern, replacement in text["reasons"]:
        if re.fullmatch(pattern, reason):
            return re.sub(pattern, replacement, reason)
    return reason


def _layer(history: History, text: dict) -> str:
    """``"; layer 5 (blocks.4.layer)"``: the index the figure's layer axis uses, and the layer's name."""
    layer = history.diverged_layer
    if layer is None:
        return ""
    names = list(history.layer_names)
    if layer not in names:
        return text["layer_name"].format(name=layer)
    return text["layer"].format(index=names.index(layer), name=layer)


def outcome(history: History, language: str = "en") -> str:
    """The status line's verdict: ``"✗ diverged at step 36 (...; layer 3)"``, ``"– stalled: ..."`` or
    ``"✓ learned: ..."`` (in Chinese with ``language="zh_CN"``). An accuracy is shown only when it was measured."""
    text = texts(language)
    kind = state(history)
    if kind == "diverged":
        return text["diverged"].format(step=history.diverged_step, reason=_reason(history.reason, text),
                                       layer=_layer(history, text))
    loss, acc = final_loss(history), measured_accuracy(history)
    if kind == "stalled":
        if acc is not None:
            return text["stalled_acc"].format(acc=acc, loss=loss, chance=CHANCE_ACCURACY, stall=STALL_ACCURACY)
        return text["stalled_loss"].format(loss=loss, ln10=math.log(10), stall=STALL_LOSS)
    tested = text["tested"].format(acc=acc) if acc is not None else text["untested"]
    return text["learned"].format(loss=loss, tested=tested)


def _lr_text(lr: float) -> str:
    return f"{lr:.3g}"


def status_line(history: History, language: str = "en") -> str:
    """``"depth 8, learning rate 0.1, plain: "`` followed by :func:`outcome`; both explorers show this line."""
    cfg = history.config
    variant = cfg.get("variant") or _key(history)[2]
    return texts(language)["setting"].format(
        depth=cfg.get("depth"), lr=_lr_text(float(cfg.get("lr", math.nan))),
        variant=variant_label(variant, language)) + outcome(history, language)


# --- static explorer: per-setting SVG strings + range sliders, no kernel -----------------------

def _num(x: float, digits: int = 3):
    """Round to ``digits`` significant digits; non-finite values become None (JSON null)."""
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def _key(h: History) -> tuple[int, float, str]:
    cfg = h.config
    if "depth" not in cfg or "lr" not in cfg:
        raise ValueError("histories must have config['depth'] and config['lr'] (use gs.explore.grid); "
                         f"got config keys {sorted(cfg)}")
    variant = cfg.get("variant") or variant_name(cfg.get("norm", "none") != "none", bool(cfg.get("residual")),
                                                 cfg.get("max_norm") is not None)
    return int(cfg["depth"]), float(cfg["lr"]), str(variant)


def _pack(h: History, max_points: int) -> dict:
    """The numbers one setting's figure needs, rounded (non-finite values become None)."""
    stride = max(1, math.ceil(h.steps / max_points))
    rows = h.grad_norms
    finite_rows = [i for i in range(rows.shape[0]) if bool(torch.isfinite(rows[i]).all())]
    last = finite_rows[-1] if finite_rows else 0
    return dict(
        stride=stride, loss=[_num(v) for v in h.loss[::stride]],
        g0=[_num(v) for v in rows[0].tolist()] if rows.shape[0] else [],
        glast=[_num(v) for v in rows[last].tolist()] if rows.shape[0] else [], glast_step=last,
        diverged=bool(h.diverged), dstep=h.diverged_step, steps=h.steps,
    )


def _range(values: Iterable, decades: float, lowest: float = 0.0, highest: float = math.inf) -> tuple[float, float]:
    """Log-axis limits on whole decades: ``decades`` either side of the median positive value, within the
    data's own extent and [lowest, highest]. Values outside are marked on the frame (off the chart) instead
    of squashing every other curve into one line."""
    pos = sorted(v for v in values if v is not None and v > 0)
    if not pos:
        return max(lowest, 1e-3), max(lowest * 10, 1.0)
    mid = pos[len(pos) // 2]
    hi = min(pos[-1], mid * 10**decades, highest)
    lo = max(pos[0], mid / 10**decades, lowest)
    k0 = math.floor(math.log10(min(lo, hi)) + 1e-9)
    k1 = max(math.ceil(math.log10(hi) - 1e-9), k0 + 1)
    return 10.0**k0, 10.0**k1


def grid_payload(histories: Sequence[History], max_points: int = 200, languages: Sequence[str] = ("en",)) -> dict:
    """The content of a static explorer: for every setting its state, SVG figure (drawn by :func:`svg_figure`
    on axes shared by the whole grid) and status line in each of ``languages`` (``{"en": line, ...}``)."""
    for language in languages:
        texts(language)
    if not histories:
        raise ValueError("histories must be a non-empty list of gs.History (e.g. from gs.explore.grid)")
    keyed = {}
    for h in histories:
        key = _key(h)
        if key in keyed:
            raise ValueError(f"histories holds two runs for depth={key[0]}, lr={key[1]:g}, variant={key[2]!r} "
                             "(pass one seed's runs)")
        keyed[key] = h
    depths = sorted({k[0] for k in keyed})
    lrs = sorted({k[1] for k in keyed})
    variants = list(dict.fromkeys(k[2] for k in keyed))
    packs = {key: _pack(h, max_points) for key, h in keyed.items()}
    loss_range = _range([x for r in packs.values() for x in r["loss"]], 3, *LOSS_AXIS)
    grad_range = _range([x for r in packs.values() for x in r["g0"] + r["glast"]], 4)
    runs = {}
    for (d, lr, v), h in keyed.items():
        runs[f"{depths.index(d)}_{lrs.index(lr)}_{variants.index(v)}"] = dict(
            state=state(h), status={language: status_line(h, language) for language in languages},
            svg=svg_figure(h, max_points, loss_range=loss_range, grad_range=grad_range, packed=packs[d, lr, v]))
    return dict(depths=depths, lrs=lrs, lr_labels=[_lr_text(lr) for lr in lrs], variants=variants, runs=runs,
                colors=STATE_COLORS, loss_range=loss_range, grad_range=grad_range)


def _script_safe(text: str) -> str:
    """JSON text that cannot end or confuse the ``<script>`` element holding it."""
    return text.replace("</", "<\\/").replace("<!--", "\\u003c!--").replace("<script", "\\u003cscript")


# the TEXT entries the page's script needs
_PAGE_TEXT = ("notice_label", "depth", "lr", "lr_axis", "remedy", "setting", "missing")


class StaticExplorer:
    """A kernel-free explorer: display it (its ``_repr_html_``) in a notebook cell."""

    def __init__(self, histories: Sequence[History], title: str | Mapping[str, str] = "Depth × learning rate explorer",
                 max_points: int = 200, notice: str | Mapping[str, str] = "", language: str = "auto"):
        languages = LANGUAGES if language == "auto" else (one_of("language", language, (*LANGUAGES, "auto")),)
        titles, notices = _by_language("title", title, languages), _by_language("notice", notice, languages)
        self.payload = grid_payload(histories, max_points, languages)
        self.payload["text"] = {lang: dict(
            title=titles[lang], notice=notices[lang], **{k: TEXT[lang][k] for k in _PAGE_TEXT},
            variant_labels=[variant_label(v, lang) for v in self.payload["variants"]]) for lang in languages}
        self.payload["languages"] = list(languages)
        blob = json.dumps(self.payload, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
        self.id = f"gsx-{hashlib.sha1(blob.encode()).hexdigest()[:10]}-{next(_ids)}"
        self._json = _script_safe(blob)

    def __repr__(self) -> str:
        p = self.payload
        return (f"StaticExplorer({len(p['depths'])} depths x {len(p['lrs'])} learning rates x "
                f"{len(p['variants'])} variants, languages {p['languages']})")

    def _repr_html_(self) -> str:
        """The explorer in its first language; the script switches it to the page's language (``<html lang>``)."""
        p, i = self.payload, self.id
        t = p["text"][p["languages"][0]]
        radios = "".join(
            f'<label style="margin-right:1em"><input type="radio" name="{i}-variant" value="{k}"'
            f'{" checked" if k == 0 else ""}> <span class="gsx-t-variant">{escape(v)}</span></label>'
            for k, v in enumerate(t["variant_labels"]))
        dval, lval = (len(p["depths"]) - 1) // 2, (len(p["lrs"]) - 1) // 2
        first = p["runs"].get(f"{dval}_{lval}_0", {"svg": "", "status": {}, "state": "learned"})
        hidden = "" if t["notice"] else "display:none;"
        notice = (f'<div class="gsx-notice" style="{hidden}margin-bottom:4px"><i class="gsx-t-notice">'
                  f'{escape(t["notice_label"])}</i> <span class="gsx-notice-text">{escape(t["notice"])}</span></div>'
                  ) if any(p["text"][lang]["notice"] for lang in p["languages"]) else ""
        return _HTML.format(
            id=i, title=escape(t["title"]), notice=notice, json=self._json, radios=radios,
            js=_JS.replace("__ID__", i), dmax=len(p["depths"]) - 1, dval=dval, lmax=len(p["lrs"]) - 1, lval=lval,
            dout=p["depths"][dval], lout=p["lr_labels"][lval],
            status=escape(first["status"].get(p["languages"][0], "")),
            color=STATE_COLORS[first["state"]], svg=first["svg"], depth=escape(t["depth"]), lr=escape(t["lr"]),
            lr_axis=escape(t["lr_axis"], quote=True), remedy=escape(t["remedy"]),
        )

    def size(self) -> int:
        """Bytes of the explorer's HTML (UTF-8): the weight it adds to its page."""
        return len(self._repr_html_().encode())


def _by_language(name: str, value: str | Mapping[str, str], languages: Sequence[str]) -> dict[str, str]:
    """One text per language: a plain string serves every language; a mapping must name each of them."""
    if isinstance(value, str):
        return dict.fromkeys(languages, value)
    missing = [lang for lang in languages if lang not in value]
    if missing:
        raise ValueError(f"{name} must be a string or a mapping with a text for each language {list(languages)}; "
                         f"missing {missing}")
    return {lang: str(value[lang]) for lang in languages}


def static_explorer(histories: Sequence[History], title: str | Mapping[str, str] = "Depth × learning rate explorer",
                    max_points: int = 200, notice: str | Mapping[str, str] = "",
                    language: str = "auto") -> StaticExplorer:
    """Explorer over precomputed runs (``config`` must hold depth, lr and variant; one run per setting) that
    needs no kernel. ``notice`` is the one line under the title that says what to look for.

    ``language`` is one of ``LANGUAGES``, or ``"auto"`` (the default): the explorer then carries every
    language and shows the page's (``<html lang="zh-CN">`` gives Chinese, anything else English). ``title``
    and ``notice`` are a string, or a mapping from language to text, e.g. ``{"en": ..., "zh_CN": ...}``.

    Raises ValueError for an empty or duplicated grid, an unknown language, or a mapping missing a language.
    """
    return StaticExplorer(histories, title, max_points, notice, language)


_HTML = """<div id="{id}" class="gsx-explorer" style="font:13px sans-serif;max-width:760px;\
border:1px solid #8884;border-radius:6px;padding:8px 12px;margin:8px 0">
<div class="gsx-title" style="font-weight:bold;margin-bottom:4px">{title}</div>
{notice}<div><label><span class="gsx-t-depth">{depth}</span> <input type="range" class="gsx-depth" min="0" \
max="{dmax}" step="1" value="{dval}" aria-label="{depth}"> <output class="gsx-depth-out">{dout}</output></label>
<label style="margin-left:1.5em"><span class="gsx-t-lr">{lr}</span> <input type="range" class="gsx-lr" min="0" \
max="{lmax}" step="1" value="{lval}" aria-label="{lr_axis}"> <output class="gsx-lr-out">{lout}</output></label></div>
<div style="margin:4px 0"><span class="gsx-t-remedy">{remedy}</span> {radios}</div>
<div class="gsx-status" role="status" style="margin:4px 0;font-weight:bold;color:{color}">{status}</div>
<div class="gsx-figure">{svg}</div>
<script type="application/json" id="{id}-data">{json}</script>
<script>{js}</script>
</div>"""

# All drawing happens in Python (svg_figure); the script picks the page's language, then swaps in the chosen
# setting's figure and status line.
_JS = r"""(function () {
var root = document.getElementById("__ID__");
var D = JSON.parse(document.getElementById("__ID__-data").textContent);
var page = (document.documentElement.lang || "").toLowerCase().indexOf("zh") === 0 ? "zh_CN" : "en";
var L = D.languages.indexOf(page) >= 0 ? page : D.languages[0], T = D.text[L];
function q(s) { return root.querySelector(s); }
function say(s, text) { var e = q(s); if (e) e.textContent = text; }
say(".gsx-title", T.title); say(".gsx-t-notice", T.notice_label); say(".gsx-notice-text", T.notice);
if (q(".gsx-notice")) q(".gsx-notice").style.display = T.notice ? "" : "none";
say(".gsx-t-depth", T.depth); say(".gsx-t-lr", T.lr); say(".gsx-t-remedy", T.remedy);
q(".gsx-depth").setAttribute("aria-label", T.depth); q(".gsx-lr").setAttribute("aria-label", T.lr_axis);
root.querySelectorAll(".gsx-t-variant").forEach(function (e, k) { e.textContent = T.variant_labels[k]; });
function show() {
  var di = +q(".gsx-depth").value, li = +q(".gsx-lr").value, c = q("input[type=radio]:checked");
  var vi = c ? +c.value : 0, r = D.runs[di + "_" + li + "_" + vi], st = q(".gsx-status");
  q(".gsx-depth-out").textContent = D.depths[di]; q(".gsx-lr-out").textContent = D.lr_labels[li];
  var setting = D.depths[di] + "|" + D.lrs[li] + "|" + D.variants[vi];
  q(".gsx-figure").innerHTML = r ? r.svg : '<svg class="gsx-svg" viewBox="0 0 720 20"></svg>';
  q(".gsx-svg").setAttribute("data-setting", setting);
  st.textContent = r ? r.status[L] : T.setting.replace("{depth}", D.depths[di]).replace("{lr}", D.lr_labels[li])
                   .replace("{variant}", T.variant_labels[vi]) + T.missing;
  st.style.color = r ? D.colors[r.state] : "";
}
root.addEventListener("input", show);
root.addEventListener("change", show);
show();
})();"""


# --- the one drawing: loss curve and per-layer gradient norms as inline SVG ---------------------

_TOP, _BOTTOM = 44, 224  # the panels' frame, in SVG units (viewBox 720 x 266)
_PANEL_W = 270


def _f(v: float) -> str:
    """A coordinate with at most one decimal and no trailing ``.0`` (the page carries many of them)."""
    text = f"{v:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _fmt(v: float) -> str:
    if 0.01 <= v < 1000:
        return f"{v:.3g}"
    return f"1e{round(math.log10(v))}" if abs(math.log10(v) - round(math.log10(v))) < 1e-9 else f"{v:.0e}"


def _log_ticks(lo: float, hi: float) -> list[float]:
    """At least two labelled ticks on a decade-aligned log axis [lo, hi]: 1-2-5 ticks within one decade,
    evenly spaced decades otherwise."""
    k0, k1 = round(math.log10(lo)), round(math.log10(hi))
    if k1 - k0 <= 1:
        return [lo, 2 * lo, 5 * lo, hi]
    step = math.ceil((k1 - k0) / 6)
    return [10.0**k for k in range(k0, k1 + 1, step)]


def _int_ticks(top: int) -> list[int]:
    """Evenly spaced integer ticks 0, s, 2s, ... <= top, with s from 1, 2, 5, 10, 20, ... and at most 7 ticks."""
    step = 1
    while top / step > 6:
        step = step * 5 // 2 if str(step)[0] == "2" else step * 2
    return list(range(0, max(top, 0) + 1, step))


def svg_figure(history: History, max_points: int = 200, *, loss_range: tuple[float, float] | None = None,
               grad_range: tuple[float, float] | None = None, packed: dict | None = None) -> str:
    """Loss curve and per-layer gradient norms of one run as an inline SVG string: the figure of both explorers.

    Log axes run over whole decades with at least two labelled ticks; ``loss_range``/``grad_range`` fix them
    (the static explorer shares one range over its grid), else they fit this run. A value beyond an axis ends
    its line at the frame, where a triangle marks it (class ``gsx-off``); a red-bordered × marks the step where
    a run diverged (class ``gsx-diverged``). Drawing takes about a millisecond, where a matplotlib figure costs
    a large part of the live explorer's one-second budget on a small CPU.
    """
    r = packed or _pack(history, max_points)
    cfg = history.config
    color = _variant_color(str(cfg.get("variant") or _key(history)[2]))
    setting = escape(f'{cfg.get("depth")}|{cfg.get("lr")}|{cfg.get("variant")}', quote=True)
    parts = [f"<svg class='gsx-svg' viewBox='0 0 720 266' width='100%' style='max-width:720px' role='img' "
             f"font-family='sans-serif' font-size='11' data-setting='{setting}' aria-label='loss curve and "
             f"per-layer gradient norms'>"]
    planned = max(int(cfg.get("steps") or 0), history.steps)  # a run that stopped early ends short of the axis
    a = _SvgPanel(parts, 62, "Training loss", "training step", "loss (log scale)", max(planned - 1, 1),
                  loss_range or _range(r["loss"], 3, *LOSS_AXIS))
    a.line([i * r["stride"] for i in range(len(r["loss"]))], r["loss"], color)
    legend_a = [("line", color, "loss")]
    if r["diverged"]:
        finite = [i for i, v in enumerate(r["loss"]) if v is not None]
        at_end = bool(finite) and finite[-1] * r["stride"] == r["dstep"]
        a.cross(r["dstep"], r["loss"][finite[-1]] if at_end else None)
        legend_a.append(("cross", "#d62728", "diverged"))
    n_layers = len(r["g0"])
    b = _SvgPanel(parts, 432, "Gradient norm per layer", "layer (0 = input side)", "‖gradient‖ (log scale)",
                  max(n_layers - 1, 1), grad_range or _range(r["g0"] + r["glast"], 4))
    idx = list(range(n_layers))
    b.line(idx, r["g0"], "currentColor", dash=True)
    b.line(idx, r["glast"], color)
    legend_b = [("dash", "currentColor", "step 0"), ("line", color, f"step {r['glast_step']}")]
    for panel, legend in ((a, legend_a), (b, legend_b)):
        if panel.off:
            legend.append(("off", "currentColor", "off the axis"))
        panel.legend(legend)
    parts.append("</svg>")
    return "".join(parts)


def _variant_color(variant: str) -> str:
    """The book's colour for a variant (gs.plots.color; the first remedy named wins)."""
    from .plots import color

    return color(variant.split("+")[0])


class _SvgPanel:
    """One log-y panel of :func:`svg_figure`: frame, ticks, labels, lines with off-axis marks, a legend above."""

    def __init__(self, parts: list, x0: float, title: str, xlabel: str, ylabel: str, xmax: int, yr):
        self.parts, self.x0, self.x1, self.xmax, self.yr = parts, x0, x0 + _PANEL_W, xmax, yr
        self.l0, self.l1 = math.log10(yr[0]), math.log10(yr[1])
        self.off = 0
        mid, ymid = _f(x0 + _PANEL_W / 2), _f((_TOP + _BOTTOM) / 2)
        yticks, xticks = _log_ticks(*yr), _int_ticks(xmax)
        marks = "".join(f"M{x0 - 4} {_f(self.y(v))}h4" for v in yticks)
        marks += "".join(f"M{_f(self.x(t))} {_BOTTOM}v4" for t in xticks)
        parts.append(
            f"<rect x='{x0}' y='{_TOP}' width='{_PANEL_W}' height='{_BOTTOM - _TOP}' fill='none' "
            f"stroke='currentColor'/><path d='{marks}' stroke='currentColor'/><g fill='currentColor' "
            f"text-anchor='middle'><text x='{mid}' y='14' font-weight='bold'>{escape(title)}</text><text x='{mid}' "
            f"y='261'>{escape(xlabel)}</text><text x='{x0 - 44}' y='{ymid}' transform='rotate(-90 {x0 - 44} {ymid})'>"
            f"{escape(ylabel)}</text><g font-size='10'>"
            + "".join(f"<text x='{_f(self.x(t))}' y='240'>{t}</text>" for t in xticks)
            + "</g><g font-size='10' text-anchor='end'>"
            + "".join(f"<text x='{x0 - 6}' y='{_f(self.y(v) + 3.5)}'>{_fmt(v)}</text>" for v in yticks)
            + "</g></g>")

    def x(self, i: float) -> float:
        return self.x0 + i / max(self.xmax, 1) * _PANEL_W

    def _ly(self, lv: float) -> float:
        return _BOTTOM - (lv - self.l0) / (self.l1 - self.l0) * (_BOTTOM - _TOP)

    def y(self, v: float) -> float:
        return self._ly(math.log10(min(max(v, self.yr[0]), self.yr[1])))

    def line(self, xs, ys, color: str, dash: bool = False) -> None:
        """A polyline through the finite values; it stops where it leaves the axis range (a triangle on the
        frame marks the spot) and starts again where it comes back."""
        d, marks, prev = [], [], None
        for x, v in zip(xs, ys, strict=True):
            if v is None:
                prev = None
                continue
            lv = math.log10(max(v, 1e-300))
            inside = self.l0 - 1e-9 <= lv <= self.l1 + 1e-9
            side = 0 if inside else (1 if lv > self.l1 else -1)
            if prev is None:
                if inside:
                    d.append(f"M{_f(self.x(x))} {_f(self._ly(lv))}")
                else:
                    marks.append((x, side))
            else:
                px, plv, pside = prev
                if pside == 0 and side == 0:
                    d.append(f"L{_f(self.x(x))} {_f(self._ly(lv))}")
                elif pside == 0:  # leaves the axis range: draw to the frame, mark it
                    cx = self._cross_x(px, plv, x, lv, side)
                    d.append(f"L{_f(self.x(cx))} {_f(self._ly(self._edge(side)))}")
                    marks.append((cx, side))
                elif side == 0:  # comes back
                    cx = self._cross_x(px, plv, x, lv, pside)
                    d.append(f"M{_f(self.x(cx))} {_f(self._ly(self._edge(pside)))}L{_f(self.x(x))} "
                             f"{_f(self._ly(lv))}")
                elif side != pside:
                    marks.append((x, side))
            prev = (x, lv, side)
        dashes = " stroke-dasharray='4 3'" if dash else ""
        self.parts.append(f"<path d='{''.join(d)}' fill='none' stroke='{color}' stroke-width='2'{dashes}/>")
        for x, side in marks:
            self._triangle(self.x(x), side, color)

    def _edge(self, side: int) -> float:
        return self.l1 if side > 0 else self.l0

    def _cross_x(self, px: float, plv: float, x: float, lv: float, side: int) -> float:
        t = (self._edge(side) - plv) / (lv - plv) if lv != plv else 1.0
        return px + min(max(t, 0.0), 1.0) * (x - px)

    def _triangle(self, x: float, side: int, color: str) -> None:
        """A triangle on the top (pointing up) or bottom (pointing down) frame: a value beyond the axis."""
        y = _TOP if side > 0 else _BOTTOM
        tip = y - 8 * side
        self.off += 1
        self.parts.append(f"<path class='gsx-off' d='M{_f(x - 5)} {y}h10L{_f(x)} {tip}Z' "
                          f"fill='{color}'/>")

    def cross(self, step: int, value: float | None) -> None:
        x, y = self.x(step), self.y(value) if value is not None else _TOP
        self.parts.append(f"<path class='gsx-diverged' d='M{_f(x - 6)} {_f(y - 6)}l12 12m0 -12l-12 12' "
                          f"stroke='#d62728' stroke-width='3'/>")

    def legend(self, entries: list[tuple[str, str, str]]) -> None:
        """One row between the title and the frame, so it never covers a line."""
        x, out = self.x0, []
        for kind, color, label in entries:
            if kind in ("line", "dash"):
                dash = " stroke-dasharray='4 3'" if kind == "dash" else ""
                out.append(f"<path d='M{x:.0f} 31h16' stroke='{color}' stroke-width='2'{dash}/>")
            elif kind == "cross":
                out.append(f"<path d='M{x + 4:.0f} 27l8 8m0 -8l-8 8' stroke='{color}' stroke-width='2.5'/>")
            else:
                out.append(f"<path d='M{x + 3:.0f} 35h10l-5 -8Z' fill='{color}'/>")
            out.append(f"<text x='{x + 20:.0f}' y='35'>{escape(label)}</text>")
            x += 30 + 5.6 * len(label)
        out.insert(0, "<g font-size='10' fill='currentColor'>")
        out.append("</g>")
        self.parts.append("".join(out))


# --- live explorer: ipywidgets, retrains on every move ------------------------------------------

class LiveExplorer:
    """Sliders and toggles that retrain a small network (MLP or CNN); display the ``.widget`` (or the explorer itself).

    Moves are debounced (``debounce`` seconds of quiet) and a newer setting cancels the run
    in flight, so dragging a slider never queues up stale trainings.
    """

    def __init__(self, data: Split, depths=(1, 16), lrs=(1e-3, 3.0), steps: int = 60, arch: str = "mlp",
                 width: int | None = None, batch_size: int = 64, debounce: float = 0.15, seed: int | None = None,
                 notice: str = "", language: str = "en"):
        import ipywidgets as w  # lazy: the package imports without a kernel

        self.language = language
        self.text = text = texts(language)
        lo, hi = (positive_int("depths[0]", depths[0]), positive_int("depths[1]", depths[1]))
        lr_lo, lr_hi = positive_float("lrs[0]", lrs[0]), positive_float("lrs[1]", lrs[1])
        if lo > hi or lr_lo >= lr_hi:
            raise ValueError(f"depths and lrs must be (low, high) ranges; got depths={depths}, lrs={lrs}")
        self.data = data.flat() if one_of("arch", arch, ARCHS) == "mlp" and data.x_train.ndim > 2 else data
        self.options = dict(steps=positive_int("steps", steps), arch=arch, width=_check_width(width),
                            seed=None if seed is None else resolve_seed(seed),
                            batch_size=positive_int("batch_size", batch_size, minimum=2))
        self.debounce = positive_float("debounce", debounce, allow_zero=True)
        style = {"description_width": "initial"}
        self.depth = w.IntSlider(value=min(max(8, lo), hi), min=lo, max=hi, description=text["depth"], style=style)
        self.lr = w.FloatLogSlider(value=min(max(0.1, lr_lo), lr_hi), base=10, min=math.log10(lr_lo),
                                   max=math.log10(lr_hi), step=0.1, description=text["lr"],
                                   readout_format=".3g", style=style)
        self.toggles = {name: w.ToggleButton(value=False, description=label) for name, label in
                        zip(REMEDIES, text["toggles"], strict=True)}
        self.status = w.HTML()
        self.figure = w.HTML()
        self.notice = w.HTML(f"<i>{escape(text['notice_label'])}</i> {escape(notice)}" if notice else "")
        self.widget = w.VBox([self.notice, w.HBox([self.depth, self.lr]), w.HBox(list(self.toggles.values())),
                              self.status, self.figure])
        self.history: History | None = None
        self._cond = threading.Condition()
        self._wanted = 0   # generation of the newest request
        self._done = 0     # generation of the last request finished (drawn or superseded)
        self._pending: dict | None = None
        self._worker: threading.Thread | None = None
        for control in (self.depth, self.lr, *self.toggles.values()):
            control.observe(self._on_change, names="value")
        self.update()

    # public API
    def setting(self) -> dict:
        """The current slider and toggle values."""
        return dict(depth=self.depth.value, lr=float(self.lr.value),
                    **{k: t.value for k, t in self.toggles.items()})

    def update(self, **setting) -> float:
        """Set controls without triggering the observers, retrain, redraw; return elapsed seconds.

        Keywords: depth, lr, batchnorm, residual, clip. This is the synchronous path the
        benchmark times; the same work a slider move triggers, minus the debounce delay.
        """
        start = time.perf_counter()
        with self._cond:
            self._wanted += 1
            generation = self._wanted
            self._pending = None
        self._set_quietly(setting)
        self._show(self._compute(self.setting(), lambda: False))
        with self._cond:
            self._done = max(self._done, generation)
            self._cond.notify_all()
        return time.perf_counter() - start

    def wait(self, timeout: float = 60.0) -> bool:
        """Block until every requested update has been drawn (or superseded); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= self._wanted, timeout)

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    # internals
    def _set_quietly(self, setting: dict) -> None:
        unknown = set(setting) - {"depth", "lr", *REMEDIES}
        if unknown:
            raise ValueError(f"update() takes depth, lr, {', '.join(REMEDIES)}; got {sorted(unknown)}")
        controls = dict(depth=self.depth, lr=self.lr, **self.toggles)
        for name, value in setting.items():
            control = controls[name]
            control.unobserve(self._on_change, names="value")
            try:
                control.value = value
            finally:
                control.observe(self._on_change, names="value")

    def _on_change(self, _change) -> None:
        with self._cond:
            self._wanted += 1
            self._pending = self.setting()
            self._cond.notify_all()
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._loop, daemon=True, name="gradstab-explorer")
                self._worker.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None:
                    if not self._cond.wait(timeout=30.0):
                        self._worker = None
                        return
                while True:  # debounce: wait until the controls are quiet
                    seen = self._wanted
                    self._cond.wait(self.debounce)
                    if seen == self._wanted:
                        break
                if self._pending is None:  # update() took over meanwhile
                    continue
                setting, self._pending, generation = self._pending, None, self._wanted
            try:
                history = self._compute(setting, lambda g=generation: self._wanted != g)
                if self._wanted == generation:
                    self._show(history)
            except Superseded:
                pass
            with self._cond:
                self._done = max(self._done, generation)
                self._cond.notify_all()

    def _compute(self, setting: dict, cancelled):
        variant = variant_name(**{k: setting[k] for k in REMEDIES})
        try:
            return run_one(self.data, setting["depth"], setting["lr"], variant, cancelled=cancelled,
                           **self.options)
        except Superseded:
            raise
        except Exception as exc:  # shown in the explorer, never raised into the event loop
            return f"{type(exc).__name__}: {exc}"

    def _show(self, history) -> None:
        if isinstance(history, str):
            failed = self.text["failed"].format(error=history)
            self.status.value = f"<b style='color:#d62728'>{escape(failed)}</b>"
            return
        self.history = history
        color = STATE_COLORS[state(history)]
        self.status.value = f"<b style='color:{color}'>{escape(status_line(history, self.language))}</b>"
        self.figure.value = svg_figure(history)


def live_explorer(data: Split, depths=(1, 16), lrs=(1e-3, 3.0), steps: int = 60, **kwargs) -> LiveExplorer:
    """Sliders for depth and (log-scale) learning rate, toggles for the remedies; retrains on each move.

    ``depths`` and ``lrs`` are (low, high) slider ranges; ``arch`` ("mlp" or "cnn"), ``steps``, ``width``,
    ``batch_size`` and ``seed`` are :func:`run_one`'s, so a setting gives the numbers the static explorer
    shows for it when both use the same options. ``notice`` is a line saying what to look for; ``language``
    (one of ``LANGUAGES``) the language of the labels and the status line. Needs
    ipywidgets; without a frontend it still runs (the first setting is trained at construction).
    """
    return LiveExplorer(data, depths=depths, lrs=lrs, steps=steps, **kwargs)


def measure_latency(explorer: LiveExplorer, settings: Sequence[dict]) -> dict:
    """Time ``explorer.update(**s)`` for each setting: ``{"median": s, "worst": s, "times": [...]}``."""
    times = [explorer.update(**s) for s in settings]
    return dict(median=statistics.median(times), worst=max(times), times=times)
