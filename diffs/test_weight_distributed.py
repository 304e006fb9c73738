"""Finding: the weight change is distributed over layers (METHODS §7, §8).

Per decoder layer, the summed normalized weight difference over its weight matrices
(2-D attention and MLP weights, as the study's Figure 3; biases and norms are reported
apart); the localization index (Gini over layers, at most ``--localization-max-gini``) and
the largest layer share against the uniform share (at most ``--localization-max-share``
times) decide. Compared with ``expect.weight_distributed``. The work is
:func:`reasondiff.findings.weight_distributed`.
"""

from __future__ import annotations

from reasondiff import findings


def test_weight_change_distributed(pair_result, finding):
    finding.conclude(finding.judge(findings.weight_distributed, pair_result))
