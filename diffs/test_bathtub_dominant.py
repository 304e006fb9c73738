"""Finding: the bathtub is explained by a few dominant datapoints (METHODS §5, §8).

Holds when linear CKA has a bathtub and the same curve with the dominant tokens U
removed (``linear_without_dominant``) has none. Compared with ``expect.bathtub_explained``.
"""

from __future__ import annotations

from dataclasses import asdict

from reasondiff.metrics.findings import bathtub_explained, detect_bathtub
from reasondiff.records import Verdict


def test_bathtub_explained_by_dominant_datapoints(pair, pair_result, finding, diff_options):
    kwargs = {
        "delta": diff_options.bathtub_delta,
        "band": diff_options.bathtub_band,
        "num_layers": pair_result.info.num_layers,
    }
    linear = finding.curve(pair_result, "linear")
    without = finding.curve(pair_result, "linear_without_dominant")
    with_u = detect_bathtub(linear.mean, linear.layers, lo=linear.lo, hi=linear.hi, **kwargs)
    without_u = detect_bathtub(
        without.mean,
        without.layers,
        lo=without.lo,
        hi=without.hi,
        metric="linear CKA without dominant datapoints",
        **kwargs,
    )
    result = bathtub_explained(with_u, without_u)
    finding.conclude(
        Verdict(
            finding="bathtub_explained",
            subject=pair.pair_id,
            observed=result.explained,
            expected=pair.expect.get("bathtub_explained"),
            summary=result.summary,
            details={
                **asdict(result),
                "linear": asdict(with_u),
                "without_dominant": asdict(without_u),
            },
        )
    )
