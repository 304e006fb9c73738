"""Finding: curves barely depend on which trace set is used (METHODS §8, study Fig. 5).

The verdict is on the linear-CKA curve, the one the bathtub and final-layer findings
are read from: its means over the primary trace set (``--traces``) and the second one
(``--traces-alt``) agree within ``--invariance-atol`` at every layer. The RBF curves'
gap is measured and reported alongside, not judged. Skipped when there is no second
set. Compared with ``expect.trace_invariant``. The work is
:func:`reasondiff.findings.trace_invariant`.
"""

from __future__ import annotations

from reasondiff import findings


def test_trace_invariance(pair_result, finding):
    finding.conclude(finding.judge(findings.trace_invariant, pair_result))
