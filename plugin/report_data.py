"""Build :class:`~reasondiff.records.ReportData` from results and verdicts, without pytest.

The pytest session (``DiffSession.report_data``) and :class:`reasondiff.api.Comparison`
both call :func:`build_report_data`, so a notebook's figures and report are the ones a
``--report-dir`` run draws.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .errors import ReasondiffError
from .findings import CurveSource
from .records import CacheStats, Curve, PairResult, ReportData, Verdict
from .tokens import pair_tokens


def build_report_data(
    results: Sequence[PairResult],
    verdicts: Sequence[Verdict],
    *,
    curves: CurveSource,
    cache: CacheStats | None = None,
    stage_seconds: Mapping[str, float] | None = None,
    notes: Iterable[str] = (),
) -> ReportData:
    """Everything the reports render: curves per trace set, weight tables and summaries,
    and the tokens behind each pair's dominant datapoints (named in the dip layers only
    when the pair's bathtub verdict observed a dip).

    ``curves(result, trace_set)`` gives a pair's curves (None = primary set). A pair whose
    rows cannot be aggregated (NaN, holes) has failed its findings with the reason
    already; the report shows what it can and says why not in a note.
    """
    from .metrics.aggregate import (
        weight_layer_table,
        weight_outside_layers,
        weight_summary,
        zero_base_tensors,
    )

    data = ReportData(
        verdicts=list(verdicts),
        cache=cache if cache is not None else CacheStats(),
        stage_seconds=dict(stage_seconds or {}),
        notes=list(notes),
    )
    by_key = {(v.finding, v.subject): v for v in verdicts}
    for r in results:
        pid = r.info.pair_id
        data.pairs.append(r.info)
        if r.error is not None:
            data.notes.append(f"{pid}: failed: {r.error}")
            continue
        try:
            pair_curves: dict[str, Curve] = dict(curves(r, None)) if r.cka else {}
            for ts in r.trace_sets:
                for metric, c in curves(r, ts).items():
                    if metric in ("linear", "rbf"):
                        pair_curves[f"{metric}@{ts}"] = c
            data.curves[pid] = pair_curves
        except ReasondiffError as exc:
            data.notes.append(f"{pid}: no curves in the report: {exc}")
        try:
            data.weight_layers[pid] = weight_layer_table(r.weights)
            data.weight_other[pid] = weight_outside_layers(r.weights)
            summary = dict(weight_summary(r.weights))
        except ReasondiffError as exc:
            data.notes.append(f"{pid}: no weight table in the report: {exc}")
            summary = {}
        zero = zero_base_tensors(r.weights)
        if zero:
            shown = ", ".join(zero[:3]) + (f", ... ({len(zero)} in all)" if len(zero) > 3 else "")
            data.notes.append(
                f"{pid}: {len(zero)} tensor(s) are (near) zero in the base next to the "
                f"descendant, so their normalized diff is 2 whatever the change (flagged; "
                f"in the headline only if a matrix): {shown}"
            )
        named = pair_tokens(r, by_key.get(("bathtub", pid)))
        if named is not None:
            data.tokens[pid] = named
        loc = by_key.get(("weight_distributed", pid))
        if loc is not None and "gini" in loc.details and loc.observed is not None:
            summary["localization"] = float(loc.details["gini"])
        data.weight_summary[pid] = summary
        for n in r.notes:
            if n not in data.notes:
                data.notes.append(n)
    return data
