"""Row 11 (session level): a cache directory that cannot exist still gives correct results.

Tests run as root, so ``chmod`` cannot make a directory read-only for them; a cache path
under a regular file fails every ``mkdir`` with ENOTDIR instead. (The disk-full case,
ENOSPC on every write, runs end to end in ``test_fault_end_to_end.py``.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------- issue 11.10: whole runs
def _text(result: pytest.RunResult) -> str:
    return "\n".join(result.outlines + result.errlines)


@pytest.mark.slow
def test_unusable_cache_still_runs_the_toy_pair_in_memory(
    run_pytest: Any, toy_traces: Path, tmp_path: Path
) -> None:
    """``--diff-cache /dev/null``: the toy family is built in a temporary directory, every
    result is computed in memory, the report says caching was off; no NotADirectoryError."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file where the cache directory would go")
    cache = Path("/dev/null") if Path("/dev/null").exists() else blocker / "cache"
    traces = small_trace_file(toy_traces, tmp_path / "t.jsonl", count=2)
    result = run_pytest(
        "--base", "toy:base", "--candidate", "toy:copy", "--traces", str(traces),
        "--diff-cache", str(cache), "--max-tokens", "32", "--layers", "0,3,5,8",
        "--bootstrap", "20", "-k", "bathtub and not dominant",
    )  # fmt: skip
    text = _text(result)
    assert result.ret == 0, text[-3000:]
    assert "Traceback (most recent call last)" not in text, text[-3000:]
    assert "NotADirectoryError" not in text, text[-3000:]
    result.assert_outcomes(passed=1)
    assert text.count("caching was off") == 1, text[-3000:]
    assert blocker.read_text().startswith("a regular file")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["under-a-file", "in-proc"])
def test_unwritable_report_dir_is_a_usage_error_before_any_work(
    run_pytest: Any, tmp_path: Path, where: str
) -> None:
    """An unwritable ``--report-dir`` stops the run at start-up, naming the directory,
    instead of a FileNotFoundError at session end after every pair was computed."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file")
    report = blocker / "report" if where == "under-a-file" else Path("/proc/self/report")
    if where == "in-proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    cache = tmp_path / "cache"
    result = run_pytest(
        "--base", "toy:base", "--candidate", "toy:copy", "--diff-cache", str(cache),
        "--report-dir", str(report), timeout=120,
    )  # fmt: skip
    text = _text(result)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, text[-3000:]
    assert f"--report-dir {report}: cannot write the results bundle there" in text, text[-3000:]
    assert "Traceback (most recent call last)" not in text, text[-3000:]
    assert not cache.exists(), "work started before the report dir was checked"
