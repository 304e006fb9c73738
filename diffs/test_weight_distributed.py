"""Finding: the weight change is distributed over layers (METHODS §7, §8).

Per decoder layer, the summed normalized weight difference over its components; the
localization index (Gini over layers, at most ``--localization-max-gini``) and the
largest layer share against the uniform share (at most ``--localization-max-share``
times) decide. Compared with ``expect.weight_distributed``.
"""

from __future__ import annotations

from dataclasses import asdict

from reasondiff.metrics.aggregate import weight_layer_totals
from reasondiff.metrics.findings import localization
from reasondiff.records import Verdict


def test_weight_change_distributed(pair, pair_result, finding, diff_options):
    totals = weight_layer_totals(finding.weights(pair_result))
    result = localization(
        totals,
        max_gini=diff_options.localization_max_gini,
        max_share_ratio=diff_options.localization_max_share,
    )
    finding.conclude(
        Verdict(
            finding="weight_distributed",
            subject=pair.pair_id,
            observed=result.distributed,
            expected=pair.expect.get("weight_distributed"),
            summary=result.summary,
            details=asdict(result),
        )
    )
