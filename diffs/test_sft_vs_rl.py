"""Group finding, per base: SFT descendants change more than RL descendants (METHODS §8).

The unit of evidence is the descendant: per descendant, the median normalized weight
difference over its 2-D matrices with a bootstrap interval over matrices. Holds when
every SFT median exceeds every RL median by at least ``--sft-rl-ratio`` and the lower
bound of each ratio's interval is above 1 (SFT+RL counts as neither side). Decided from
weights alone; mean RBF CKA per side is reported beside it when CKA rows exist, and the
pooled rank test over matrices as a descriptive figure. With no SFT or no RL descendant
among the selected pairs the verdict is recorded as undecided (report and bundle) and the
test is skipped, never failed. Compared
with the group's ``expect.sft_more_than_rl``. The work is
:func:`reasondiff.findings.sft_more_than_rl`.
"""

from __future__ import annotations

import pytest

from reasondiff import findings


def test_sft_changes_more_than_rl(base_subject, finding):
    members = [
        findings.GroupMember(p.descendant.key, p.method, finding.result(p))
        for p in base_subject.pairs
        if p.method in ("SFT", "RL")
    ]
    verdict = finding.judge(
        findings.sft_more_than_rl,
        base_subject.subject,
        members,
        expected=base_subject.expect.get("sft_more_than_rl"),
    )
    finding.conclude(verdict)
    if verdict.observed is None:
        # recorded above (report, bundle); the test itself checked nothing
        pytest.skip(f"{base_subject.subject}: {verdict.summary}")
