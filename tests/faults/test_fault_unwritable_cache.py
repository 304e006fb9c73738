"""Row 11 (session level): a cache directory that cannot exist still gives correct results.

Tests run as root, so ``chmod`` cannot make a directory read-only for them; a cache path
under a regular file fails every ``mkdir`` with ENOTDIR instead. (The disk-full case,
ENOSPC on every write, runs end to end in ``test_fault_end_to_end.py``.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _faultkit import make_session, small_trace_file

from reasondiff.reports.terminal import footer_lines


def test_cache_under_a_regular_file_computes_in_memory_and_says_so_once(
    toy_base: Path,
    toy_copy: Path,
    toy_traces: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from reasondiff import fingerprint

    traces = small_trace_file(toy_traces, tmp_path / "t.jsonl", count=2)
    opts = {"traces": str(traces), "max_tokens": 32, "layers": (0, 5)}
    good, pair = make_session(tmp_path / "cache", toy_base, toy_copy, **opts)
    expected = good.pair_result(pair)

    monkeypatch.setattr(fingerprint, "_MEMO", {})
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file where the cache directory would go")
    session, pair = make_session(blocker / "cache", toy_base, toy_copy, **opts)
    got = session.pair_result(pair)

    assert got.cka == expected.cka and got.weights == expected.weights
    assert got.massive == expected.massive
    reason = session.stats.caching_disabled_reason
    assert reason is not None and "Not a directory" in reason and str(blocker) in reason
    lines = [ln for ln in footer_lines(session.report_data()) if "caching was off" in ln]
    assert len(lines) == 1 and "computed in memory" in lines[0]
    assert blocker.read_text().startswith("a regular file")
    assert session.stats.weight_diffs_computed == 1
