"""Slider explorers over depth x learning rate x remedy.

Two faces of one idea:

* :func:`live_explorer` (Jupyter with a kernel): ipywidgets sliders; every move retrains a
  small CNN and redraws its loss curve and per-layer gradient norms.
* :func:`static_explorer` (the rendered book, no kernel, no network): a grid of runs
  computed when the notebook executes, embedded as JSON in the cell's HTML together with
  ``<input type="range">`` sliders and a few lines of JavaScript that draw inline SVG.

A *variant* names the remedies switched on: ``"plain"`` or a ``+``-joined subset of
``batchnorm``, ``residual`` (branch scaled by 1/sqrt(depth)) and ``clip`` (global norm 1).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import statistics
import threading
import time
from collections.abc import Iterable, Sequence
from html import escape

import torch

from ._check import one_of, positive_float, positive_int
from .data import Split
from .device import resolve_seed
from .models import cnn, mlp
from .train import History, train

REMEDIES = ("batchnorm", "residual", "clip")
CLIP_NORM = 1.0
LOSS_AXIS = (1e-3, 1e3)  # loss-axis limits: a loss above 1e3 has exploded, and is drawn at the top
_ids = itertools.count()


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


class Superseded(Exception):
    """A live-explorer run stopped because a newer slider setting arrived."""


def _stop_if(cancelled) -> None:
    if cancelled():
        raise Superseded


def grid(data: Split, depths: Sequence[int], lrs: Sequence[float],
         variants: Sequence[str] = ("plain", "batchnorm", "residual", "clip"), *, arch: str = "mlp",
         steps: int = 60, width: int | None = None, batch_size: int = 64, seed: int | None = None) -> list[History]:
    """Every (variant, depth, lr), trained as :func:`run_one` would: the input :func:`static_explorer` expects.

    All learning rates of one depth and variant train at once through :func:`gradstab.sweep.sweep`.
    """
    from .sweep import sweep

    one_of("arch", arch, ARCHS)
    if arch == "mlp" and data.x_train.ndim > 2:
        data = data.flat()
    runs = []
    for variant in variants:
        for depth in depths:
            model_kw, train_kw = variant_kwargs(variant, depth)
            for history in sweep(data, lrs, depth=depth, seeds=(resolve_seed(seed),), steps=steps,
                                 batch_size=batch_size, arch=arch, width=width or _WIDTH[arch], **model_kw, **train_kw):
                history.config.update(depth=depth, variant=variant, arch=arch)
                runs.append(history)
    return runs


# --- static explorer: JSON + range sliders + inline SVG, no kernel ------------------------------

def _num(x: float, digits: int = 3):
    """Round to ``digits`` significant digits; non-finite values become None (JSON null)."""
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def _key(h: History) -> tuple[int, float, str]:
    cfg = h.config
    if "depth" not in cfg or "lr" not in cfg:
        raise ValueError("histories must have config['depth'] and config['lr'] (use gs.explore.grid or "
                         f"gs.sweep_grid); got config keys {sorted(cfg)}")
    variant = cfg.get("variant") or variant_name(cfg.get("norm", "none") != "none", bool(cfg.get("residual")),
                                                 cfg.get("max_norm") is not None)
    return int(cfg["depth"]), float(cfg["lr"]), str(variant)


def _pack(h: History, max_points: int) -> dict:
    """The numbers one setting needs on the page, rounded."""
    stride = max(1, math.ceil(h.steps / max_points))
    rows = h.grad_norms
    finite_rows = [i for i in range(rows.shape[0]) if bool(torch.isfinite(rows[i]).all())]
    last = finite_rows[-1] if finite_rows else 0
    return dict(
        stride=stride, loss=[_num(v) for v in h.loss[::stride]],
        g0=[_num(v) for v in rows[0].tolist()] if rows.shape[0] else [],
        glast=[_num(v) for v in rows[last].tolist()] if rows.shape[0] else [], glast_step=last,
        diverged=bool(h.diverged), dstep=h.diverged_step, dlayer=h.diverged_layer, reason=h.reason,
        acc=_num(h.test_accuracy), steps=h.steps,
    )


def _range(values: Iterable, decades: float, lowest: float = 0.0, highest: float = math.inf) -> tuple[float, float]:
    """Log-axis limits: ``decades`` either side of the median positive value, within the data's own
    extent and [lowest, highest]. Outliers (an exploding run) are drawn at the edge instead of
    squashing every other curve into one line."""
    pos = sorted(v for v in values if v is not None and v > 0)
    if not pos:
        return max(lowest, 1e-3), 1.0
    mid = pos[len(pos) // 2]
    hi = min(pos[-1], mid * 10**decades, highest)
    lo = max(pos[0], mid / 10**decades, lowest)
    return min(lo, hi / 10), hi


def grid_payload(histories: Sequence[History], max_points: int = 200) -> dict:
    """The JSON-ready content of a static explorer (also handy for tests)."""
    if not histories:
        raise ValueError("histories must be a non-empty list of gs.History (e.g. from gs.explore.grid)")
    keyed = {}
    for h in histories:
        key = _key(h)
        if key in keyed:
            raise ValueError(f"histories holds two runs for depth={key[0]}, lr={key[1]:g}, variant={key[2]!r}")
        keyed[key] = h
    depths = sorted({k[0] for k in keyed})
    lrs = sorted({k[1] for k in keyed})
    variants = list(dict.fromkeys(k[2] for k in keyed))
    runs = {f"{depths.index(d)}_{lrs.index(lr)}_{variants.index(v)}": _pack(h, max_points)
            for (d, lr, v), h in keyed.items()}
    losses = [x for r in runs.values() for x in r["loss"]]
    grads = [x for r in runs.values() for x in r["g0"] + r["glast"]]
    return dict(depths=depths, lrs=lrs, variants=variants, runs=runs,
                loss_range=_range(losses, 3, *LOSS_AXIS), grad_range=_range(grads, 4),
                max_steps=max(h.steps for h in histories),
                max_layers=max(len(r["g0"]) for r in runs.values()))


class StaticExplorer:
    """A kernel-free explorer: display it (its ``_repr_html_``) in a notebook cell."""

    def __init__(self, histories: Sequence[History], title: str = "Depth × learning rate explorer",
                 max_points: int = 200):
        self.payload = grid_payload(histories, max_points)
        self.title = title
        blob = json.dumps(self.payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
        self.id = f"gsx-{hashlib.sha1(blob.encode()).hexdigest()[:10]}-{next(_ids)}"
        self._json = blob.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")

    def __repr__(self) -> str:
        p = self.payload
        return (f"StaticExplorer({len(p['depths'])} depths x {len(p['lrs'])} learning rates x "
                f"{len(p['variants'])} variants)")

    def _repr_html_(self) -> str:
        p, i = self.payload, self.id
        radios = "".join(
            f'<label style="margin-right:1em"><input type="radio" name="{i}-variant" value="{k}"'
            f'{" checked" if k == 0 else ""}> {escape(v)}</label>' for k, v in enumerate(p["variants"]))
        last_lr = len(p["lrs"]) - 1
        return _HTML.format(
            id=i, title=escape(self.title), json=self._json, radios=radios, js=_JS.replace("__ID__", i),
            dmax=len(p["depths"]) - 1, dval=(len(p["depths"]) - 1) // 2, lmax=last_lr, lval=last_lr // 2,
        )


def static_explorer(histories: Sequence[History], title: str = "Depth × learning rate explorer",
                    max_points: int = 200) -> StaticExplorer:
    """Explorer over precomputed runs (``config`` must hold depth, lr and variant) that needs no kernel."""
    return StaticExplorer(histories, title, max_points)


_HTML = """<div id="{id}" class="gsx-explorer" style="font:13px sans-serif;max-width:760px;\
border:1px solid #8884;border-radius:6px;padding:8px 12px;margin:8px 0">
<div style="font-weight:bold;margin-bottom:4px">{title}</div>
<div><label>depth <input type="range" class="gsx-depth" min="0" max="{dmax}" step="1" value="{dval}" \
aria-label="depth"> <output class="gsx-depth-out"></output></label>
<label style="margin-left:1.5em">learning rate <input type="range" class="gsx-lr" min="0" max="{lmax}" \
step="1" value="{lval}" aria-label="learning rate (log scale)"> <output class="gsx-lr-out"></output></label></div>
<div style="margin:4px 0">remedy: {radios}</div>
<div class="gsx-status" role="status" style="margin:4px 0;font-weight:bold"></div>
<svg class="gsx-svg" viewBox="0 0 720 290" width="100%" role="img" aria-label="loss curve and per-layer \
gradient norms for the chosen setting" style="max-width:720px;color:inherit"></svg>
<script type="application/json" id="{id}-data">{json}</script>
<script>{js}</script>
</div>"""

# Kept short on purpose: read values from the sliders, pick the run, draw two log-scale panels.
_JS = r"""(function () {
var root = document.getElementById("__ID__");
var D = JSON.parse(document.getElementById("__ID__-data").textContent);
var NS = "http://www.w3.org/2000/svg", svg = root.querySelector(".gsx-svg");
function q(s) { return root.querySelector(s); }
function el(tag, a, text) {
  var e = document.createElementNS(NS, tag);
  for (var k in a) e.setAttribute(k, a[k]);
  if (text !== undefined) e.textContent = text;
  svg.appendChild(e); return e;
}
function fmt(v) { return v >= 0.01 && v < 1000 ? String(+v.toPrecision(3)) : v.toExponential(1); }
function panel(x0, title, xlabel, ylabel, xmax, yr) {
  var x1 = x0 + 270, y0 = 40, y1 = 240, l0 = Math.log10(yr[0]), l1 = Math.log10(yr[1]);
  var P = {x: function (i) { return x0 + i / Math.max(xmax, 1) * (x1 - x0); },
           y: function (v) { var t = (Math.log10(Math.min(Math.max(v, yr[0]), yr[1])) - l0) / (l1 - l0);
                             return y1 - t * (y1 - y0); }, top: y0, x1: x1};
  el("rect", {x: x0, y: y0, width: x1 - x0, height: y1 - y0, fill: "none", stroke: "currentColor"});
  el("text", {x: (x0 + x1) / 2, y: 26, "text-anchor": "middle", "font-weight": "bold", fill: "currentColor"}, title);
  el("text", {x: (x0 + x1) / 2, y: 275, "text-anchor": "middle", fill: "currentColor"}, xlabel);
  el("text", {x: x0 - 44, y: 140, "text-anchor": "middle", fill: "currentColor",
              transform: "rotate(-90 " + (x0 - 44) + " 140)"}, ylabel);
  var step = Math.max(1, Math.ceil((l1 - l0) / 6));
  for (var k = Math.ceil(l0); k <= Math.floor(l1); k += step) {
    var y = P.y(Math.pow(10, k));
    el("line", {x1: x0 - 4, x2: x0, y1: y, y2: y, stroke: "currentColor"});
    el("text", {x: x0 - 6, y: y + 4, "text-anchor": "end", "font-size": 10, fill: "currentColor"}, "1e" + k);
  }
  for (var j = 0; j <= 4; j++) {
    var xv = Math.round(xmax * j / 4);
    el("text", {x: P.x(xv), y: 254, "text-anchor": "middle", "font-size": 10, fill: "currentColor"}, xv);
  }
  return P;
}
function line(P, xs, ys, color, label, ly) {
  var d = "", pen = false;
  for (var i = 0; i < ys.length; i++) {
    if (ys[i] === null) { pen = false; continue; }
    d += (pen ? "L" : "M") + P.x(xs[i]).toFixed(1) + " " + P.y(ys[i]).toFixed(1); pen = true;
  }
  el("path", {d: d, fill: "none", stroke: color, "stroke-width": 2});
  if (label) {
    el("line", {x1: P.x1 - 110, x2: P.x1 - 92, y1: ly, y2: ly, stroke: color, "stroke-width": 2});
    el("text", {x: P.x1 - 88, y: ly + 4, "font-size": 10, fill: "currentColor"}, label);
  }
}
function cross(x, y) {
  el("path", {d: "M" + (x - 6) + " " + (y - 6) + "L" + (x + 6) + " " + (y + 6) + "M" + (x - 6) + " " + (y + 6) +
              "L" + (x + 6) + " " + (y - 6), stroke: "#d62728", "stroke-width": 3, class: "gsx-diverged"});
}
function draw() {
  var di = +q(".gsx-depth").value, li = +q(".gsx-lr").value, vi = 0;
  var checked = q("input[type=radio]:checked"); if (checked) vi = +checked.value;
  var depth = D.depths[di], lr = D.lrs[li], variant = D.variants[vi];
  q(".gsx-depth-out").textContent = depth; q(".gsx-lr-out").textContent = fmt(lr);
  var r = D.runs[di + "_" + li + "_" + vi], st = q(".gsx-status");
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  svg.setAttribute("data-setting", depth + "|" + lr + "|" + variant);
  if (!r) { st.textContent = "no run was computed for this setting"; st.style.color = ""; return; }
  var A = panel(60, "Training loss", "training step", "loss (log)", D.max_steps - 1, D.loss_range);
  var xs = r.loss.map(function (v, i) { return i * r.stride; });
  line(A, xs, r.loss, "#1f77b4");
  var B = panel(430, "Gradient norm per layer", "layer (0 = input side)", "‖grad‖ (log)",
                D.max_layers - 1, D.grad_range);
  var idx = r.g0.map(function (v, i) { return i; });
  line(B, idx, r.g0, "#2ca02c", "step 0", B.top + 14);
  line(B, idx, r.glast, "#ff7f0e", "step " + r.glast_step, B.top + 28);
  if (r.diverged) {
    var last = -1;
    for (var i = 0; i < r.loss.length; i++) if (r.loss[i] !== null) last = i;
    cross(A.x(r.dstep), last >= 0 && last * r.stride === r.dstep ? A.y(r.loss[last]) : A.top);
    st.textContent = "✗ diverged at step " + r.dstep + " (" + r.reason + "; layer " + r.dlayer + ")";
    st.style.color = "#d62728";
  } else {
    st.textContent = "✓ trained " + r.steps + " steps: final loss " + fmt(r.loss[r.loss.length - 1]) +
                     ", test accuracy " + Math.round(100 * r.acc) + "%";
    st.style.color = "";
  }
  st.textContent = "depth " + depth + ", learning rate " + fmt(lr) + ", " + variant + ": " + st.textContent;
}
root.addEventListener("input", draw);
root.addEventListener("change", draw);
draw();
})();"""


def svg_figure(history: History, max_points: int = 200) -> str:
    """Loss curve and per-layer gradient norms as an inline SVG string (the live explorer's figure).

    Draws what the static explorer's JavaScript draws, in Python: a millisecond, where a
    matplotlib figure costs a large part of the one-second budget on a small CPU.
    """
    r = _pack(history, max_points)
    parts = [f'<svg class="gsx-svg" viewBox="0 0 720 290" width="100%" style="max-width:720px" role="img" '
             f'data-setting="{history.config.get("depth")}|{history.config.get("lr")}|'
             f'{history.config.get("variant")}">']
    a = _SvgPanel(parts, 60, "Training loss", "training step", "loss (log)", max(history.steps - 1, 1),
                  _range(r["loss"], 3, *LOSS_AXIS))
    a.line([i * r["stride"] for i in range(len(r["loss"]))], r["loss"], "#1f77b4")
    b = _SvgPanel(parts, 430, "Gradient norm per layer", "layer (0 = input side)", "‖grad‖ (log)",
                  max(len(r["g0"]) - 1, 1), _range(r["g0"] + r["glast"], 4))
    idx = list(range(len(r["g0"])))
    b.line(idx, r["g0"], "#2ca02c", "step 0", 0)
    b.line(idx, r["glast"], "#ff7f0e", f"step {r['glast_step']}", 1)
    if r["diverged"]:
        finite = [i for i, v in enumerate(r["loss"]) if v is not None]
        at_end = bool(finite) and finite[-1] * r["stride"] == r["dstep"]
        a.cross(r["dstep"], r["loss"][finite[-1]] if at_end else None)
    parts.append("</svg>")
    return "".join(parts)


class _SvgPanel:
    """One log-y panel of :func:`svg_figure`, laid out like the static explorer's JavaScript."""

    def __init__(self, parts: list, x0: float, title: str, xlabel: str, ylabel: str, xmax: float, yr):
        self.parts, self.x0, self.x1, self.y0, self.y1 = parts, x0, x0 + 270, 40, 240
        self.xmax, self.yr = xmax, yr
        self.l0, self.l1 = math.log10(yr[0]), math.log10(yr[1])
        mid = (self.x0 + self.x1) / 2
        parts.append(f'<rect x="{x0}" y="40" width="270" height="200" fill="none" stroke="currentColor"/>'
                     f'<text x="{mid}" y="26" text-anchor="middle" font-weight="bold" fill="currentColor">{title}'
                     f'</text><text x="{mid}" y="275" text-anchor="middle" fill="currentColor">{xlabel}</text>'
                     f'<text x="{x0 - 44}" y="140" text-anchor="middle" fill="currentColor" '
                     f'transform="rotate(-90 {x0 - 44} 140)">{ylabel}</text>')
        for k in range(math.ceil(self.l0), math.floor(self.l1) + 1, max(1, math.ceil((self.l1 - self.l0) / 6))):
            y = self.y(10.0 ** k)
            parts.append(f'<line x1="{x0 - 4}" x2="{x0}" y1="{y:.1f}" y2="{y:.1f}" stroke="currentColor"/>'
                         f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="10" '
                         f'fill="currentColor">1e{k}</text>')
        for j in range(5):
            xv = round(xmax * j / 4)
            parts.append(f'<text x="{self.x(xv):.1f}" y="254" text-anchor="middle" font-size="10" '
                         f'fill="currentColor">{xv}</text>')

    def x(self, i: float) -> float:
        return self.x0 + i / max(self.xmax, 1) * (self.x1 - self.x0)

    def y(self, v: float) -> float:
        t = (math.log10(min(max(v, self.yr[0]), self.yr[1])) - self.l0) / (self.l1 - self.l0)
        return self.y1 - t * (self.y1 - self.y0)

    def line(self, xs, ys, color: str, label: str | None = None, row: int = 0) -> None:
        d, pen = [], False
        for x, v in zip(xs, ys, strict=True):
            if v is not None:
                d.append(f"{'L' if pen else 'M'}{self.x(x):.1f} {self.y(v):.1f}")
            pen = v is not None
        self.parts.append(f'<path d="{"".join(d)}" fill="none" stroke="{color}" stroke-width="2"/>')
        if label:
            ly = self.y0 + 14 * (row + 1)
            self.parts.append(f'<line x1="{self.x1 - 110}" x2="{self.x1 - 92}" y1="{ly}" y2="{ly}" '
                              f'stroke="{color}" stroke-width="2"/><text x="{self.x1 - 88}" y="{ly + 4}" '
                              f'font-size="10" fill="currentColor">{label}</text>')

    def cross(self, step: int, value: float | None) -> None:
        x, y = self.x(step), self.y(value) if value is not None else self.y0
        self.parts.append(f'<path class="gsx-diverged" d="M{x - 6:.1f} {y - 6:.1f}L{x + 6:.1f} {y + 6:.1f}'
                          f'M{x - 6:.1f} {y + 6:.1f}L{x + 6:.1f} {y - 6:.1f}" stroke="#d62728" stroke-width="3"/>')


# --- live explorer: ipywidgets, retrains on every move ------------------------------------------

class LiveExplorer:
    """Sliders and toggles that retrain a small CNN; display the ``.widget`` (or the explorer itself).

    Moves are debounced (``debounce`` seconds of quiet) and a newer setting cancels the run
    in flight, so dragging a slider never queues up stale trainings.
    """

    def __init__(self, data: Split, depths=(1, 16), lrs=(1e-3, 3.0), steps: int = 60, arch: str = "mlp",
                 width: int | None = None, batch_size: int = 64, debounce: float = 0.15, seed: int | None = None):
        import ipywidgets as w  # lazy: the package imports without a kernel

        lo, hi = (positive_int("depths[0]", depths[0]), positive_int("depths[1]", depths[1]))
        lr_lo, lr_hi = positive_float("lrs[0]", lrs[0]), positive_float("lrs[1]", lrs[1])
        if lo > hi or lr_lo >= lr_hi:
            raise ValueError(f"depths and lrs must be (low, high) ranges; got depths={depths}, lrs={lrs}")
        self.data = data.flat() if one_of("arch", arch, ARCHS) == "mlp" and data.x_train.ndim > 2 else data
        self.options = dict(steps=positive_int("steps", steps), arch=arch, width=width, seed=seed,
                            batch_size=positive_int("batch_size", batch_size, minimum=2))
        self.debounce = positive_float("debounce", debounce, allow_zero=True)
        style = {"description_width": "initial"}
        self.depth = w.IntSlider(value=min(max(8, lo), hi), min=lo, max=hi, description="depth", style=style)
        self.lr = w.FloatLogSlider(value=min(max(0.1, lr_lo), lr_hi), base=10, min=math.log10(lr_lo),
                                   max=math.log10(lr_hi), step=0.1, description="learning rate",
                                   readout_format=".3g", style=style)
        self.toggles = {name: w.ToggleButton(value=False, description=label) for name, label in
                        zip(REMEDIES, ("BatchNorm", "residual (scaled)", f"clip ‖g‖≤{CLIP_NORM:g}"), strict=True)}
        self.status = w.HTML()
        self.figure = w.HTML()
        self.widget = w.VBox([w.HBox([self.depth, self.lr]), w.HBox(list(self.toggles.values())),
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
            self.status.value = f"<b style='color:#d62728'>could not train this setting: {history}</b>"
            return
        self.history = history
        cfg = history.config
        head = f"depth {cfg['depth']}, learning rate {cfg['lr']:.3g}, {cfg['variant']}: "
        if history.diverged:
            self.status.value = f"<b style='color:#d62728'>{head}✗ {history.summary()}</b>"
        else:
            self.status.value = f"<b>{head}✓ {history.summary()}</b>"
        self.figure.value = svg_figure(history)


def live_explorer(data: Split, depths=(1, 16), lrs=(1e-3, 3.0), steps: int = 60, **kwargs) -> LiveExplorer:
    """Sliders for depth and (log-scale) learning rate, toggles for the remedies; retrains on each move.

    ``depths`` and ``lrs`` are (low, high) slider ranges. Needs ipywidgets; without a
    frontend it still runs (the first setting is trained at construction).
    """
    return LiveExplorer(data, depths=depths, lrs=lrs, steps=steps, **kwargs)


def measure_latency(explorer: LiveExplorer, settings: Sequence[dict]) -> dict:
    """Time ``explorer.update(**s)`` for each setting: ``{"median": s, "worst": s, "times": [...]}``."""
    times = [explorer.update(**s) for s in settings]
    return dict(median=statistics.median(times), worst=max(times), times=times)
