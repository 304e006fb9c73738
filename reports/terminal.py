"""The rich terminal report printed at the end of a pytest run (and its plain-text twin).

It renders a ``ReportData`` and nothing else: curves, diffs and verdicts arrive computed.
All user-provided text (pair ids such as ``toy[1]__x``, model names, summaries) goes
through ``Text`` objects, never through rich markup, which would swallow ``[...]``.
The report closes with one grep-able cache line and one line of stage timings.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import IO, Literal

from rich.color import Color
from rich.columns import Columns
from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.panel import Panel
from rich.style import Style
from rich.table import Table
from rich.text import Text

from reasondiff.records import CacheStats, PairInfo, ReportData, Verdict

from .sparkline import Glyphs, ramp_rgb, shade, sparkline
from .tables import (
    component_label,
    component_order,
    dip_layer,
    finding_columns,
    finding_label,
    fmt,
    fmt_details,
    group_pairs,
    group_verdicts,
    heat_scale,
    orphan_verdicts,
    status_word,
    verdict_cell,
    verdict_map,
)

COLOR_CHOICES = ("auto", "yes", "no")

#: SFT vs RL details that decide the verdict first (``metrics.findings.SftVsRlResult``),
#: the descriptive pooled rank test last; other scalar details follow in fmt_details order.
_SFT_RL_ORDER = (
    "min_ratio",
    "min_ratio_lo",
    "ratio_threshold",
    "sft_median",
    "rl_median",
    "n_sft",
    "n_rl",
    "sft_rbf_mean",
    "rl_rbf_mean",
    "rbf_lower_for_sft",
    "p_value",
    "effect",
)

_STATUS_STYLE = {
    "pass": "green",
    "fail": "bold red",
    "observed": "cyan",
    "n/a": "dim",
    "error": "bold magenta",
}
#: Sparkline columns of the pair table: (curve metric, header).
_SPARK_COLUMNS = (
    ("linear", "linear CKA"),
    ("rbf", "RBF CKA"),
    ("linear_without_dominant", "linear w/o dominant"),
)
_HEAT_STEPS = 9  # colour steps of the heatmap scale
#: Weight columns of the pair table: headline over matrices, biases and norms apart, and
#: the count of tensors that are (near) zero in the base (their diff is 2 for any change).
_WEIGHT_COLUMNS = ("mean diff", "Gini", "bias diff", "norm diff", "zero base")
#: The weight_summary key behind each optional column (None: always shown).
_WEIGHT_KEYS = (None, None, "bias_n", "norm_n", "n_zero_base")


# ---------------------------------------------------------------- console
def color_wanted(color: str, file: IO[str], environ: Mapping[str, str] | None = None) -> bool:
    """Whether to emit ANSI styles, decided the way pytest decides ``--color``.

    ``yes``/``no`` win outright; ``auto`` honours PY_COLORS, then NO_COLOR, then
    FORCE_COLOR, then whether ``file`` is a TTY on a non-dumb terminal.
    """
    if color not in COLOR_CHOICES:
        raise ValueError(f"color must be one of {COLOR_CHOICES}, got {color!r}")
    if color != "auto":
        return color == "yes"
    env = os.environ if environ is None else environ
    if env.get("PY_COLORS") in ("0", "1"):
        return env["PY_COLORS"] == "1"
    if env.get("NO_COLOR"):
        return False
    if env.get("FORCE_COLOR"):
        return True
    try:
        tty = bool(file.isatty())
    except (AttributeError, ValueError):  # closed file at the end of a run
        tty = False
    return tty and env.get("TERM", "") != "dumb"


def make_console(
    file: IO[str],
    *,
    color: str = "auto",
    width: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> Console:
    """A console for the report: no ANSI codes unless colour is wanted, markup off.

    ``width`` should be pytest's terminal width (``terminalreporter._tw.fullwidth``);
    None lets rich detect it (COLUMNS or 80 when not a TTY).
    """
    env = dict(os.environ if environ is None else environ)
    on = color_wanted(color, file, env)
    color_system: Literal["256", "truecolor"] | None = None
    if on:
        truecolor = env.get("COLORTERM", "").lower() in ("truecolor", "24bit")
        color_system = "truecolor" if truecolor else "256"
    # rich reads NO_COLOR / FORCE_COLOR itself; our decision above already covers them.
    env.pop("NO_COLOR", None)
    env.pop("FORCE_COLOR", None)
    return Console(
        file=file,
        force_terminal=on,
        color_system=color_system,
        width=width,
        markup=False,
        highlight=False,
        emoji=False,
        legacy_windows=False,
        force_jupyter=False,
        _environ=env,
    )


# ---------------------------------------------------------------- report
def render_terminal(data: ReportData, *, console: Console) -> None:
    """Print the whole report: per group its tables and heatmaps, then the footer lines.

    Tables that do not fit the console width are printed as indented lists instead,
    so that pair ids never get folded across lines on a narrow terminal.
    """
    glyphs = Glyphs.for_console(ascii_only=console.options.ascii_only)
    colour = console.color_system is not None
    verdicts = verdict_map(data.verdicts)
    groups = group_pairs(data.pairs)
    if not groups:
        console.print(Text("reasondiff: no model pairs were compared"))
    for name, pairs in groups.items():
        plural = "s" if len(pairs) != 1 else ""
        heading = f"reasondiff {glyphs.sep} group {name} {glyphs.sep} {len(pairs)} pair{plural}"
        console.print()
        console.rule(Text(heading, style="bold"))
        _print_fitting(console, *_pair_views(pairs, data, verdicts, glyphs))
        if finding_columns(pairs, data.verdicts):
            _print_fitting(console, *_findings_views(pairs, data, verdicts, glyphs))
        for line in _problem_lines(pairs, data):
            console.print(line)
        for line in _token_lines(pairs, data):
            console.print(line, soft_wrap=True)  # one line per fact: grep-able
        base_level = group_verdicts(name, pairs, data.verdicts)
        if base_level:
            _print_fitting(console, *_group_views(base_level, glyphs))
        heat = _heatmaps(pairs, data, glyphs, colour=colour)
        if heat is not None:
            console.print(heat)
    orphans = orphan_verdicts(data)
    if orphans:
        _print_fitting(console, *_group_views(orphans, glyphs, title="other verdicts"))
    for note in data.notes:
        console.print(Text(f"note: {note}", style="dim"))
    console.print()
    for footer in footer_lines(data):
        # soft_wrap: never break these lines, CI logs are grepped for them
        console.print(Text(footer), soft_wrap=True)


def _print_fitting(console: Console, wide: Table, narrow: RenderableType) -> None:
    """The table if its natural width fits the console, else the list form."""
    unbounded = console.options.update_width(10_000)
    fits = Measurement.get(console, unbounded, wide).maximum <= console.width
    console.print(wide if fits else narrow)


def render_plain_summary(data: ReportData, *, width: int = 120, ascii_only: bool = False) -> str:
    """The terminal report as plain text (no ANSI codes, trailing blanks stripped)."""
    buffer = _TextBuffer("ascii" if ascii_only else "utf-8")
    console = Console(
        file=buffer,
        width=width,
        color_system=None,
        force_terminal=False,
        markup=False,
        highlight=False,
        emoji=False,
        legacy_windows=False,
        force_jupyter=False,
        _environ={},
    )
    render_terminal(data, console=console)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"


class _TextBuffer(io.StringIO):
    """A string buffer that reports an encoding, so rich picks Unicode or ASCII glyphs."""

    def __init__(self, encoding: str) -> None:
        super().__init__()
        self._encoding = encoding

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._encoding


def cache_line(cache: CacheStats) -> str:
    """The one grep-able cache line (its exact form is part of the interface: fields are
    only ever added at the end). On a warm run the metric cache is the one that matters."""
    return (
        f"reasondiff cache: activations {cache.activations_computed} computed, "
        f"{cache.activations_loaded} loaded; weight diffs {cache.weight_diffs_computed} "
        f"computed, {cache.weight_diffs_loaded} loaded; metrics {cache.metrics_computed} "
        f"computed, {cache.metrics_loaded} loaded"
    )


def stages_line(stage_seconds: Mapping[str, float]) -> str | None:
    """``reasondiff stages: load 3.1s, activations 2.0s`` in the order the plugin gave."""
    if not stage_seconds:
        return None
    parts = [f"{name.replace('_', ' ')} {secs:.1f}s" for name, secs in stage_seconds.items()]
    return "reasondiff stages: " + ", ".join(parts)


def footer_lines(data: ReportData) -> list[str]:
    lines = [cache_line(data.cache)]
    stages = stages_line(data.stage_seconds)
    if stages is not None:
        lines.append(stages)
    reason = data.cache.caching_disabled_reason
    if reason:
        lines.append(
            f"reasondiff: caching was off for this run ({reason}); results were computed in memory"
        )
    return lines


# ---------------------------------------------------------------- tables
def _table(title: str) -> Table:
    return Table(title=Text(title), title_justify="left", show_edge=False, pad_edge=False)


def _status_text(verdict: Verdict | None, glyphs: Glyphs) -> Text:
    if verdict is None:
        return Text(glyphs.dash, style="dim")
    return Text(verdict_cell(verdict), style=_STATUS_STYLE.get(verdict.status, ""))


def _pair_cells(
    pair: PairInfo,
    data: ReportData,
    verdicts: Mapping[tuple[str, str], Verdict],
    glyphs: Glyphs,
) -> dict[str, Text]:
    """The cells of one pair row, by column header (shared by the table and list forms)."""
    curves = data.curves.get(pair.pair_id, {})
    summary = data.weight_summary.get(pair.pair_id, {})
    cells = {
        "method": Text(pair.method or glyphs.dash),
        "mean diff": Text(fmt(summary.get("mean_diff"), ".3g", missing=glyphs.dash)),
        "Gini": Text(fmt(summary.get("localization"), ".2f", missing=glyphs.dash)),
        "bias diff": Text(fmt(summary.get("bias_mean_diff"), ".3g", missing=glyphs.dash)),
        "norm diff": Text(fmt(summary.get("norm_mean_diff"), ".3g", missing=glyphs.dash)),
        "zero base": Text(
            fmt(int(summary["n_zero_base"]), missing=glyphs.dash)
            if summary.get("n_zero_base")
            else glyphs.dash,
            style="bold yellow" if summary.get("n_zero_base") else "dim",
        ),
    }
    for metric, header in _SPARK_COLUMNS:
        curve = curves.get(metric)
        cells[header] = (
            Text(sparkline(curve.mean, glyphs=glyphs))
            if curve is not None
            else Text(glyphs.dash, style="dim")
        )
    bathtub = verdicts.get((pair.pair_id, "bathtub"))
    dip = dip_layer(bathtub, curves.get("linear"), pair.num_layers)
    # a bottom without an observed bathtub is only the curve's lowest point: (in brackets)
    is_dip = bathtub is not None and bool(bathtub.observed)
    dip_text = fmt(dip, missing=glyphs.dash)
    if dip is not None and not is_dip:
        dip_text = f"({dip_text})"
    cells["dip@"] = Text(dip_text, style="bold" if is_dip else "dim")
    return cells


def _pair_views(
    pairs: Sequence[PairInfo],
    data: ReportData,
    verdicts: Mapping[tuple[str, str], Verdict],
    glyphs: Glyphs,
) -> tuple[Table, Text]:
    title = (
        "pairs: weight change (mean diff, Gini: over weight matrices), "
        "and CKA per layer (hidden states 0..L, axis 0..1)"
    )
    table = _table(title)
    table.add_column(Text("descendant"))
    table.add_column(Text("method"))
    # a bias / norm / zero-base column only where some pair has a number for it
    weight_columns = [
        h
        for h, key in zip(_WEIGHT_COLUMNS, _WEIGHT_KEYS, strict=True)
        if key is None or any(data.weight_summary.get(p.pair_id, {}).get(key) for p in pairs)
    ]
    for header in weight_columns:
        table.add_column(Text(header), justify="right")
    for _, header in _SPARK_COLUMNS:
        table.add_column(Text(header), no_wrap=True)
    table.add_column(Text("dip@"), justify="right")
    listing = Text(title, style="italic")
    shown = ("method", *weight_columns, *(h for _, h in _SPARK_COLUMNS), "dip@")
    for pair in pairs:
        cells = _pair_cells(pair, data, verdicts, glyphs)
        table.add_row(Text(pair.descendant), *(cells[h] for h in shown))
        listing.append("\n")
        listing.append(pair.descendant, style="bold")
        for key in ("method", *weight_columns, "dip@"):
            listing.append(f"  {key} ")
            listing.append_text(cells[key])
        for _, header in _SPARK_COLUMNS:
            listing.append(f"\n  {header:<20} ")
            listing.append_text(cells[header])
    return table, listing


def _findings_views(
    pairs: Sequence[PairInfo],
    data: ReportData,
    verdicts: Mapping[tuple[str, str], Verdict],
    glyphs: Glyphs,
) -> tuple[Table, Text]:
    columns = finding_columns(pairs, data.verdicts)
    title = "findings: verdict (observed) vs expectation"
    table = _table(title)
    table.add_column(Text("pair (test id)"))
    for finding in columns:
        table.add_column(Text(finding_label(finding)))
    listing = Text(title, style="italic")
    pad = max((len(finding_label(f)) for f in columns), default=0)
    for pair in pairs:
        cells = [_status_text(verdicts.get((pair.pair_id, f)), glyphs) for f in columns]
        table.add_row(Text(pair.pair_id), *cells)
        listing.append("\n")
        listing.append(pair.pair_id, style="bold")
        for finding, cell in zip(columns, cells, strict=True):
            listing.append(f"\n  {finding_label(finding):<{pad}} ")
            listing.append_text(cell)
    return table, listing


def _problem_lines(pairs: Sequence[PairInfo], data: ReportData) -> list[Text]:
    """One line per failed or errored pair verdict: the verdict explains itself."""
    ids = {p.pair_id for p in pairs}
    lines = []
    for v in data.verdicts:
        if v.subject in ids and v.status in ("fail", "error"):
            line = Text("  ")
            line.append(status_word(v), style=_STATUS_STYLE.get(v.status, ""))
            line.append(f" {v.subject} {v.finding}: {v.summary}")
            lines.append(line)
    return lines


def _token_lines(pairs: Sequence[PairInfo], data: ReportData) -> list[Text]:
    """Per pair with recorded dominant datapoints: which tokens they are.

    A pair whose bathtub verdict observed a dip gets the tokens most often dominant in the
    dip layers; any other pair gets them over all layers, in words that claim no dip.
    Then the share of dominant tokens that carry a massive activation, per layer.
    """
    lines: list[Text] = []
    for pair in pairs:
        named = data.tokens.get(pair.pair_id)
        if named is None:
            continue
        if not lines:
            lines.append(
                Text(
                    "dominant tokens (top-k by |PC1 projection|, base and descendant pooled, "
                    "primary trace set):",
                    style="italic",
                )
            )
        texts = [named.dip_line() or named.overall_line(), named.overlap_line()]
        for text in texts:
            if text:
                line = Text("  ")
                line.append(pair.descendant, style="bold")
                line.append(f" {text}")
                lines.append(line)
    return lines


def _group_views(
    verdicts: Sequence[Verdict],
    glyphs: Glyphs,
    *,
    title: str = "SFT vs RL per base (group findings)",
) -> tuple[Table, Text]:
    table = _table(title)
    for header in ("subject", "finding", "verdict", "numbers", "summary"):
        table.add_column(Text(header))
    listing = Text(title, style="italic")
    for v in verdicts:
        order = _SFT_RL_ORDER if v.finding == "sft_more_than_rl" else None
        # an undecided verdict shows its reason (the summary) only, no NaN numbers
        if v.observed is None:
            details = ""
        else:
            details = fmt_details(v.details, order=order) if order else fmt_details(v.details)
        numbers = Text(details or glyphs.dash)
        status = _status_text(v, glyphs)
        table.add_row(Text(v.subject), Text(v.finding), status, numbers, Text(v.summary))
        listing.append(f"\n{v.subject} {v.finding} ")
        listing.append_text(status)
        listing.append(f"\n  {numbers.plain}\n  {v.summary}")
    return table, listing


# ---------------------------------------------------------------- heatmap
def _pair_vmax(comps: Mapping[str, Sequence[float]]) -> float:
    """The top of one pair's robust scale (:func:`~reports.tables.heat_scale`)."""
    return heat_scale(v for row in comps.values() for v in row)


def _pair_title(descendant: str, comps: Mapping[str, Sequence[float]], vmax: float) -> str:
    """Panel title: the scale's top and, when cells lie above it, how many and how high."""
    if vmax <= 0:
        return descendant
    over = [v for row in comps.values() for v in row if math.isfinite(v) and v > vmax]
    if not over:
        return f"{descendant} (max {vmax:.3g})"
    return f"{descendant} (scale 0..{vmax:.3g}; {len(over)} saturated, up to {max(over):.3g})"


def _heatmaps(
    pairs: Sequence[PairInfo], data: ReportData, glyphs: Glyphs, *, colour: bool
) -> RenderableType | None:
    """Per pair a components x decoder-blocks grid, each on its own colour scale.

    One scale for the whole group let one outlier hide every other pair: the toy
    group's planted unit (2.0) turned SFT diffs of 0.2 into the lightest shade. The
    heatmap shows *where* in the model a pair changed, so each pair is scaled 0..its
    own largest value, which its panel title states; the pair table and figure 3
    compare magnitudes across pairs.
    """
    maps = []
    for pair in pairs:
        comps = {c: v for c, v in data.weight_layers.get(pair.pair_id, {}).items() if v}
        if comps:
            maps.append((pair, comps, _pair_vmax(comps)))
    if not maps:
        return None
    n_blocks = max(len(row) for _, comps, _ in maps for row in comps.values())
    cell = 2 if n_blocks <= 16 else 1
    panels = [
        Panel(
            _heat_grid(comps, vmax, glyphs, colour=colour, cell=cell),
            title=Text(_pair_title(pair.descendant, comps, vmax)),
            title_align="left",
            expand=False,
        )
        for pair, comps, vmax in maps
    ]
    legend = Text(
        "normalized weight diff per component (rows) and decoder block (columns, 0-based), "
    )
    if all(vmax <= 0 for _, _, vmax in maps):
        legend.append(f"all zero in this group; {glyphs.missing} = not comparable")
        return Group(Columns(panels, padding=(0, 1)), legend)
    legend.append("each pair on its own robust linear scale: 0 ")
    for i in range(_HEAT_STEPS):
        frac = i / (_HEAT_STEPS - 1)
        legend.append_text(_heat_cell(frac, 1.0, glyphs, colour=colour, cell=1))
    legend.append(
        f" the scale's top (in its title); {glyphs.saturated} = above it (an outlier, e.g. a "
        f"tensor that is zero in the base: diff 2 for any change); "
        f"{glyphs.missing} = not comparable"
    )
    return Group(Columns(panels, padding=(0, 1)), legend)


def _heat_cell(value: float, vmax: float, glyphs: Glyphs, *, colour: bool, cell: int) -> Text:
    if value is None or not math.isfinite(value):
        return Text(glyphs.missing * cell, style="dim")
    if vmax > 0 and value > vmax:  # saturated: marked, never the scale's top colour alone
        return Text(glyphs.saturated * cell, style="bold yellow")
    if not colour:
        return Text(shade(value, vmax, glyphs=glyphs) * cell)
    frac = value / vmax if vmax > 0 else 0.0
    rgb = ramp_rgb(frac)
    return Text(" " * cell, style=Style(bgcolor=Color.from_rgb(*rgb)))


def _heat_grid(
    comps: Mapping[str, Sequence[float]],
    vmax: float,
    glyphs: Glyphs,
    *,
    colour: bool,
    cell: int,
) -> Text:
    names = component_order(comps)
    labels = [component_label(n) for n in names]
    pad = max((len(lab) for lab in labels), default=0)
    n_blocks = max((len(comps[n]) for n in names), default=0)
    axis = "".join(
        (str(block) if block % 5 == 0 else "").ljust(cell)[:cell]
        if cell > 1
        else ("|" if block % 5 == 0 else " ")
        for block in range(n_blocks)
    )
    out = Text(" " * (pad + 1) + axis + "  block", style="dim")
    for name, label in zip(names, labels, strict=True):
        out.append("\n" + label.ljust(pad) + " ")
        for value in comps[name]:
            out.append_text(_heat_cell(value, vmax, glyphs, colour=colour, cell=cell))
    return out
