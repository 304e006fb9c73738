"""Rows to curves and per-layer tables: the step between raw records and the findings.

Pure functions over :mod:`reasondiff.records` rows (no pytest, no I/O). The records of
one call must belong to one pair (one base/descendant); mixing pairs is an error
because every aggregate here is per pair.

Public API
----------
- :func:`curves_from_rows` -- CkaRecord rows -> ``{metric: Curve}`` (mean over traces with
  a bootstrap interval), optionally for one trace set.
- :func:`trace_sets_of` -- trace-set names of rows in first-seen order.
- :func:`weight_layer_table` -- ``{component: [normalized diff per decoder layer]}``.
- :func:`weight_layer_totals` -- per-layer sum of normalized diffs over components: the
  quantity whose shares :func:`reasondiff.metrics.findings.localization` scores.
- :func:`weight_outside_layers` -- ``{tensor: normalized diff}`` for tensors outside blocks.
- :func:`weight_kind` -- matrix / embedding / bias / norm / other, by shape and name.
- :func:`weight_summary` -- headline numbers over weight matrices, other kinds apart.
- :func:`zero_base_tensors` -- tensors whose base is (near) zero (normalized diff 2).
- :func:`per_matrix_diffs` -- normalized diffs of 2-D weight matrices (SFT-vs-RL test).

Trace ids are ``"<set>:<id>"`` (see :class:`reasondiff.records.PairResult`); the set
is the text before the first ``:`` (``""`` for an id without one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from ..errors import MetricInputError
from ..records import CkaRecord, Curve, WeightRecord, num_blocks, trace_set_of
from ..records import trace_sets_of as _trace_sets_of
from .defaults import BOOTSTRAP
from .stats import bootstrap_interval, layer_shares

__all__ = [
    "curves_from_rows",
    "per_matrix_diffs",
    "trace_set_of",
    "trace_sets_of",
    "weight_kind",
    "weight_layer_table",
    "weight_layer_totals",
    "weight_outside_layers",
    "weight_summary",
    "zero_base_tensors",
]


def trace_sets_of(rows: Iterable[CkaRecord]) -> list[str]:
    """Names of the trace sets the rows come from, in first-seen order."""
    return _trace_sets_of(r.trace for r in rows)


def _one_pair(pairs: set[tuple[str, str]], what: str) -> None:
    if len(pairs) > 1:
        raise MetricInputError(
            f"{what} mix {len(pairs)} pairs {sorted(pairs)}; aggregate one pair at a time"
        )


def curves_from_rows(
    rows: Iterable[CkaRecord],
    *,
    trace_set: str | None = None,
    n_boot: int = BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Curve]:
    """Average per-trace CKA rows into one :class:`Curve` per metric.

    Per metric: a traces x layers table, its mean over traces and a percentile bootstrap
    interval over traces (:func:`~reasondiff.metrics.stats.bootstrap_interval`, the
    same seed for every metric). Layers are sorted; every trace must have every layer
    of the metric (a hole would bias the mean toward the other traces), and a duplicate
    (trace, layer, metric) row is an error. ``trace_set`` keeps only rows of that set.
    Metrics appear in first-seen order.
    """
    all_rows = list(rows)
    if trace_set is not None:
        known = trace_sets_of(all_rows)
        all_rows = [r for r in all_rows if trace_set_of(r.trace) == trace_set]
        if not all_rows:
            raise MetricInputError(
                f"no CKA rows for trace set {trace_set!r}; sets present: {known or 'none'}"
            )
    _one_pair({(r.base, r.descendant) for r in all_rows}, "CKA rows")
    by_metric: dict[str, dict[str, dict[int, float]]] = {}
    for r in all_rows:
        per_trace = by_metric.setdefault(r.metric, {}).setdefault(r.trace, {})
        if r.layer in per_trace:
            raise MetricInputError(
                f"duplicate CKA row: trace {r.trace!r}, layer {r.layer}, metric {r.metric!r} "
                f"(values {per_trace[r.layer]!r} and {r.value!r})"
            )
        per_trace[r.layer] = float(r.value)

    curves: dict[str, Curve] = {}
    for metric, traces in by_metric.items():
        layers = sorted({layer for vals in traces.values() for layer in vals})
        for trace, vals in traces.items():
            missing = [layer for layer in layers if layer not in vals]
            if missing:
                raise MetricInputError(
                    f"trace {trace!r} has no {metric!r} value at layer {missing[0]} "
                    f"(missing layers {missing}) while other traces have it"
                )
        table = np.array([[vals[layer] for layer in layers] for vals in traces.values()])
        try:
            mean, lo, hi = bootstrap_interval(table, n_boot=n_boot, seed=seed, layers=layers)
        except MetricInputError as exc:
            raise MetricInputError(f"metric {metric!r}: {exc}") from None
        curves[metric] = Curve(
            metric=metric,
            layers=layers,
            mean=[float(x) for x in mean],
            lo=[float(x) for x in lo],
            hi=[float(x) for x in hi],
            n_traces=len(traces),
        )
    return curves


# --------------------------------------------------------------------------- weights
def _comparable(records: Iterable[WeightRecord]) -> list[WeightRecord]:
    """Records whose normalized diff is a number (notes like ``missing_in_base`` give NaN)."""
    recs = list(records)
    _one_pair({(r.base, r.descendant) for r in recs}, "weight records")
    return [r for r in recs if math.isfinite(r.normalized_diff)]


def weight_layer_table(records: Iterable[WeightRecord]) -> dict[str, list[float]]:
    """``{component: [normalized diff at layer 0, 1, ...]}`` for decoder-block tensors.

    Records that are not comparable (NaN metrics, e.g. a tensor missing on one side)
    are skipped; a component that then lacks a value at some layer is left out of the
    table entirely, so every list has one finite value per layer (the record's note
    names what was skipped). Duplicate (layer, component) records are averaged.
    """
    recs = list(records)
    ok = [r for r in _comparable(recs) if r.layer >= 0]
    n = num_blocks(recs)
    cells: dict[str, dict[int, list[float]]] = {}
    for r in ok:
        cells.setdefault(r.component, {}).setdefault(r.layer, []).append(r.normalized_diff)
    return {
        comp: [float(np.mean(per_layer[i])) for i in range(n)]
        for comp, per_layer in cells.items()
        if len(per_layer) == n
    }


def weight_layer_totals(
    records: Iterable[WeightRecord], *, matrices_only: bool = False
) -> list[float]:
    """Per decoder layer, the sum of normalized diffs over its comparable tensors.

    This is what the localization index shares out over layers: a layer whose every
    matrix moved by d contributes (number of components) x d. Length = number of decoder
    layers seen in the records (layers without a comparable tensor count 0).
    ``matrices_only`` sums the 2-D weight matrices alone (attention and MLP, as the
    study's Figure 3): biases and norms change on another scale, and a zero-base bias
    sits at 2 for any change.
    """
    recs = list(records)
    totals = [0.0] * num_blocks(recs)
    for r in _comparable(recs):
        if r.layer >= 0 and (not matrices_only or weight_kind(r) == "matrix"):
            totals[r.layer] += r.normalized_diff
    return totals


#: Tensor kinds of :func:`weight_kind`, in report order.
WEIGHT_KINDS = ("matrix", "embedding", "bias", "norm", "other")


def weight_kind(r: WeightRecord) -> str:
    """``matrix`` (2-D inside a block: attention, MLP), ``embedding`` (2-D outside the
    blocks: embeddings, lm_head), ``bias``, ``norm`` or ``other`` (1-D, scalars)."""
    name = r.component or r.tensor
    if "norm" in name.lower():  # input_layernorm, post_attention_layernorm, model.norm
        return "norm"
    if name.endswith("bias"):
        return "bias"
    if _is_matrix(r):
        return "matrix" if r.layer >= 0 else "embedding"
    return "other"


def weight_outside_layers(records: Iterable[WeightRecord]) -> dict[str, float]:
    """``{component: normalized diff}`` for comparable tensors outside decoder blocks."""
    return {r.component: r.normalized_diff for r in _comparable(records) if r.layer < 0}


def weight_summary(records: Iterable[WeightRecord]) -> dict[str, float]:
    """Headline numbers for a pair's weights (all floats, no NaN), over weight matrices.

    Keys: ``n_tensors``, ``n_compared`` (finite metrics), ``n_not_compared``,
    ``n_matrices`` and ``n_zero_base`` (tensors whose base is (near) zero:
    :attr:`~reasondiff.records.WeightRecord.base_near_zero`). Over the 2-D matrices
    inside the blocks (the study's Figure 3), when there are any: ``mean_diff`` /
    ``median_diff`` / ``max_diff`` (normalized) and ``mean_relative_diff``; ``gini`` and
    ``max_layer_share_ratio`` from the localization index over their layer totals. Each
    other kind (``embedding``, ``bias``, ``norm``, ``other``) gets ``<kind>_mean_diff`` and
    ``<kind>_n`` of its own, never mixed into the headline.
    """
    recs = list(records)
    ok = _comparable(recs)
    by_kind: dict[str, list[WeightRecord]] = {}
    for r in ok:
        by_kind.setdefault(weight_kind(r), []).append(r)
    mats = by_kind.get("matrix", [])
    out: dict[str, float] = {
        "n_tensors": float(len(recs)),
        "n_compared": float(len(ok)),
        "n_not_compared": float(len(recs) - len(ok)),
        "n_matrices": float(len(mats)),
        "n_zero_base": float(sum(r.base_near_zero for r in ok)),
    }
    if mats:
        d = np.array([r.normalized_diff for r in mats])
        rel = [r.relative_diff for r in mats if math.isfinite(r.relative_diff)]
        out["mean_diff"] = float(d.mean())
        out["median_diff"] = float(np.median(d))
        out["max_diff"] = float(d.max())
        if rel:
            out["mean_relative_diff"] = float(np.mean(rel))
    for kind in WEIGHT_KINDS[1:]:
        rows = by_kind.get(kind, [])
        if rows:
            out[f"{kind}_n"] = float(len(rows))
            out[f"{kind}_mean_diff"] = float(np.mean([r.normalized_diff for r in rows]))
    totals = weight_layer_totals(recs, matrices_only=True)
    if totals and sum(totals) > 0:
        shares = layer_shares(np.asarray(totals, dtype=np.float64))
        out["gini"] = shares.gini
        out["max_layer_share_ratio"] = shares.max_share_ratio
    return out


def zero_base_tensors(records: Iterable[WeightRecord]) -> list[str]:
    """Names of the tensors whose base is (near) zero: their normalized diff is 2 for any
    change, so they are flagged, not read as a large change."""
    return [r.tensor for r in records if r.base_near_zero]


def per_matrix_diffs(records: Iterable[WeightRecord], *, blocks_only: bool = False) -> list[float]:
    """Normalized diffs of 2-D weight matrices with a finite value (biases, norms excluded).

    ``blocks_only`` drops matrices outside decoder blocks (embeddings, lm_head), whose
    change may reflect a grown vocabulary rather than training.
    """
    return [
        r.normalized_diff
        for r in _comparable(records)
        if _is_matrix(r) and (r.layer >= 0 or not blocks_only)
    ]


def _is_matrix(r: WeightRecord) -> bool:
    """2-D by its shape; an imported row without a shape by its name (a ``.weight`` that
    is not a norm: projections, embeddings, lm_head)."""
    if r.shape:
        return len(r.shape) == 2
    name = r.component or r.tensor
    return name.endswith(".weight") and "norm" not in name
