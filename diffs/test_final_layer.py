"""Finding: the final layer has the lowest linear CKA (METHODS §8).

The verdict uses the post-norm curve (``hidden_states[L]``, as the study did); the
pre-norm value of the last block (``linear_prenorm``) is reported next to it so that a
change made only by the final norm can be told apart. Compared with
``expect.final_layer_lowest``.
"""

from __future__ import annotations

from dataclasses import asdict

from reasondiff.metrics.findings import final_layer_lowest, final_layer_summary
from reasondiff.records import Verdict


def test_final_layer_lowest(pair, pair_result, finding, diff_options):
    post_curve = finding.curve(pair_result, "linear")
    pre_curve = finding.curve(pair_result, "linear_prenorm")
    final = pair_result.info.num_layers
    margin = diff_options.final_layer_margin
    post = final_layer_lowest(
        post_curve.mean, post_curve.layers, margin=margin, variant="post-norm"
    )
    pre_final = dict(zip(pre_curve.layers, pre_curve.mean, strict=True))[final]
    pre_values = [
        pre_final if lay == final else v
        for lay, v in zip(post_curve.layers, post_curve.mean, strict=True)
    ]
    pre = final_layer_lowest(pre_values, post_curve.layers, margin=margin, variant="pre-norm")
    finding.conclude(
        Verdict(
            finding="final_layer_lowest",
            subject=pair.pair_id,
            observed=post.lowest,
            expected=pair.expect.get("final_layer_lowest"),
            summary=final_layer_summary(post, pre),
            details={"post_norm": asdict(post), "pre_norm": asdict(pre)},
        )
    )
