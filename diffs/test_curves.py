"""Curve snapshots: each pair's per-layer curves against the last accepted ones.

Per pair, the primary trace set's mean ``linear``, ``rbf`` and ``linear_without_dominant``
CKA and the per-layer mean normalized weight difference (``weight_diff``) are compared
with their snapshot within ``--curve-atol`` / ``--curve-rtol``. Registry groups keep
their snapshots under ``__snapshots__/<group>/test_curves/``; an ad-hoc ``--label``
series under ``__snapshots__/labels/`` (keyed by the label, so the next checkpoint of the series is
compared with the last accepted one). ``--snapshot-update`` accepts new curves.
"""

from __future__ import annotations

import pytest

from reasondiff.records import WeightRecord

CKA_CURVES = ("linear", "rbf", "linear_without_dominant")


def weight_diff_curve(records: list[WeightRecord]) -> dict:
    """Mean normalized diff over the comparable tensors of each decoder layer."""
    per_layer: dict[int, list[float]] = {}
    for r in records:
        if r.layer >= 0 and not r.note:
            per_layer.setdefault(r.layer, []).append(r.normalized_diff)
    layers = sorted(per_layer)
    return {
        "metric": "weight_diff",
        "layers": layers,
        "values": [sum(per_layer[lay]) / len(per_layer[lay]) for lay in layers],
    }


def test_curves(pair, pair_result, finding, curve_snapshot):
    if pair.group is None and pair.label is None:
        pytest.skip(
            f"{pair.pair_id}: ad-hoc comparison without --label is measured and reported, "
            "not snapshotted (give --label NAME to track a checkpoint series)"
        )
    payloads = {}
    for metric in CKA_CURVES:
        c = finding.curve(pair_result, metric)
        payloads[metric] = {"metric": metric, "layers": c.layers, "values": c.mean}
    payloads["weight_diff"] = weight_diff_curve(finding.weights(pair_result))

    problems: list[str] = []
    for metric, payload in payloads.items():
        if payload == curve_snapshot(name=metric):
            continue
        outcome = curve_snapshot.executions[curve_snapshot.num_executions - 1]
        if outcome.recalled_data is None and outcome.exception is None:
            problems.append(
                f"{pair.pair_id} {metric}: no accepted snapshot yet; run with --snapshot-update to accept it"
            )
        else:
            lines = curve_snapshot.get_assert_diff()
            problems.append(
                f"{pair.pair_id} {metric}: "
                + "; ".join(line.strip() for line in lines if line.strip())
            )
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
