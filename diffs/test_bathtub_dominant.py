"""Finding: the bathtub is explained by a few dominant datapoints (METHODS §5, §8).

Holds when linear CKA has a bathtub and the same curve with the dominant tokens U
removed (``linear_without_dominant``) has none. Compared with ``expect.bathtub_explained``.
The work is :func:`reasondiff.findings.bathtub_explained`.
"""

from __future__ import annotations

from reasondiff import findings


def test_bathtub_explained_by_dominant_datapoints(pair_result, finding):
    finding.conclude(finding.judge(findings.bathtub_explained, pair_result))
