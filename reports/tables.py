"""Lookups shared by every report format: which pairs form a group, which verdict belongs
to which cell, how a component or number is labelled.

Why: the terminal report, the figures and ``index.md`` must agree on grouping, ordering
and wording, so those decisions live here once. Nothing here computes a metric; the
only arithmetic is picking the lowest point of a given curve for a label.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from reasondiff.records import ZERO_BASE_DIFF, Curve, PairInfo, ReportData, Verdict
from reasondiff.registry import FINDINGS

ADHOC_GROUP = "ad-hoc"
BASE_PREFIX = "base:"

#: Short column headers for the per-pair findings (registry order).
FINDING_LABELS = {
    "bathtub": "bathtub",
    "bathtub_explained": "explained by dominant",
    "final_layer_lowest": "final layer lowest",
    "weight_distributed": "weights distributed",
    "trace_invariant": "trace-invariant",
}

#: Keys a bathtub verdict may use for the layer where the dip bottoms (first match wins).
BOTTOM_KEYS = ("bottom", "bottom_layer", "min_layer", "dip_layer", "argmin")

#: Group-level details shown first, in this order (``metrics.findings.SftVsRlResult``
#: field names, plus common spellings); any other scalar detail follows.
GROUP_DETAIL_ORDER = (
    "u",
    "U",
    "p_value",
    "p",
    "effect",
    "effect_size",
    "sft_median",
    "rl_median",
    "mean_sft",
    "mean_rl",
    "sft_rbf_mean",
    "rl_rbf_mean",
    "rbf_lower_for_sft",
    "n_sft",
    "n_rl",
)
#: Details never printed as numbers: shown elsewhere (summary, verdict) or routing only.
_HIDDEN_DETAILS = frozenset({"group", "summary", "holds", "present"})

_COMPONENT_ORDER = (
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "self_attn.o_proj.bias",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)


def group_pairs(pairs: Iterable[PairInfo]) -> dict[str, list[PairInfo]]:
    """Pairs by group name in order of first appearance; ``group=None`` is "ad-hoc"."""
    out: dict[str, list[PairInfo]] = {}
    for pair in pairs:
        out.setdefault(pair.group or ADHOC_GROUP, []).append(pair)
    return out


def unique_pairs(pairs: Iterable[PairInfo]) -> list[PairInfo]:
    """Pairs with duplicate ids dropped (one pair may sit in several groups)."""
    seen: set[str] = set()
    out = []
    for pair in pairs:
        if pair.pair_id not in seen:
            seen.add(pair.pair_id)
            out.append(pair)
    return out


def verdict_map(verdicts: Iterable[Verdict]) -> dict[tuple[str, str], Verdict]:
    """(subject, finding) -> verdict; a later verdict for the same cell wins (a rerun)."""
    return {(v.subject, v.finding): v for v in verdicts}


def finding_columns(pairs: Sequence[PairInfo], verdicts: Iterable[Verdict]) -> list[str]:
    """Findings that have a verdict or an expectation for any of ``pairs``.

    Registry findings come first in registry order, unknown ones after in order of
    appearance, so a new finding test shows up without touching the report.
    """
    ids = {p.pair_id for p in pairs}
    present: list[str] = []
    for pair in pairs:
        present.extend(pair.expect)
    present.extend(v.finding for v in verdicts if v.subject in ids)
    known = [f for f in FINDINGS if f in present]
    extra = list(dict.fromkeys(f for f in present if f not in FINDINGS))
    return known + extra


def finding_label(finding: str) -> str:
    return FINDING_LABELS.get(finding, finding.replace("_", " "))


def group_verdicts(
    group: str, pairs: Sequence[PairInfo], verdicts: Iterable[Verdict]
) -> list[Verdict]:
    """Base-level verdicts (subject ``base:<key>``) that belong to this group.

    A verdict that names its group in ``details["group"]`` goes there; otherwise it goes
    to every group that has a pair with that base.
    """
    bases = {p.base for p in pairs}
    out = []
    for v in verdicts:
        if not v.subject.startswith(BASE_PREFIX):
            continue
        named = v.details.get("group")
        if named is not None:
            if named == group:
                out.append(v)
        elif v.subject.removeprefix(BASE_PREFIX) in bases:
            out.append(v)
    return out


def orphan_verdicts(data: ReportData) -> list[Verdict]:
    """Verdicts no table shows: unknown subject, or a base no group claims."""
    ids = {p.pair_id for p in data.pairs}
    claimed: set[int] = set()
    for name, pairs in group_pairs(data.pairs).items():
        claimed.update(id(v) for v in group_verdicts(name, pairs, data.verdicts))
    return [v for v in data.verdicts if v.subject not in ids and id(v) not in claimed]


#: Every ``Verdict.status`` in display order (records.py owns the definitions).
STATUSES = ("pass", "fail", "observed", "n/a", "error")


def status_word(verdict: Verdict) -> str:
    """pass / FAIL / observed / n/a / error: FAIL in capitals so it stands out in logs."""
    return "FAIL" if verdict.status == "fail" else verdict.status


def yes_no(value: bool | None) -> str:
    return "?" if value is None else ("yes" if value else "no")


def verdict_cell(verdict: Verdict) -> str:
    """Short cell text: the status with what was observed (and wanted, when it failed)."""
    status: str = verdict.status
    if status == "pass":
        return f"pass ({yes_no(verdict.observed)})"
    if status == "fail":
        return f"FAIL ({yes_no(verdict.observed)}, want {yes_no(verdict.expected)})"
    if status == "observed":
        return f"observed ({yes_no(verdict.observed)})"
    if status == "error":
        return f"error (want {yes_no(verdict.expected)})"
    return status  # n/a: undecidable and nothing expected


def component_order(names: Iterable[str]) -> list[str]:
    """Known Qwen2/Llama block components in architectural order, others alphabetically."""
    names = list(dict.fromkeys(names))
    rank = {name: i for i, name in enumerate(_COMPONENT_ORDER)}
    known = sorted((n for n in names if n in rank), key=rank.__getitem__)
    return known + sorted(n for n in names if n not in rank)


def component_label(name: str) -> str:
    """``self_attn.q_proj.weight`` -> ``q_proj``; ``...bias`` -> ``q_proj.bias``."""
    label = re.sub(r"^(self_attn|mlp|attention|feed_forward)\.", "", name)
    label = label.removesuffix(".weight")
    return label.replace("post_attention_layernorm", "post_attn_norm").replace(
        "input_layernorm", "input_norm"
    )


def fmt(value: Any, spec: str = ".3g", *, missing: str = "—") -> str:
    """Format a number for a cell; None / NaN print as ``missing``, ints stay ints."""
    if value is None:
        return missing
    if isinstance(value, bool):
        return yes_no(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return missing if math.isnan(value) else format(value, spec)
    return str(value)


def fmt_details(details: dict[str, Any], *, order: Sequence[str] = GROUP_DETAIL_ORDER) -> str:
    """``key=value`` pairs of the scalar details, preferred keys first."""
    keys = [k for k in order if k in details] + [k for k in details if k not in order]
    parts = []
    for key in keys:
        value = details[key]
        if key in _HIDDEN_DETAILS:
            continue
        if isinstance(value, (int, float, str, bool)) or value is None:
            parts.append(f"{key}={fmt(value, missing='nan')}")
    return ", ".join(parts)


def final_layer(curve: Curve, num_layers: int) -> int:
    """The post-norm final layer L: the pair's layer count, else the curve's last layer."""
    return num_layers if num_layers > 0 else max(curve.layers, default=0)


def dip_layer(bathtub: Verdict | None, curve: Curve | None, num_layers: int) -> int | None:
    """Where the linear dip bottoms: the bathtub verdict's own number if it gives one.

    Otherwise the lowest point of the given curve over layers 1..L-1 (the bathtub is
    defined without the embedding layer and the post-norm final layer).
    """
    if bathtub is not None:
        for key in BOTTOM_KEYS:
            value = bathtub.details.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    if curve is None or not curve.layers:
        return None
    last = final_layer(curve, num_layers)
    inner: list[tuple[float, int]] = [
        (m, layer)
        for layer, m in zip(curve.layers, curve.mean, strict=False)
        if 0 < layer < last and math.isfinite(m)
    ]
    if not inner:
        return None
    return min(inner)[1]


def status_counts(verdicts: Iterable[Verdict]) -> dict[str, int]:
    """How many verdicts have each status, every known status present (zeros included)."""
    counts = dict.fromkeys(STATUSES, 0)
    for v in verdicts:
        counts[v.status] = counts.get(v.status, 0) + 1
    return counts


def heat_scale(values: Iterable[float]) -> float:
    """Top of a heatmap's colour scale that outliers cannot wash out (0.0: nothing changed).

    Cells at the zero-base mark (a normalized diff of 2, the maximum, which any change of
    a zero base tensor reaches) are left out, and so are cells beyond Tukey's far-out
    fence (Q3 + 3 IQR) of the rest; the scale ends at the largest remaining value. Cells
    above it are drawn as saturated (marked), not allowed to flatten every other cell.
    """
    finite = sorted(float(v) for v in values if v is not None and math.isfinite(v))
    if not finite:
        return 0.0
    below = [v for v in finite if v < ZERO_BASE_DIFF] or finite
    q1, q3 = _quantile(below, 0.25), _quantile(below, 0.75)
    fence = q3 + 3.0 * (q3 - q1)
    top = max((v for v in below if v <= fence), default=below[-1])
    return top if top > 0 else below[-1]


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of a sorted list (numpy's default method)."""
    pos = q * (len(sorted_values) - 1)
    i = math.floor(pos)
    j = min(i + 1, len(sorted_values) - 1)
    return sorted_values[i] + (sorted_values[j] - sorted_values[i]) * (pos - i)
