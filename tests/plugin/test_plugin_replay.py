"""Finding tests on synthetic bundles (``--from-results``): no model is involved."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from reasondiff.bundle import write_bundle
from reasondiff.records import CkaRecord, PairInfo, PairResult, WeightRecord

pytest_plugins = ["pytester"]

LAYERS = range(11)


def synthetic_result(linear: list[float], *, pair: str = "mine__theirs") -> PairResult:
    """One unregistered pair, two traces of set ``a`` sharing one linear curve."""
    base, desc = pair.split("__")
    info = PairInfo(pair, base, desc, f"/ckpt/{base}", f"/ckpt/{desc}", "SFT", None, {}, 10)
    rows = [
        CkaRecord(base, desc, f"a:t{t}", layer, metric, value)
        for t in range(2)
        for layer, value in zip(LAYERS, linear, strict=True)
        for metric in ("linear", "rbf", "linear_without_dominant")
    ]
    rows += [CkaRecord(base, desc, f"a:t{t}", 10, "linear_prenorm", linear[-1]) for t in range(2)]
    weights = [
        WeightRecord(
            base,
            desc,
            f"model.layers.{i}.mlp.up_proj.weight",
            i,
            "mlp.up_proj.weight",
            (4, 4),
            0.1,
            0.1,
            0.01,
        )
        for i in range(10)
    ]
    return PairResult(info=info, weights=weights, cka=rows, trace_sets=["a"])


def run_replay(
    pytester: pytest.Pytester, copy_project: Any, result: PairResult, *args: str
) -> pytest.RunResult:
    copy_project(pytester.path, snapshots=False)
    bundle = pytester.path / "bundle"
    write_bundle(bundle, [result], [], config={})
    # A subprocess: in-process runs that load torch / numpy.random twice crash.
    return pytester.runpytest_subprocess(
        "diffs", "-p", "no:cacheprovider", "--from-results", str(bundle), "-rA", *args
    )


def test_nan_in_a_used_row_fails_naming_model_layer_and_trace(
    pytester: pytest.Pytester, copy_project: Any
) -> None:
    curve = [1.0] * 11
    curve[4] = math.nan
    result = run_replay(
        pytester, copy_project, synthetic_result(curve), "-k", "test_bathtub and not dominant"
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*mine__theirs: linear is nan for theirs vs mine at layer 4, trace a:t0*"]
    )


def test_unregistered_pair_is_reported_not_judged(
    pytester: pytest.Pytester, copy_project: Any
) -> None:
    dip = [1.0, 1.0, 0.95, 0.4, 0.1, 0.1, 0.5, 0.95, 1.0, 1.0, 0.9]
    result = run_replay(
        pytester,
        copy_project,
        synthetic_result(dip),
        "-k",
        "test_bathtub and not dominant",
        "--junitxml=j.xml",
    )
    assert result.ret == 0  # no expectation: observed, never failed
    out = result.stdout.str()
    assert "bathtub" in out and "observed" in out
    junit = (pytester.path / "j.xml").read_text("utf-8")
    assert 'name="reasondiff.bathtub"' in junit and "observed: bathtub in linear CKA" in junit


def test_curve_test_skips_an_unlabelled_adhoc_pair(
    pytester: pytest.Pytester, copy_project: Any
) -> None:
    result = run_replay(pytester, copy_project, synthetic_result([1.0] * 11), "-k", "test_curves")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        ["*mine__theirs: ad-hoc comparison without --label is measured and reported*"]
    )


def test_group_finding_without_both_methods_is_undecided(
    pytester: pytest.Pytester, copy_project: Any
) -> None:
    result = run_replay(pytester, copy_project, synthetic_result([1.0] * 11), "-k", "sft")
    assert result.ret == 0  # recorded as undecided, and the test skipped: never failed
    assert "1 skipped" in result.stdout.str()
    out = " ".join(result.stdout.str().split())  # the report wraps long lines
    assert "base:mine sft_more_than_rl n/a" in out
    assert "undecided: no RL descendant of this base among the selected pairs (1 SFT, 0 RL)" in out


def _weights_only(desc: str, method: str, diffs: list[float]) -> PairResult:
    info = PairInfo(
        f"mine__{desc}", "mine", desc, "/ckpt/mine", f"/ckpt/{desc}", method, None, {}, 10
    )
    weights = [
        WeightRecord(
            "mine",
            desc,
            f"model.layers.{i}.mlp.up_proj.weight",
            i,
            "mlp.up_proj.weight",
            (4, 4),
            d,
            d,
            d / 10,
        )
        for i, d in enumerate(diffs)
    ]
    return PairResult(info=info, weights=weights, cka=[], trace_sets=[])


def test_sft_vs_rl_is_decided_from_a_weights_only_bundle(
    pytester: pytest.Pytester, copy_project: Any
) -> None:
    copy_project(pytester.path, snapshots=False)
    bundle = pytester.path / "bundle"
    sft = _weights_only("distilled", "SFT", [0.1 + 0.001 * i for i in range(10)])
    rl = _weights_only("zero", "RL", [0.01 + 0.001 * i for i in range(10)])
    write_bundle(bundle, [sft, rl], [], config={})
    result = pytester.runpytest_subprocess(
        "diffs", "-p", "no:cacheprovider", "--from-results", str(bundle), "-rA", "-k", "sft_changes"
    )
    assert result.ret == 0, result.stdout.str()[-2000:]
    assert "1 passed" in result.stdout.str()
    out = " ".join(result.stdout.str().split())  # the report wraps long lines
    assert "observed (yes)" in out and "SFT changes more than RL" in out
    assert "RBF CKA not available (weights only)" in out


def test_trace_invariance_skips_with_one_trace_set(
    pytester: pytest.Pytester, copy_project: Any
) -> None:
    result = run_replay(pytester, copy_project, synthetic_result([1.0] * 11), "-k", "invariance")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*only one trace set; pass --traces-alt PATH*"])


def test_report_dir_rewrites_the_bundle(
    pytester: pytest.Pytester, copy_project: Any, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    result = run_replay(
        pytester,
        copy_project,
        synthetic_result([1.0] * 11),
        "-k",
        "bathtub",
        "--report-dir",
        str(out),
    )
    assert result.ret == 0
    assert (out / "results.json").is_file() and (out / "cka.csv").is_file()
    assert "reasondiff cache: activations 0 computed, 0 loaded" in result.stdout.str()


# ---------------------------------------------------------- weights-only import bundles
_QWEN = "Qwen/Qwen2.5-Math-7B"
_OAT = "sail/Qwen2.5-Math-7B-Oat-Zero"  # registry: RL descendant, expects weight_distributed


def _weights_only_bundle(root: Path, per_block: list[float]) -> Path:
    """Another tool's per-tensor CSV as a bundle: 4 columns, no cka.csv, no results.json."""
    root.mkdir()
    lines = ["base,descendant,tensor,normalized_diff"]
    for block, diff in enumerate(per_block):
        for comp in ("self_attn.q_proj.weight", "mlp.up_proj.weight"):
            lines.append(f"{_QWEN},{_OAT},model.layers.{block}.{comp},{diff!r}")
    lines.append(f"{_QWEN},{_OAT},model.embed_tokens.weight,0.001")
    (root / "weights.csv").write_text("\n".join(lines) + "\n")
    return root


def test_weights_only_bundle_runs_weight_findings_and_skips_cka_findings(
    pytester: pytest.Pytester, copy_project: Any
) -> None:
    copy_project(pytester.path, snapshots=False)
    bundle = _weights_only_bundle(pytester.path / "imported", [0.002] * 28)
    result = pytester.runpytest_subprocess(
        "diffs", "-p", "no:cacheprovider", "--from-results", str(bundle), "-rA"
    )
    assert result.ret == 0, result.stdout.str()[-3000:]
    pid = "qwen25-math-7b__qwen25-math-7b-oat-zero"  # matched to the registry by hub id
    result.stdout.fnmatch_lines(
        [
            f"PASSED diffs/test_weight_distributed.py::test_weight_change_distributed[{pid}]",
            f"SKIPPED * {pid}: the results bundle {bundle} has no CKA rows for this pair "
            "(weights only); CKA findings need its cka.csv",
        ]
    )
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] == 1 and "failed" not in outcomes and "error" not in outcomes


def test_weights_only_bundle_gets_the_registry_expectation(
    pytester: pytest.Pytester, copy_project: Any
) -> None:
    """All change in one block contradicts the registry's weight_distributed = true."""
    copy_project(pytester.path, snapshots=False)
    bundle = _weights_only_bundle(pytester.path / "imported", [0.0] * 27 + [0.5])
    result = pytester.runpytest_subprocess(
        "diffs", "-p", "no:cacheprovider", "--from-results", str(bundle), "-k", "distributed"
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*qwen25-math-7b__qwen25-math-7b-oat-zero weight_distributed: expected yes, observed no*"]
    )


def test_bundle_with_some_cka_rows_still_fails_on_missing_ones(
    pytester: pytest.Pytester, copy_project: Any
) -> None:
    """Only a pair with no CKA rows at all skips; a missing metric is still a failure."""
    result = synthetic_result([1.0] * 11)
    result.cka = [r for r in result.cka if r.metric != "linear_prenorm"]
    run = run_replay(pytester, copy_project, result, "-k", "final_layer")
    assert run.ret == pytest.ExitCode.TESTS_FAILED
    run.stdout.fnmatch_lines(["*mine__theirs: no linear_prenorm rows*"])
