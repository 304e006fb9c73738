"""Finding: a middle-layer "bathtub" in linear CKA (METHODS §8).

The minimum of the primary trace set's mean linear-CKA curve over layers 1..L-1 lies in
the middle band and sits at least ``--bathtub-delta`` below both the early level and the
late recovery. The verdict is compared with the registry's ``expect.bathtub``.
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
    finding.conclude(
        Verdict(
            finding="bathtub",
            subject=pair.pair_id,
            observed=result.present,
            expected=pair.expect.get("bathtub"),
            summary=result.summary,
            details=asdict(result),
        )
    )
