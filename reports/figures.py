"""PNG figures of a run, one per study figure, drawn from a ``ReportData`` alone.

Each ``build_figure_N`` returns a ``matplotlib.figure.Figure`` (or None when the data
for it is absent) so tests can inspect axes and lines instead of pixels;
``write_figures`` saves them with the Agg canvas. No pyplot: pyplot keeps global state
that leaks between tests and pytest-xdist workers, and needs a GUI backend decision.
Curves arrive computed (mean and interval over traces); nothing here computes a metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from reasondiff.records import Curve, PairInfo, ReportData, Verdict

from .tables import (
    component_label,
    component_order,
    final_layer,
    group_pairs,
    heat_scale,
    status_counts,
    unique_pairs,
    verdict_map,
)

DPI = 110
RGBA = tuple[float, float, float, float]
_PANEL_W, _PANEL_H = 5.0, 3.3
_METHOD_STYLE = {"SFT": "-", "RL": "--", "SFT+RL": "-."}
_SET_STYLE = ("-", "--", ":", "-.")
_METRIC_TITLE = {"linear": "linear CKA", "rbf": "RBF CKA"}
_LEGEND_ROW_IN = 0.2  # height of one legend entry at fontsize 8, in inches
#: CKA axes count hidden states, weight axes count decoder blocks (block b writes
#: hidden state b + 1): the two never share a label.
_X_LABEL = "layer (hidden state: 0 = embeddings, L = after final norm)"
_BLOCK_LABEL = "block (0-based decoder block)"


@dataclass(frozen=True)
class FigureInfo:
    """What ``write_figures`` made (or skipped) for one figure; ``index.md`` lists these."""

    number: int
    name: str  # file stem, e.g. "fig1_cka"
    title: str
    path: Path | None  # None: skipped
    panels: int
    lines: int
    verdict: str  # one line: what the related findings say
    skipped: str | None = None  # why there is no figure


@dataclass(frozen=True)
class _Spec:
    number: int
    name: str
    title: str
    findings: tuple[str, ...]
    build: Callable[[ReportData], Figure | None]
    missing: str  # why the figure is skipped when build returns None


# ---------------------------------------------------------------- helpers
def _colours(n: int) -> list[RGBA]:
    """Distinct qualitative colours (tab10, tab20 beyond ten series)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


def _pair_colours(pairs: Sequence[PairInfo]) -> dict[str, RGBA]:
    """One colour per pair id, stable across the panels and figures of one report."""
    ids = [p.pair_id for p in unique_pairs(pairs)]
    return dict(zip(ids, _colours(len(ids)), strict=False))


def _new_figure(
    rows: int, cols: int, *, extra_w: float = 2.6, panel: tuple[float, float] = (_PANEL_W, _PANEL_H)
) -> tuple[Figure, list[list[Axes]]]:
    """A constrained-layout grid on an Agg canvas; ``extra_w`` leaves room for the legend."""
    width, height = panel
    fig = Figure(figsize=(width * cols + extra_w, height * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, cols, squeeze=False)
    return fig, [list(row) for row in grid]


def _panels(
    count: int, max_cols: int, *, extra_w: float, panel: tuple[float, float]
) -> tuple[Figure, list[Axes], int]:
    """A grid of at least ``count`` panels, ``max_cols`` wide at most: (figure, the axes
    flattened row-major, the number of columns)."""
    cols = min(max_cols, count)
    fig, axes = _new_figure(math.ceil(count / cols), cols, extra_w=extra_w, panel=panel)
    return fig, [ax for row in axes for ax in row], cols


def _curve(data: ReportData, pair: PairInfo, metric: str) -> Curve | None:
    curve = data.curves.get(pair.pair_id, {}).get(metric)
    return curve if curve is not None and curve.layers else None


def _plot_curve(
    ax: Axes,
    curve: Curve,
    *,
    colour: RGBA,
    label: str,
    style: str = "-",
    band: bool = True,
) -> None:
    """The mean line with its interval over traces as a translucent band."""
    ax.plot(curve.layers, curve.mean, style, color=colour, label=label, marker="o", ms=2.5, lw=1.4)
    if band and len(curve.lo) == len(curve.layers) == len(curve.hi):
        ax.fill_between(curve.layers, curve.lo, curve.hi, color=colour, alpha=0.15, lw=0)


def _style_cka_axis(ax: Axes, title: str, curves: Sequence[Curve]) -> None:
    lows = [v for c in curves for v in (*c.lo, *c.mean) if math.isfinite(v)]
    ax.set_ylim(min(0.0, *lows) - 0.05 if lows else -0.05, 1.05)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(_X_LABEL, fontsize=8)
    ax.set_ylabel("CKA (mean over traces)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    layers = sorted({layer for c in curves for layer in c.layers})
    if layers and len(layers) <= 16:
        ax.set_xticks(layers)


def _legend(fig: Figure, handles: list[Line2D], *, title: str | None = None) -> None:
    """A legend right of the panels; long ones get more columns and a wider figure
    rather than running off the bottom of the image."""
    if not handles:
        return
    fits = max(1, int((fig.get_figheight() - 0.7) / _LEGEND_ROW_IN))
    ncols = math.ceil(len(handles) / fits)
    if ncols > 1:
        fig.set_figwidth(fig.get_figwidth() + (ncols - 1) * 2.4)
    fig.legend(
        handles=handles,
        loc="outside right upper",
        fontsize=8,
        title=title,
        title_fontsize=8,
        frameon=False,
        ncols=ncols,
    )


def _pair_handles(pairs: Sequence[PairInfo], colours: Mapping[str, RGBA]) -> list[Line2D]:
    return [
        Line2D(
            [], [], color=colours[p.pair_id], lw=1.6, label=f"{p.descendant} ({p.method or '?'})"
        )
        for p in unique_pairs(pairs)
    ]


def _groups_with(data: ReportData, metrics: Sequence[str]) -> dict[str, list[PairInfo]]:
    """Groups that have at least one pair with any of ``metrics``, pairs filtered likewise."""
    out = {}
    for name, pairs in group_pairs(data.pairs).items():
        kept = [p for p in pairs if any(_curve(data, p, m) for m in metrics)]
        if kept:
            out[name] = kept
    return out


def _kernel_grid(
    data: ReportData,
) -> (
    tuple[
        Figure,
        dict[str, list[PairInfo]],
        dict[str, RGBA],
        list[tuple[Axes, str, str, list[PairInfo]]],
    ]
    | None
):
    """One panel per (group, kernel) for the linear / RBF figures (1 and 4), or None."""
    metrics = [m for m in ("linear", "rbf") if any(_curve(data, p, m) for p in data.pairs)]
    groups = _groups_with(data, metrics)
    if not groups:
        return None
    fig, axes = _new_figure(len(groups), len(metrics))
    panels = [
        (ax, group, metric, pairs)
        for row, (group, pairs) in zip(axes, groups.items(), strict=True)
        for ax, metric in zip(row, metrics, strict=True)
    ]
    return fig, groups, _pair_colours(data.pairs), panels


# ---------------------------------------------------------------- figures
def build_figure_1(data: ReportData) -> Figure | None:
    """Study Fig. 1: mean linear and RBF CKA per layer, one line per descendant, with the
    interval over traces; one panel per metric and group."""
    grid = _kernel_grid(data)
    if grid is None:
        return None
    fig, groups, colours, panels = grid
    for ax, group, metric, pairs in panels:
        drawn = []
        for pair in pairs:
            curve = _curve(data, pair, metric)
            if curve is not None:
                _plot_curve(ax, curve, colour=colours[pair.pair_id], label=pair.descendant)
                drawn.append(curve)
        _style_cka_axis(ax, f"{group}: {_METRIC_TITLE[metric]}", drawn)
    fig.suptitle("CKA between base and descendant per layer (band: interval over traces)")
    _legend(
        fig, _pair_handles([p for ps in groups.values() for p in ps], colours), title="descendant"
    )
    return fig


def build_figure_2(data: ReportData) -> Figure | None:
    """Study Fig. 2: linear CKA with (solid) and without (dashed) the dominant datapoints."""
    metrics = ("linear", "linear_without_dominant")
    groups = _groups_with(data, metrics)
    if not groups:
        return None
    colours = _pair_colours(data.pairs)
    fig, axes = _new_figure(len(groups), 1, panel=(7.0, _PANEL_H))
    for (ax,), (group, pairs) in zip(axes, groups.items(), strict=True):
        drawn = []
        for pair in pairs:
            for metric, style in zip(metrics, ("-", "--"), strict=True):
                curve = _curve(data, pair, metric)
                if curve is not None:
                    _plot_curve(
                        ax, curve, colour=colours[pair.pair_id], label=pair.descendant, style=style
                    )
                    drawn.append(curve)
        _style_cka_axis(ax, f"{group}: linear CKA, all tokens vs dominant tokens removed", drawn)
    fig.suptitle("Is the dip carried by a few dominant tokens?")
    handles = _pair_handles([p for ps in groups.values() for p in ps], colours)
    handles += [
        Line2D([], [], color="0.3", ls="-", label="all tokens"),
        Line2D([], [], color="0.3", ls="--", label="dominant tokens removed"),
    ]
    _legend(fig, handles, title="descendant / curve")
    return fig


def build_figure_3(data: ReportData) -> Figure | None:
    """Study Fig. 3: normalized weight diff per decoder block, one panel per component, line
    style by method (SFT solid, RL dashed, SFT+RL dash-dot). Lines are coloured by base;
    with a single base, colour by descendant instead (one colour would hide who is who)."""
    pairs = [
        p for p in unique_pairs(data.pairs) if any(data.weight_layers.get(p.pair_id, {}).values())
    ]
    components = component_order(
        c for p in pairs for c, values in data.weight_layers[p.pair_id].items() if values
    )
    if not components:
        return None
    fig, flat, cols = _panels(len(components), 4, extra_w=2.4, panel=(3.8, 2.6))
    bases = list(dict.fromkeys(p.base for p in pairs))
    by_base = len(bases) > 1
    if by_base:
        base_colour = dict(zip(bases, _colours(len(bases)), strict=False))
        colour_of = {p.pair_id: base_colour[p.base] for p in pairs}
    else:
        colour_of = _pair_colours(pairs)
    for ax, component in zip(flat, components, strict=False):
        panel: list[tuple[str, list[float]]] = []
        for pair in pairs:
            values = data.weight_layers[pair.pair_id].get(component)
            if values:
                style = _METHOD_STYLE.get(pair.method or "", ":")
                ax.plot(range(len(values)), values, style, color=colour_of[pair.pair_id], lw=1.2)
                panel.append((pair.pair_id, list(values)))
        title = component_label(component)
        clipped = _clip_panel(ax, panel, colour_of)
        if clipped:
            title += f" ({clipped})"
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in flat[len(components) :]:
        fig.delaxes(ax)
    for i, ax in enumerate(flat[: len(components)]):
        if i + cols >= len(components):  # nothing below it: label the x axis
            ax.set_xlabel(_BLOCK_LABEL, fontsize=8)
        if i % cols == 0:
            ax.set_ylabel("normalized diff", fontsize=8)
    fig.suptitle(
        "Normalized weight difference per decoder block: ||W_new - W_base|| / mean of the two norms"
    )
    if by_base:
        handles = [Line2D([], [], color=base_colour[b], lw=1.6, label=f"base {b}") for b in bases]
    else:
        handles = _pair_handles(pairs, colour_of)
    methods = list(dict.fromkeys(p.method or "unknown" for p in pairs))
    handles += [Line2D([], [], color="0.3", ls=_METHOD_STYLE.get(m, ":"), label=m) for m in methods]
    title = "colour: base / style: method" if by_base else f"base {bases[0]}: descendant / method"
    _legend(fig, handles, title=title)
    return fig


def _clip_panel(
    ax: Axes, panel: Sequence[tuple[str, Sequence[float]]], colour_of: Mapping[str, RGBA]
) -> str:
    """A robust y scale for one weight panel (``tables.heat_scale``): points above it (a
    zero-base tensor at 2, a planted outlier) are drawn as triangles on the top edge, so
    they do not flatten every other line. Returns the title note, or "" if none is above."""
    values = [v for _, vals in panel for v in vals if math.isfinite(v)]
    top = heat_scale(values)
    over = [v for v in values if v > top]
    if top <= 0 or not over:
        return ""
    ceiling = top * 1.15
    ax.set_ylim(min(0.0, min(values)), ceiling)
    for pid, vals in panel:
        xs = [i for i, v in enumerate(vals) if math.isfinite(v) and v > top]
        if xs:
            ax.scatter(xs, [ceiling * 0.97] * len(xs), marker="^", color=colour_of[pid], s=28)
    return f"{len(over)} saturated, up to {max(over):.3g}"


def build_figure_4(data: ReportData) -> Figure | None:
    """Study Fig. 4: the final layer, before and after the final norm: post-norm curves
    over layers 0..L with the pre-norm value at L marked by a hollow diamond."""
    grid = _kernel_grid(data)
    if grid is None:
        return None
    fig, groups, colours, panels = grid
    for ax, group, metric, pairs in panels:
        drawn = []
        for pair in pairs:
            curve = _curve(data, pair, metric)
            if curve is None:
                continue
            colour = colours[pair.pair_id]
            _plot_curve(ax, curve, colour=colour, label=pair.descendant, band=False)
            drawn.append(curve)
            pre = _curve(data, pair, f"{metric}_prenorm")
            if pre is not None:
                last = final_layer(curve, pair.num_layers)
                ax.plot([last] * len(pre.mean), pre.mean, "D", mfc="none", color=colour, ms=7)
                ax.vlines([last] * len(pre.mean), pre.lo, pre.hi, color=colour, lw=1, alpha=0.6)
                drawn.append(pre)
        if drawn:
            last = max(final_layer(c, 0) for c in drawn)
            ax.axvspan(last - 0.5, last + 0.5, color="0.85", alpha=0.5, lw=0)
        _style_cka_axis(ax, f"{group}: {_METRIC_TITLE[metric]} (final layer shaded)", drawn)
    fig.suptitle("Final layer: after the final norm (line) vs before it (hollow diamond)")
    handles = _pair_handles([p for ps in groups.values() for p in ps], colours)
    handles += [
        Line2D([], [], color="0.3", marker="o", ms=3, label="after final norm"),
        Line2D([], [], color="0.3", marker="D", mfc="none", ls="none", label="before final norm"),
    ]
    _legend(fig, handles, title="descendant / point")
    return fig


def trace_sets(data: ReportData, kernel: str = "linear") -> list[str]:
    """Trace-set names that have ``<kernel>@<set>`` curves, in order of appearance."""
    prefix = f"{kernel}@"
    names = [
        m.removeprefix(prefix) for c in data.curves.values() for m in c if m.startswith(prefix)
    ]
    return list(dict.fromkeys(names))


def build_figure_5(data: ReportData) -> Figure | None:
    """Study Fig. 5: trace invariance, linear CKA from each trace set (line style per set,
    colour per descendant). None unless the curves hold at least two sets."""
    sets = trace_sets(data)
    if len(sets) < 2:
        return None
    metrics = [f"linear@{s}" for s in sets]
    groups = _groups_with(data, metrics)
    colours = _pair_colours(data.pairs)
    fig, axes = _new_figure(len(groups), 1, panel=(7.0, _PANEL_H))
    for (ax,), (group, pairs) in zip(axes, groups.items(), strict=True):
        drawn = []
        for pair in pairs:
            for metric, style in zip(metrics, _SET_STYLE * len(metrics), strict=False):
                curve = _curve(data, pair, metric)
                if curve is not None:
                    _plot_curve(
                        ax,
                        curve,
                        colour=colours[pair.pair_id],
                        label=pair.descendant,
                        style=style,
                        band=False,
                    )
                    drawn.append(curve)
        _style_cka_axis(ax, f"{group}: linear CKA per trace set", drawn)
    fig.suptitle("Trace invariance: do the curves depend on which traces were used?")
    handles = _pair_handles([p for ps in groups.values() for p in ps], colours)
    handles += [
        Line2D([], [], color="0.3", ls=style, label=f"trace set {name}")
        for name, style in zip(sets, _SET_STYLE * len(sets), strict=False)
    ]
    _legend(fig, handles, title="descendant / trace set")
    return fig


def _tick_label(quoted: str, width: int = 18) -> str:
    """A token label matplotlib draws as is: ``$`` escaped (no mathtext), characters past
    the default font's reach as ``\\u`` escapes (a missing glyph warns), long ones cut."""
    label = quoted.replace("$", r"\$")
    if any(ord(c) > 0x24FF for c in label):
        label = label.encode("ascii", "backslashreplace").decode("ascii")
    return label if len(label) <= width else label[: width - 1] + "…"


def build_figure_6(data: ReportData) -> Figure | None:
    """Which tokens the dominant datapoints are, per layer: one heatmap per pair, tokens
    (the most often dominant) x layers, each cell the share of traces in which the token
    is dominant there (base and descendant pooled). An observed bathtub dip is outlined."""
    pairs = [p for p in unique_pairs(data.pairs) if data.tokens.get(p.pair_id) is not None]
    pairs = [p for p in pairs if data.tokens[p.pair_id].heat_tokens]
    if not pairs:
        return None
    fig, flat, _ = _panels(len(pairs), 3, extra_w=1.2, panel=(4.6, 3.0))
    image = None
    for ax, pair in zip(flat, pairs, strict=False):
        named = data.tokens[pair.pair_id]
        image = ax.imshow(
            named.heat_shares, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
            interpolation="nearest",
        )  # fmt: skip
        ax.set_yticks(range(len(named.heat_tokens)))
        ax.set_yticklabels([_tick_label(t) for t in named.heat_tokens], fontsize=7)
        step = 1 if len(named.heat_layers) <= 16 else math.ceil(len(named.heat_layers) / 16)
        ticks = list(range(0, len(named.heat_layers), step))
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(named.heat_layers[i]) for i in ticks], fontsize=7)
        ax.set_xlabel(_X_LABEL, fontsize=7)
        title = pair.descendant
        dip = [named.heat_layers.index(lay) for lay in named.dip if lay in named.heat_layers]
        if dip:
            for x in (min(dip) - 0.5, max(dip) + 0.5):
                ax.axvline(x, color="red", lw=1.2, ls="--")
            title += f" (dip: layers {min(named.dip)}-{max(named.dip)})"
        else:
            title += " (no dip)"
        ax.set_title(f"{title}, {named.total_traces} traces", fontsize=9)
    for ax in flat[len(pairs) :]:
        fig.delaxes(ax)
    if image is not None:
        fig.colorbar(image, ax=flat[: len(pairs)], shrink=0.8, label="share of traces")
    fig.suptitle(
        "Dominant tokens per layer: share of traces in which each token is among the "
        "top-k by |PC1 projection|"
    )
    return fig


FIGURES = (
    _Spec(1, "fig1_cka", "CKA per layer (linear and RBF)", ("bathtub", "sft_more_than_rl"), build_figure_1,
          "no linear or RBF CKA curves in this run"),
    _Spec(2, "fig2_dominant", "Linear CKA with and without dominant datapoints", ("bathtub_explained",),
          build_figure_2, "no linear CKA curves in this run"),
    _Spec(3, "fig3_weights", "Normalized weight difference per decoder block and component",
          ("weight_distributed", "sft_more_than_rl"), build_figure_3, "no weight differences in this run"),
    _Spec(4, "fig4_final_layer", "Final layer before and after the final norm", ("final_layer_lowest",),
          build_figure_4, "no linear or RBF CKA curves in this run"),
    _Spec(5, "fig5_trace_invariance", "Trace invariance (two trace sets)", ("trace_invariant",),
          build_figure_5, "curves for fewer than two trace sets (metrics linear@<set>); run with a second trace set"),
    _Spec(6, "fig6_dominant_tokens", "Dominant tokens per layer (tokens x layers)",
          ("bathtub", "bathtub_explained"), build_figure_6,
          "no dominant tokens recorded (a bundle written before dominant.csv, or no CKA rows)"),
)  # fmt: skip


# ---------------------------------------------------------------- output
def verdict_line(verdicts: Sequence[Verdict], findings: Sequence[str]) -> str:
    """One line per figure: per finding, the status counts and who shows the finding."""
    latest = verdict_map(verdicts).values()  # a rerun's verdict replaces the earlier one
    parts = []
    for finding in findings:
        these = [v for v in latest if v.finding == finding]
        if not these:
            continue
        counts = status_counts(these)
        holds = [v.subject for v in these if v.observed]
        shown = ", ".join(holds[:3]) + (f" +{len(holds) - 3} more" if len(holds) > 3 else "")
        tally = ", ".join(
            f"{n} {'FAIL' if status == 'fail' else status}"
            for status, n in counts.items()
            if n or status in ("pass", "fail")
        )
        parts.append(
            f"{finding}: holds for {len(holds)}/{len(these)}"
            + (f" ({shown})" if holds else "")
            + f"; {tally}"
        )
    return " | ".join(parts) if parts else "no verdicts recorded for this figure's findings"


def write_figures(data: ReportData, out_dir: Path, *, dpi: int = DPI) -> list[FigureInfo]:
    """Build and save every figure as ``out_dir/<name>.png``; skipped ones say why."""
    out_dir.mkdir(parents=True, exist_ok=True)
    infos = []
    for spec in FIGURES:
        verdict = verdict_line(data.verdicts, spec.findings)
        fig = spec.build(data)
        if fig is None:
            infos.append(
                FigureInfo(spec.number, spec.name, spec.title, None, 0, 0, verdict, spec.missing)
            )
            continue
        path = out_dir / f"{spec.name}.png"
        fig.savefig(path, dpi=dpi)
        lines = sum(len(ax.get_lines()) for ax in fig.axes)
        infos.append(
            FigureInfo(spec.number, spec.name, spec.title, path, len(fig.axes), lines, verdict)
        )
    return infos
