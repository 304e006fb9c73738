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
- :func:`weight_summary` -- a few headline numbers for the report (``mean_diff`` ...).
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
    "weight_layer_table",
    "weight_layer_totals",
    "weight_outside_layers",
    "weight_summary",
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


def weight_layer_totals(records: Iterable[WeightRecord]) -> list[float]:
    """Per decoder layer, the sum of normalized diffs over its comparable tensors.

    This is what the localization index shares out over layers: a layer whose every
    matrix moved by d contributes (number of components) x d. Length = number of decoder
    layers seen in the records (layers without a comparable tensor count 0).
    """
    recs = list(records)
    totals = [0.0] * num_blocks(recs)
    for r in _comparable(recs):
        if r.layer >= 0:
            totals[r.layer] += r.normalized_diff
    return totals


def weight_outside_layers(records: Iterable[WeightRecord]) -> dict[str, float]:
    """``{component: normalized diff}`` for comparable tensors outside decoder blocks."""
    return {r.component: r.normalized_diff for r in _comparable(records) if r.layer < 0}


def weight_summary(records: Iterable[WeightRecord]) -> dict[str, float]:
    """Headline numbers for a pair's weights (all floats, no NaN).

    Keys: ``n_tensors``, ``n_compared`` (finite metrics), ``n_not_compared``, and when at
    least one tensor was compared ``mean_diff`` / ``median_diff`` / ``max_diff``
    (normalized), ``mean_relative_diff``; when some layer changed, ``gini`` and
    ``max_layer_share_ratio`` from the localization index over layer totals.
    """
    recs = list(records)
    ok = _comparable(recs)
    out: dict[str, float] = {
        "n_tensors": float(len(recs)),
        "n_compared": float(len(ok)),
        "n_not_compared": float(len(recs) - len(ok)),
    }
    if ok:
        d = np.array([r.normalized_diff for r in ok])
        rel = [r.relative_diff for r in ok if math.isfinite(r.relative_diff)]
        out["mean_diff"] = float(d.mean())
        out["median_diff"] = float(np.median(d))
        out["max_diff"] = float(d.max())
        if rel:
            out["mean_relative_diff"] = float(np.mean(rel))
    totals = weight_layer_totals(recs)
    if totals and sum(totals) > 0:
        shares = layer_shares(np.asarray(totals, dtype=np.float64))
        out["gini"] = shares.gini
        out["max_layer_share_ratio"] = shares.max_share_ratio
    return out


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
