"""``index.md``: the landing page of a report directory.

It links every figure with its one-line verdict, says which figures were skipped and
why, and tabulates pairs x findings, so a reviewer can read a run on a code host
without running anything. Markdown only; no HTML, no metric computed here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from reasondiff.records import ReportData, Verdict

from .figures import FigureInfo
from .tables import (
    finding_columns,
    finding_label,
    fmt,
    fmt_details,
    group_pairs,
    group_verdicts,
    verdict_cell,
    verdict_map,
)
from .terminal import footer_lines

INDEX_NAME = "index.md"


def md_text(text: str) -> str:
    """Escape text for a Markdown table cell or line (ids like ``toy[1]__x`` stay literal)."""
    out = text.replace("\\", "\\\\")
    for ch in "|[]*_`<>#":
        out = out.replace(ch, "\\" + ch)
    return out.replace("\n", " ")


def md_code(text: str) -> str:
    """An inline code span that survives backticks inside ``text``."""
    fence = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text.replace('|', '¦')}{pad}{fence}"


def render_index(data: ReportData, out_dir: Path, figures: Sequence[FigureInfo]) -> str:
    """The Markdown text of ``index.md`` (figure links relative to ``out_dir``)."""
    groups = group_pairs(data.pairs)
    verdicts = verdict_map(data.verdicts)
    lines = [
        "# reasondiff report",
        "",
        f"{len({p.pair_id for p in data.pairs})} pairs in {len(groups)} group(s).",
        "",
    ]
    lines += [f"    {line}" for line in footer_lines(data)]
    lines += ["", "## Figures", ""]
    for info in figures:
        lines.append(f"### Figure {info.number}: {md_text(info.title)}")
        lines.append("")
        if info.path is None:
            lines.append(f"*Skipped:* {md_text(info.skipped or 'no data')}.")
        else:
            rel = Path(os.path.relpath(info.path, out_dir)).as_posix()
            lines.append(
                f"![Figure {info.number}: {md_text(info.title)}]({rel.replace(' ', '%20')})"
            )
            lines.append("")
            lines.append(f"{info.panels} panel(s), {info.lines} line(s).")
        lines += ["", f"**Verdicts:** {md_text(info.verdict)}", ""]
    for name, pairs in groups.items():
        columns = finding_columns(pairs, data.verdicts)
        lines += [f"## Group {md_text(name)}: pairs x findings", ""]
        lines += [
            "`mean diff` and `Gini` are over the weight matrices (2-D attention and MLP, as "
            "the study's Figure 3); biases and norms have their own columns; `zero base` "
            "counts tensors that are (near) zero in the base (normalized diff 2 whatever "
            "the change).",
            "",
        ]
        header = ["pair", "descendant", "method", "mean diff", "Gini", "bias diff", "norm diff"]
        header += ["zero base"]
        header += [finding_label(f) for f in columns]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for pair in pairs:
            summary = data.weight_summary.get(pair.pair_id, {})
            cells = [
                md_code(pair.pair_id),
                md_text(pair.descendant),
                md_text(pair.method or "-"),
                fmt(summary.get("mean_diff"), ".3g", missing="-"),
                fmt(summary.get("localization"), ".2f", missing="-"),
                fmt(summary.get("bias_mean_diff"), ".3g", missing="-"),
                fmt(summary.get("norm_mean_diff"), ".3g", missing="-"),
                str(int(summary["n_zero_base"])) if summary.get("n_zero_base") else "-",
            ]
            for finding in columns:
                v = verdicts.get((pair.pair_id, finding))
                cell = "-" if v is None else verdict_cell(v)
                cells.append(f"**{cell}**" if v is not None and v.status == "fail" else cell)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        base_level = group_verdicts(name, pairs, data.verdicts)
        if base_level:
            lines += [
                "| subject | finding | verdict | numbers | summary |",
                "|---|---|---|---|---|",
            ]
            for v in base_level:
                lines.append(
                    f"| {md_code(v.subject)} | {md_text(v.finding)} | {verdict_cell(v)} "
                    f"| {md_text(_numbers(v)) or '-'} | {md_text(v.summary)} |"
                )
            lines.append("")
        problems = [
            v
            for v in data.verdicts
            if v.subject in {p.pair_id for p in pairs} and v.status in ("fail", "error")
        ]
        for v in problems:
            lines.append(
                f"- **{v.status.upper()}** {md_code(v.subject)} {md_text(v.finding)}: {md_text(v.summary)}"
            )
        if problems:
            lines.append("")
        named = [(p, data.tokens[p.pair_id]) for p in pairs if p.pair_id in data.tokens]
        for pair, tokens in named:
            for text in (tokens.dip_line() or tokens.overall_line(), tokens.overlap_line()):
                if text:
                    lines.append(f"- {md_code(pair.pair_id)} {md_text(text)}")
        if named:
            lines.append("")
    if data.notes:
        lines += ["## Notes", ""] + [f"- {md_text(n)}" for n in data.notes] + [""]
    return "\n".join(lines).rstrip() + "\n"


def _numbers(v: Verdict) -> str:
    """A verdict's numbers; an undecided one shows its reason (the summary) only."""
    return "" if v.observed is None else fmt_details(v.details)


def write_index(data: ReportData, out_dir: Path, figures: Sequence[FigureInfo]) -> Path:
    """Write ``out_dir/index.md`` and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / INDEX_NAME
    path.write_text(render_index(data, out_dir, figures), encoding="utf-8")
    return path
