"""Finding: the final layer has the lowest linear CKA (METHODS §8).

The verdict uses the post-norm curve (``hidden_states[L]``, as the study did); the
pre-norm value of the last block (``linear_prenorm``) is reported next to it so that a
change made only by the final norm can be told apart. Compared with
``expect.final_layer_lowest``. The work is :func:`reasondiff.findings.final_layer_lowest`.
"""

from __future__ import annotations

from reasondiff import findings


def test_final_layer_lowest(pair_result, finding):
    finding.conclude(finding.judge(findings.final_layer_lowest, pair_result))
