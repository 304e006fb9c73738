"""Finding: a middle-layer "bathtub" in linear CKA (METHODS §8).

The deepest dip of the primary trace set's mean linear-CKA curve whose bottom lies in
the middle band (``--bathtub-band``), judged against its own context: it sits at least
``--bathtub-delta`` below the highest value before it and the highest value after it,
inside layers 1..L-1. A steady decline or a low last layer is not a dip. The verdict is
compared with the registry's ``expect.bathtub``; where the dip lies is reported for every
pair, next to the study's location (``study_dip``) when the registry has one.
"""

from __future__ import annotations

from dataclasses import asdict

from reasondiff.metrics.findings import detect_bathtub
from reasondiff.records import Verdict


def test_bathtub(pair, pair_result, finding, diff_options):
    curve = finding.curve(pair_result, "linear")
    result = detect_bathtub(
        curve.mean,
        curve.layers,
        delta=diff_options.bathtub_delta,
        band=diff_options.bathtub_band,
        lo=curve.lo,
        hi=curve.hi,
        num_layers=pair_result.info.num_layers,
    )
    summary = result.summary
    study = pair.descendant.study_dip
    if study is not None:
        summary += f"; study: dip from layer {study[0]} to {study[1]}"
    finding.conclude(
        Verdict(
            finding="bathtub",
            subject=pair.pair_id,
            observed=result.present,
            expected=pair.expect.get("bathtub"),
            summary=summary,
            details={**asdict(result), "study_dip": list(study) if study else None},
        )
    )
