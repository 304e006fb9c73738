"""Finding: a middle-layer "bathtub" in linear CKA (METHODS §8).

The deepest dip of the primary trace set's mean linear-CKA curve whose bottom lies in
the middle band (``--bathtub-band``), judged against its own context: it sits at least
``--bathtub-delta`` below the highest value before it and the highest value after it,
inside layers 1..L-1. A steady decline or a low last layer is not a dip. The verdict is
compared with the registry's ``expect.bathtub``; where the dip lies is reported for every
pair, next to the study's location (``study_dip``) when the registry has one.
The work is :func:`reasondiff.findings.bathtub`.
"""

from __future__ import annotations

from reasondiff import findings


def test_bathtub(pair, pair_result, finding):
    study_dip = pair.descendant.study_dip
    finding.conclude(finding.judge(findings.bathtub, pair_result, study_dip=study_dip))
