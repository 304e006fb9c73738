"""Finding: curves barely depend on which trace set is used (METHODS §8, study Fig. 5).

The verdict is on the linear-CKA curve, the one the bathtub and final-layer findings
are read from: its means over the primary trace set (``--traces``) and the second one
(``--traces-alt``) agree within ``--invariance-atol`` at every layer. The RBF curves'
gap is measured and reported alongside, not judged. Skipped when there is no second
set. Compared with ``expect.trace_invariant``.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest

from reasondiff.metrics.findings import trace_invariance
from reasondiff.records import Verdict


def test_trace_invariance(pair, pair_result, finding, diff_options):
    if not pair_result.trace_sets:
        finding.rows(pair_result, ["linear"])  # skips a weights-only bundle, names it
    if len(pair_result.trace_sets) < 2:
        pytest.skip(
            f"{pair.pair_id}: only one trace set; pass --traces-alt PATH to check trace invariance"
        )
    set_a, set_b = pair_result.trace_sets[:2]
    results = {
        metric: trace_invariance(
            finding.curve(pair_result, metric, set_a),
            finding.curve(pair_result, metric, set_b),
            atol=diff_options.invariance_atol,
            names=(set_a, set_b),
        )
        for metric in ("linear", "rbf")
    }
    linear, rbf = results["linear"], results["rbf"]
    finding.conclude(
        Verdict(
            finding="trace_invariant",
            subject=pair.pair_id,
            observed=linear.invariant,
            expected=pair.expect.get("trace_invariant"),
            summary=f"linear CKA {linear.summary} (RBF CKA, reported: max |diff| "
            f"{rbf.max_abs_diff:.4f} at layer {rbf.layer})",
            details={metric: asdict(r) for metric, r in results.items()},
        )
    )
