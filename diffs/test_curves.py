"""Curve snapshots: each pair's per-layer curves against the last accepted ones.

Per pair, the primary trace set's mean ``linear``, ``rbf`` and ``linear_without_dominant``
CKA per hidden-state layer (0 = embeddings) and the mean normalized weight difference per
decoder block (``weight_diff``, indexed by ``block``) are compared with their snapshot
within ``--curve-atol`` / ``--curve-rtol``. Registry groups keep their snapshots under
``<snapshot dir>/<group>/test_curves/``; an ad-hoc ``--label`` series under
``<snapshot dir>/labels/<label>/test_curves/`` (keyed by the label, so the next
checkpoint of the series is compared with the last accepted one). The snapshot dir is
``--snapshot-dir`` or ``snapshots/`` next to this file. ``--snapshot-update`` accepts
new curves, in the scopes this run selected only.
"""

from __future__ import annotations

import pytest

from reasondiff import findings


def test_curves(pair, pair_result, finding, curve_snapshot):
    # curve_snapshot skips an ad-hoc pair without --label (nothing to compare with)
    payloads = finding.judge(findings.snapshot_payloads, pair_result)

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
