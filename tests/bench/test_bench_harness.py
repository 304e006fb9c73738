"""The benchmark harness: result lines, slopes, timing, and per-child peak RSS."""

from __future__ import annotations

import math
import sys

import pytest

from benchmarks.harness import Result, loglog_slope, run_child, time_calls


@pytest.mark.parametrize(
    ("result", "line"),
    [
        (Result("cka_group", 4.123, ">=", 3), "cka_group: ratio=4.12 goal=>= 3 status=ok"),
        (Result("cka_group", 2.5, ">=", 3), "cka_group: ratio=2.50 goal=>= 3 status=short"),
        (Result("weight_diff", 1.1, "<=", 1.4), "weight_diff: ratio=1.10 goal=<= 1.4 status=ok"),
        (Result("weight_diff", 1.5, "<=", 1.4), "weight_diff: ratio=1.50 goal=<= 1.4 status=short"),
    ],
)
def test_result_line_has_the_exact_form(result: Result, line: str) -> None:
    assert result.line() == line


def test_missing_ratio_is_short_with_reason() -> None:
    line = Result("pipeline", None, ">=", 5, reason="plugin not ready").line()
    assert line == "pipeline: ratio=n/a goal=>= 5 status=short  # plugin not ready"
    assert Result("x", math.nan, ">=", 1).line().startswith("x: ratio=n/a")


def test_tiny_ratios_print_in_scientific_form() -> None:
    assert (
        Result("agree", 3.2e-7, "<=", 1e-6).line()
        == "agree: ratio=3.20e-07 goal=<= 1e-06 status=ok"
    )


def test_unknown_operator_is_rejected() -> None:
    with pytest.raises(ValueError, match="operator"):
        Result("x", 1.0, "==", 1.0).line()


def test_loglog_slope_recovers_the_exponent() -> None:
    xs = [1000.0, 2000.0, 4000.0, 8000.0]
    assert loglog_slope(xs, [3e-9 * x**2 for x in xs]) == pytest.approx(2.0, abs=1e-12)
    assert loglog_slope(xs, [5e-6 * x for x in xs]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    ("xs", "ys"),
    [([1.0], [1.0]), ([1.0, 2.0], [1.0]), ([1.0, 1.0], [1.0, 2.0]), ([0.0, 1.0], [1.0, 2.0])],
)
def test_loglog_slope_rejects_bad_points(xs: list[float], ys: list[float]) -> None:
    with pytest.raises(ValueError):
        loglog_slope(xs, ys)


def test_time_calls_runs_warmup_then_repeats() -> None:
    calls: list[int] = []
    timing = time_calls(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5
    assert len(timing.seconds) == 3
    assert timing.best <= timing.median
    with pytest.raises(ValueError, match="repeats"):
        time_calls(lambda: None, repeats=0)


def test_child_peak_rss_is_its_own_not_the_parents() -> None:
    # The parent holds ~300 MiB; a child that allocates nothing must not report it
    # (Linux carries the forking process's high-water mark across exec).
    ballast = bytearray(300 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])
    small = run_child([sys.executable, "-c", "print('hi')"])
    big = run_child(
        [sys.executable, "-c", "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096])"]
    )
    assert small.stdout.strip() == "hi"
    assert small.peak_rss_bytes < 100 * 2**20
    assert big.peak_rss_bytes > 200 * 2**20
    assert 0 < small.seconds < 30
    del ballast


def test_failing_child_raises_with_its_stderr() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        run_child([sys.executable, "-c", "import sys; sys.exit('boom')"])
    run = run_child([sys.executable, "-c", "import sys; sys.exit(3)"], check=False)
    assert run.returncode == 3


def test_child_json_reads_the_last_line() -> None:
    run = run_child([sys.executable, "-c", "print('noise'); print('{\"a\": 1}')"])
    assert run.json() == {"a": 1}


def test_na_and_not_measured_keep_the_value_and_are_never_short() -> None:
    na = Result("gpu_study_compare_metrics_ms", 42.0, "<=", 10, reason="--tiny", scope="n/a")
    assert na.line() == "gpu_study_compare_metrics_ms: ratio=42.00 goal=<= 10 status=n/a  # --tiny"
    assert not na.short
    skipped = Result("cka_scale_rbf_memory", None, "<=", 0.25, reason="quick", scope="not measured")
    assert skipped.line() == (
        "cka_scale_rbf_memory: ratio=n/a goal=<= 0.25 status=not measured  # quick"
    )
    assert not skipped.short
    assert Result("x", 2.0, "<=", 1).short  # a judged miss still is
    assert not Result("x", 0.5, "<=", 1).short


@pytest.mark.parametrize("tiny, device", [(True, "cpu"), (False, "cpu"), (True, "cuda")])
def test_gpu_timing_goals_from_a_tiny_or_cpu_run_are_na(tiny: bool, device: str) -> None:
    from benchmarks.gpu_study import gpu_scoped

    ms = gpu_scoped(Result("gpu_study_compare_metrics_ms", 50.0, "<=", 10.0), tiny, device)
    assert ms.status == "n/a" and ms.ratio == 50.0
    fwd = gpu_scoped(Result("gpu_study_compare_forwards_per_trace", 4.0, "<=", 4.0), tiny, device)
    assert fwd.status == "ok"  # a count holds on any device


def test_gpu_timing_goals_on_a_full_gpu_run_are_judged() -> None:
    from benchmarks.gpu_study import gpu_scoped

    r = gpu_scoped(Result("gpu_study_compare_metrics_ms", 50.0, "<=", 10.0), False, "cuda:0")
    assert r.status == "short"
