"""The pictures: depth × time maps and the latest gradient profile, as PNGs for TensorBoard and reports.

- ``grad_to_weight`` map: every layer (input at the top) against the logging steps, log colour scale: a
  vanishing gradient is a dark band at the top, an explosion a bright one, a dead layer a black row;
- ``skip_share`` map: the same for the residual blocks, 0 (skip carries nothing, collapsed) to 1 (branch off);
- ``effective_depth``: the path-length distribution of the latest step (:mod:`gradwatch.depth`);
- ``profile``: the latest step along the depth, input on the left: each layer's gradient norm (bars, the
  "gradient flow" chart of forum posts) and gradient-to-weight ratio, stages marked, and each block's
  skip_share below.

Alert steps are marked (dashed lines, coloured by severity). Colour scales are fixed per metric, so runs side
by side compare: ``grad_to_weight`` :data:`G2W_RANGE` (log), ``skip_share`` 0–1. Rows keep the record's
order (depth order); a row not measured at a step (a block that disappeared) is light grey, a value that is
zero or not finite black. Legends sit outside the data. Sizes: 7–9 inches at 100 dpi with 9–11 pt text,
readable at TensorBoard's "Show actual image size" (one click, docs/dashboard.md).

Rendered with matplotlib's object API (no pyplot
state, so safe on the TensorBoard sink's thread), imported on first use: it costs ~0.5 s to import and a
run that never draws should not pay it. :class:`Timeline` keeps what the maps need, bounded: past
``max_steps`` columns it drops every other one (the event file keeps every value).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ...depth import distribution, figures
from ._card import HealthCard, draw_card
from ._image import Picture, to_png
from ...record import StepRecord

__all__ = ["Timeline", "Picture", "Scene", "scene", "draw", "render_all", "heatmap", "profile", "depth_distribution"]

_SEVERITY_COLOURS = {"critical": "#d62728", "warning": "#ff7f0e", "info": "#7f7f7f"}
_MAX_TICKS = 28  # depth-axis labels past this are thinned: names must stay legible
#: The fixed colour range of the ``grad_to_weight`` map (log scale), the same for every run, so maps side by
#: side compare: healthy layers sit around 1e-3–1e-1; values beyond it take the end colours (arrows on the bar).
G2W_RANGE = (1e-5, 10.0)
_MISSING = "#d9d9d9"  # not measured at that step
_TICK_PT = 8


@dataclass
class Timeline:
    """The per-step values the maps draw, kept for at most ``max_steps`` columns (halved when full)."""

    max_steps: int = 256
    steps: list[int] = field(default_factory=list)
    layers: list[tuple[tuple[str, ...], np.ndarray]] = field(default_factory=list)
    blocks: list[tuple[tuple[str, ...], np.ndarray]] = field(default_factory=list)
    alerts: list[tuple[int, str]] = field(default_factory=list)  # (step, severity) of openings, escalations
    latest: StepRecord | None = None

    def add(self, record: StepRecord) -> None:
        """Append ``record``'s column (every other column is dropped past ``max_steps``)."""
        self.latest = record
        self.steps.append(record.step)
        self.layers.append(_weight_layers(record))
        self.blocks.append((record.blocks, record.block("skip_share") if record.blocks else np.zeros(0)))
        self.alerts.extend((record.step, e.severity) for e in record.events if e.kind in ("opened", "escalated"))
        if len(self.steps) > self.max_steps:  # keep every other column (the newest always)
            keep = slice((len(self.steps) - 1) % 2, None, 2)
            self.steps, self.layers, self.blocks = self.steps[keep], self.layers[keep], self.blocks[keep]
            self.alerts = self.alerts[-4 * self.max_steps:]

    def matrix(self, which: str, fill: float = np.nan) -> tuple[list[str], np.ndarray]:
        """``(names, values)``: names in the latest step's order, an earlier name not in it put back after the
        name it followed when it was last measured (depth order is kept when a block disappears); values
        ``(len(names), len(steps))`` with ``fill`` where a name was not measured."""
        series = self.layers if which == "layers" else self.blocks
        names: list[str] = list(series[-1][0]) if series else []
        placed = set(names)
        for ns, _ in reversed(series):  # newest first: a name goes where it was last seen
            for i, n in enumerate(ns):
                if n in placed:
                    continue
                before = next((p for p in reversed(ns[:i]) if p in placed), None)
                names.insert(0 if before is None else names.index(before) + 1, n)
                placed.add(n)
        index = {n: i for i, n in enumerate(names)}
        out = np.full((len(names), len(series)), fill)
        for j, (ns, vals) in enumerate(series):
            if ns:
                out[[index[n] for n in ns], j] = vals
        return names, out


def _weight_layers(record: StepRecord) -> tuple[tuple[str, ...], np.ndarray]:
    """The weight layers' (conv, linear) gradient-to-weight ratios: the ones comparable across depth. Norm
    layers in between would stripe the map with their own, systematically different, level."""
    g2w = record.layer("grad_to_weight")
    if not record.kinds or "weight" not in record.kinds:
        return record.layers, g2w
    keep = [i for i, k in enumerate(record.kinds) if k == "weight"]
    return tuple(record.layers[i] for i in keep), g2w[keep]


class Scene(NamedTuple):
    """What one drawing of :func:`render_all` needs, as plain values (names, numpy arrays, numbers): picklable, so
    a child process can draw it (:mod:`gradwatch.sinks.tensorboard._drawer`)."""

    title: str
    steps: list[int]
    alerts: list[tuple[int, str]]
    layer_names: list[str]
    g2w: np.ndarray  # (layers, steps): the weight layers' gradient-to-weight ratios
    weight_only: bool  # the map holds weight layers only (the record knows layer kinds)
    block_names: list[str]
    share: np.ndarray  # (blocks, steps): skip_share
    step: int  # the latest step's, for the profile and the depth distribution
    layers: tuple[str, ...]
    grad_norm: np.ndarray
    grad_to_weight: np.ndarray
    blocks: tuple[str, ...]
    skip_grad: np.ndarray
    branch_grad: np.ndarray
    skip_share: np.ndarray
    kinds: tuple[str, ...] = ()  # the latest step's layer kinds ("weight", "norm", ...), for the profile
    g2w_measured: np.ndarray | None = None  # (layers, steps) bool: measured at that step (else light grey)
    share_measured: np.ndarray | None = None


def scene(timeline: Timeline, title: str = "") -> Scene | None:
    """What :func:`draw` needs from ``timeline`` (None before its first step)."""
    r = timeline.latest
    if r is None:
        return None
    names, g2w = timeline.matrix("layers")
    bnames, share = timeline.matrix("blocks")
    empty = np.zeros(0)
    return Scene(title, list(timeline.steps), list(timeline.alerts), names, g2w, bool(r.kinds), bnames, share,
                 r.step, r.layers, r.layer("grad_norm"), r.layer("grad_to_weight"), r.blocks,
                 r.block("skip_grad") if r.blocks else empty, r.block("branch_grad") if r.blocks else empty,
                 r.block("skip_share") if r.blocks else empty, r.kinds,
                 timeline.matrix("layers", fill=-1.0)[1] != -1.0, timeline.matrix("blocks", fill=-1.0)[1] != -1.0)


def draw(sc: Scene | HealthCard | None) -> list[Picture]:
    """Every picture ``sc`` can draw (the skip_share map and the block panels only with blocks), or the
    health card."""
    out: list[Picture] = []
    if sc is None:
        return out
    if isinstance(sc, HealthCard):
        return [draw_card(sc)]
    title = sc.title
    if sc.layer_names:
        out.append(heatmap("grad_to_weight", sc.layer_names, sc.steps, sc.g2w, log=True, alerts=sc.alerts,
                           title=f"{title}gradient-to-weight ratio per {'weight ' if sc.weight_only else ''}layer",
                           unit="layer", vmin=G2W_RANGE[0], vmax=G2W_RANGE[1], measured=sc.g2w_measured))
    if sc.block_names:
        out.append(heatmap("skip_share", sc.block_names, sc.steps, sc.share, log=False, alerts=sc.alerts,
                           title=f"{title}skip_share per block (0: skip collapsed, 1: branch off)",
                           unit="block", vmin=0.0, vmax=1.0, measured=sc.share_measured))
    if sc.blocks:
        out.append(depth_distribution(sc.blocks, sc.skip_grad, sc.branch_grad, sc.step, title=title))
    out.append(profile(sc.layers, sc.grad_norm, sc.grad_to_weight, sc.blocks, sc.skip_share, sc.step, title=title,
                       kinds=sc.kinds))
    return out


def render_all(timeline: Timeline, title: str = "") -> list[Picture]:
    """Every picture ``timeline`` can draw, drawn here (the TensorBoard sink draws in a child process)."""
    return draw(scene(timeline, title))


def _figure(width: float, height: float, left: float = 1.6, bottom: float = 0.6, top: float = 0.4,
            right: float = 1.0):  # noqa: ANN202 - a matplotlib Figure, imported lazily
    """Margins in inches, fixed: matplotlib's constrained layout measures every label and took ~40% of the
    drawing time."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height)
    return fig


def _png(fig, name: str) -> Picture:  # noqa: ANN001
    return to_png(fig, name)


def _bars(ax, x: np.ndarray, heights: np.ndarray, *, color: str, width: float, label: str,  # noqa: ANN001
          base: float | None = None) -> None:
    """Bars from the bottom of a log axis, as one collection: ``ax.bar`` adds a patch per bar and updates the
    data limits for each, a quarter of the profile's drawing time at 57 layers. NaN heights draw no bar."""
    from matplotlib.collections import PolyCollection

    ok = np.isfinite(heights) & (heights > 0)
    if not ok.any():
        return
    low, high = float(heights[ok].min()), float(heights[ok].max())
    base = low / 2 if base is None else base  # below the shortest bar, so it still shows (a log axis has no zero)
    left, right = x[ok] - width / 2, x[ok] + width / 2
    top = heights[ok]
    verts = np.stack([np.stack([left, np.full_like(top, base)], 1), np.stack([left, top], 1),
                      np.stack([right, top], 1), np.stack([right, np.full_like(top, base)], 1)], 1)
    # matplotlib's stub types verts as a Sequence of arrays, but set_verts takes one (n, 4, 2) array on a fast
    # path (no per-polygon conversion); a list would work and lose it
    ax.add_collection(PolyCollection(verts, facecolors=color, edgecolors="none", label=label))  # type: ignore[arg-type]
    ax.set_ylim(base, high * 1.5)


def _few_ticks(ax, lo: float | None, hi: float | None) -> None:  # noqa: ANN001
    """No minor ticks on a log axis spanning two decades or more: they carry no label there and were ~20% of a
    map's drawing. Over a narrower range the minor ticks are the labelled ones, so they stay."""
    if lo is not None and hi is not None and lo > 0 and hi / lo >= 100:
        ax.minorticks_off()


def _thin(n: int, room: float | None = None) -> list[int]:
    """Which of ``n`` labels to show: at most :data:`_MAX_TICKS`, and, along ``room`` inches, one per ~1.5
    lines of tick text so they never overlap."""
    most = _MAX_TICKS if room is None else max(2, min(_MAX_TICKS, int(room * 72 / (_TICK_PT * 1.5))))
    stride = max(1, math.ceil(n / most))
    return list(range(0, n, stride))


def heatmap(name: str, names: Sequence[str], steps: Sequence[int], values: np.ndarray, *, log: bool,
            alerts: Sequence[tuple[int, str]] = (), title: str = "", unit: str = "layer",
            vmin: float | None = None, vmax: float | None = None, measured: np.ndarray | None = None) -> Picture:
    """A depth × time map: one row per name (the first at the top), one column per step. ``vmin``/``vmax``:
    the colour range (log: the 1st/99th percentiles when not given); ``measured``: where a value was
    measured (elsewhere light grey); zero or non-finite values are black."""
    from matplotlib.colors import ListedColormap, LogNorm, Normalize

    rows = len(names)
    height = min(max(2.6 + 0.11 * rows, 3.2), 12.0)
    fig = _figure(7.5, height, left=1.7, right=1.2, bottom=0.55, top=0.45)
    ax = fig.add_subplot()
    data = np.array(values, dtype=np.float64)
    norm: Normalize
    if log:
        data[~(data > 0)] = np.nan  # zeros (dead layers) and NaN show as the "bad" colour
        if vmin is None or vmax is None:
            finite = data[np.isfinite(data)]
            lo, hi = (np.percentile(finite, 1), np.percentile(finite, 99)) if finite.size else (1e-6, 1.0)
            vmin, vmax = (lo, hi) if lo < hi else (lo / 10, hi * 10)
        norm = LogNorm(vmin=vmin, vmax=vmax, clip=False)
    else:
        norm = Normalize(vmin=0.0 if vmin is None else vmin, vmax=1.0 if vmax is None else vmax)
    import matplotlib
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="black")
    x0, x1 = (steps[0], steps[-1]) if len(steps) > 1 else (steps[0] - 0.5, steps[0] + 0.5)
    extent = (x0, x1, rows - 0.5, -0.5)
    image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", interpolation="nearest", cmap=cmap, norm=norm,
                      extent=extent)
    if measured is not None and not np.all(measured):
        ax.imshow(np.ma.masked_where(np.asarray(measured), np.ones(data.shape)), aspect="auto",
                  interpolation="nearest", cmap=ListedColormap([_MISSING]), extent=extent)
    axis_in = height - 0.55 - 0.45
    ticks = _thin(rows, axis_in)
    ax.set_yticks(ticks, [_short(names[i]) for i in ticks], fontsize=_TICK_PT)
    ax.tick_params(axis="x", labelsize=_TICK_PT + 1)
    ax.set_ylabel(f"{unit}s, input at the top", fontsize=10)
    ax.set_xlabel("step", fontsize=10)
    for step, severity in alerts:
        ax.axvline(step, color=_SEVERITY_COLOURS.get(severity, "white"), linestyle="--", linewidth=1.2)
    ax.set_title(title, fontsize=11, loc="left")
    cax = fig.add_axes((1 - 0.95 / 7.5, ax.get_position().y0, 0.15 / 7.5, ax.get_position().height))
    bar = fig.colorbar(image, cax=cax, extend="both" if log else "neither")
    bar.set_label(f"{name}{' (log)' if log else ''}; black: 0 or NaN", fontsize=9)
    bar.ax.tick_params(labelsize=_TICK_PT + 1)
    if log:
        _few_ticks(bar.ax, norm.vmin, norm.vmax)
    return _png(fig, name)


def _short(name: str, limit: int = 24) -> str:
    """A long name cut in the middle: its start (the stage) and its end (the layer) are what tell it apart."""
    return name if len(name) <= limit else f"{name[:9]}…{name[-(limit - 10):]}"


def depth_distribution(blocks: Sequence[str], skip_grad: np.ndarray, branch_grad: np.ndarray, step: int,
                       title: str = "") -> Picture:
    """The path-length distribution of the latest step (:mod:`gradwatch.depth`): the share of the gradient
    magnitude carried by paths through k residual branches, k = 0..n, with the mean and the 10–90% range."""
    found = distribution(blocks, skip_grad, branch_grad)
    dist = np.ones(1) if found is None else found
    fig = _figure(7.5, 3.6, left=0.9, right=0.3, bottom=0.7, top=0.7)
    ax = fig.add_subplot()
    ax.bar(np.arange(len(dist)), dist, color="#6baed6", width=0.85)
    stats = figures(found)
    lo, hi, mean = stats["effective_depth_p10"], stats["effective_depth_p90"], stats["effective_depth"]
    ax.axvspan(lo - 0.5, hi + 0.5, color="#fdae6b", alpha=0.25, label=f"10–90%: {lo:.0f}–{hi:.0f} blocks")
    ax.axvline(mean, color="#d94801", linewidth=1.5, label=f"mean {mean:.1f} of {len(dist) - 1} blocks")
    ax.set_xlim(-0.5, len(dist) - 0.5)
    ax.set_xlabel("path length: residual branches the gradient passes through", fontsize=10)
    ax.set_ylabel("share of gradient magnitude", fontsize=10)
    ax.set_title(f"{title}effective depth at step {step}", fontsize=11, loc="left", pad=22)
    ax.legend(fontsize=9, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False)  # above the bars
    return _png(fig, "effective_depth")


def _stages(names: Sequence[str]) -> list[tuple[int, str]]:
    """Where each stage (first dotted part of the names) starts: ``[(index, stage), ...]``."""
    out: list[tuple[int, str]] = []
    for i, n in enumerate(names):
        stage = n.split(".")[0]
        if not out or out[-1][1] != stage:
            out.append((i, stage))
    return out


def profile(layers: Sequence[str], grad_norm: np.ndarray, g2w: np.ndarray, blocks: Sequence[str],
            skip_share: np.ndarray, step: int, title: str = "", kinds: Sequence[str] = ()) -> Picture:
    """The latest step along the depth: gradient norm (bars) and gradient-to-weight ratio (dots) per layer,
    input on the left, stages marked; skip_share per block underneath when there are blocks. With ``kinds``,
    the weight layers (conv, linear) are drawn in colour and the others (norm layers, whose level differs by
    design) in light grey, so the weight layers' profile reads as one line instead of a zigzag."""
    n = len(layers)
    fig = _figure(9, 6.2 if len(blocks) else 4.2, left=0.9, right=0.9, bottom=1.0, top=0.75)
    axes = fig.subplots(2 if len(blocks) else 1, 1, squeeze=False, height_ratios=[2, 1] if len(blocks) else [1],
                        gridspec_kw={"hspace": 0.95})[:, 0]
    ax = axes[0]
    x = np.arange(n)
    weight = np.array([k == "weight" for k in kinds]) if len(kinds) == n and "weight" in kinds else np.ones(n, bool)
    gn = np.where(np.asarray(grad_norm) > 0, grad_norm, np.nan)
    finite = gn[np.isfinite(gn)]
    base = float(finite.min()) / 2 if finite.size else None  # both sets of bars from one bottom, on one scale
    _bars(ax, x, np.where(weight, gn, np.nan), color="#6baed6", width=0.9, label="gradient norm", base=base)
    if not weight.all():
        _bars(ax, x, np.where(weight, np.nan, gn), color="#e0e0e0", width=0.9, label="gradient norm, norm layers",
              base=base)
        if finite.size:
            ax.set_ylim(base, finite.max() * 1.5)
    ax.set_yscale("log")
    _few_ticks(ax, *ax.get_ylim())
    ax.set_ylabel("gradient norm", fontsize=10)
    ax2 = ax.twinx()
    ratio = np.where(np.asarray(g2w) > 0, g2w, np.nan)
    ax2.plot(x[weight], ratio[weight], "o", color="#08306b", markersize=3.5, label="gradient-to-weight")
    if not weight.all():
        ax2.plot(x[~weight], ratio[~weight], ".", color="#bdbdbd", markersize=3, label="…, norm layers")
    ax2.set_yscale("log")
    _few_ticks(ax2, *ax2.get_ylim())
    ax2.set_ylabel("gradient-to-weight ratio", fontsize=10)
    zero = [i for i in range(n) if not np.asarray(grad_norm)[i] > 0]
    for i in zero:  # a dead or non-finite layer must not just be a missing bar
        ax.axvline(i, color="#d62728", alpha=0.4, linewidth=2)
    stages = _stages(layers)
    if 1 < len(stages) <= 16:
        for k, (i, stage) in enumerate(stages):
            ax.axvline(i - 0.5, color="grey", linewidth=0.8)
            end = stages[k + 1][0] if k + 1 < len(stages) else n
            if end - i >= n / 12:  # a label only where it fits: conv1, bn1 before layer1 would overlap
                ax.annotate(stage, (i - 0.5, 0.0), xycoords=("data", "axes fraction"), xytext=(3, 3),
                            textcoords="offset points", fontsize=9, va="bottom", ha="left", color="dimgrey")
    ticks = _thin(n, 9 - 1.8)
    ax.set_xticks(ticks, [_short(layers[i]) for i in ticks], rotation=60, ha="right", fontsize=_TICK_PT)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_title(f"{title}gradient profile at step {step}, input on the left", fontsize=11, loc="left", pad=24)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=4,
              fontsize=8, frameon=False)  # above the plot, never over the bars
    if len(blocks):
        bx = axes[1]
        b = np.arange(len(blocks))
        share = np.asarray(skip_share, dtype=np.float64)
        bx.bar(b, np.nan_to_num(share, nan=0.0), color=np.where(share < 0.02, "#d62728", "#74c476"), width=0.8)
        low = np.flatnonzero(~(share >= 0.02))  # a collapsed skip is no bar at all: mark it
        bx.plot(low, np.full(len(low), 0.04), "x", color="#d62728", markersize=8, label="skip_share < 0.02")
        bx.set_ylim(0, 1)
        bx.set_ylabel("skip_share", fontsize=10)
        bticks = _thin(len(blocks), 9 - 1.8)
        bx.set_xticks(bticks, [_short(blocks[i]) for i in bticks], rotation=60, ha="right", fontsize=_TICK_PT)
        bx.set_xlim(-0.5, len(blocks) - 0.5)
        bx.set_title("skip_share per block (share of the gradient energy through the skip)", fontsize=10,
                     loc="left", pad=16 if len(low) else 6)
        if len(low):
            bx.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return _png(fig, "profile")
