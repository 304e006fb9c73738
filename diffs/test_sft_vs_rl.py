"""Group finding, per base: SFT descendants change more than RL descendants (METHODS §8).

Pools the per-matrix normalized weight differences of the base's SFT descendants and of
its RL descendants (SFT+RL counts as neither), then a one-sided rank test with an effect
size, plus mean RBF CKA over layers 1..L lower for SFT. Needs at least one SFT and one
RL descendant of the base among the selected pairs. Compared with the group's
``expect.sft_more_than_rl``.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest

from reasondiff.metrics.aggregate import per_matrix_diffs
from reasondiff.metrics.findings import sft_vs_rl
from reasondiff.records import Verdict


def test_sft_changes_more_than_rl(base_subject, finding, diff_options):
    by_method = {"SFT": [p for p in base_subject.pairs if p.method == "SFT"]}
    by_method["RL"] = [p for p in base_subject.pairs if p.method == "RL"]
    if not by_method["SFT"] or not by_method["RL"]:
        pytest.skip(
            f"{base_subject.subject}: needs at least one SFT and one RL descendant among the "
            f"selected pairs (have {len(by_method['SFT'])} SFT, {len(by_method['RL'])} RL)"
        )
    diffs: dict[str, list[float]] = {"SFT": [], "RL": []}
    rbf: dict[str, list[float]] = {"SFT": [], "RL": []}
    for method, pairs in by_method.items():
        for p in pairs:
            result = finding.result(p)
            diffs[method].extend(per_matrix_diffs(finding.weights(result)))
            curve = finding.curve(result, "rbf")
            blocks = [v for lay, v in zip(curve.layers, curve.mean, strict=True) if lay >= 1]
            rbf[method].append(sum(blocks) / len(blocks))
    verdict = sft_vs_rl(
        diffs["SFT"],
        diffs["RL"],
        sft_rbf=rbf["SFT"],
        rl_rbf=rbf["RL"],
        alpha=diff_options.sft_rl_alpha,
        min_effect=diff_options.sft_rl_min_effect,
    )
    finding.conclude(
        Verdict(
            finding="sft_more_than_rl",
            subject=base_subject.subject,
            observed=verdict.holds,
            expected=base_subject.expect.get("sft_more_than_rl"),
            summary=verdict.summary,
            details={
                **asdict(verdict),
                "sft": [p.descendant.key for p in by_method["SFT"]],
                "rl": [p.descendant.key for p in by_method["RL"]],
            },
        )
    )
