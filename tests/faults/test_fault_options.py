"""Row 8: bad options are usage errors that say what is wrong and what is accepted.

Each case runs ``pytest diffs`` in a scratch project (a subprocess; no model is loaded:
these fail while the plugin configures) and checks the exit code, the message and
that no traceback was printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from reasondiff.records import CkaRecord, PairInfo, PairResult, Verdict, WeightRecord

pytestmark = pytest.mark.slow

USAGE_ERROR = 4


def _usage_error(result: pytest.RunResult, *needles: str) -> None:
    text = "\n".join(result.outlines + result.errlines)
    assert result.ret == USAGE_ERROR, text[-3000:]
    assert "Traceback (most recent call last)" not in text, text[-3000:]
    assert "INTERNALERROR" not in text, text[-3000:]
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text[-3000:]}"


def _registry(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "extra.toml"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, "utf-8")
    return p


@pytest.mark.parametrize(
    ("make_args", "needles"),
    [
        (
            lambda tmp: ["--model-group", "nope"],
            ["--model-group 'nope' is not a registry group; choose one of:", "toy", "distill7b"],
        ),
        (
            lambda tmp: ["--registry", str(_registry(tmp, '[models.x]\nsorce = "a/b"\n'))],
            ["[models.x] has unknown key(s) ['sorce']; allowed:", "'source'"],
        ),
        (
            lambda tmp: [
                "--registry",
                str(_registry(tmp, '[models.x]\nsource = "a/b"\nbase = "nope"\n')),
            ],
            ["nope"],
        ),
        (
            lambda tmp: ["--registry", str(tmp / "missing.toml")],
            ["cannot read registry file", "missing.toml"],
        ),
        (
            lambda tmp: ["--registry", str(_registry(tmp, "[models.x\nsource = 1\n"))],
            ["extra.toml is not valid TOML"],
        ),
        pytest.param(
            lambda tmp: ["--registry", str(_registry(tmp, b"\xff\xfe[models]\x00\x81"))],
            ["registry file", "extra.toml"],
            id="binary-registry-file",
        ),
        (
            lambda tmp: ["--candidate", str(tmp)],
            ["--base and --candidate go together: give both or neither"],
        ),
        (
            lambda tmp: ["--device", "tpu"],
            ["--device 'tpu' is not one of: auto, cpu, cuda"],
        ),
        (  # real models never fall back to the toy traces silently (issue 11.5)
            lambda tmp: ["--model-group", "distill7b"],
            ["group 'distill7b' compares real models", "reasondiff-traces", "--traces toy"],
        ),
        (
            lambda tmp: ["--base", str(tmp / "base"), "--candidate", "toy:copy"],
            ["the ad-hoc pair compares real models", "reasondiff-traces", "--traces"],
        ),
    ],
    ids=[
        "unknown-group",
        "unknown-registry-key",
        "unknown-base-key",
        "missing-registry-file",
        "invalid-toml",
        "binary-registry-file",
        "candidate-without-base",
        "unknown-device",
        "real-group-without-traces",
        "real-adhoc-pair-without-traces",
    ],
)
def test_bad_option_is_a_usage_error(
    run_pytest: Any, tmp_path: Path, make_args: Any, needles: list[str]
) -> None:
    _usage_error(run_pytest(*make_args(tmp_path), timeout=120), *needles)


def test_missing_candidate_path_is_named_without_traceback(
    run_pytest: Any, tmp_path: Path, tiny_qwen: Path
) -> None:
    missing = tmp_path / "no" / "such-checkpoint"
    result = run_pytest(
        "--base", str(tiny_qwen), "--candidate", str(missing), "--traces", "toy", timeout=180
    )  # fmt: skip
    text = "\n".join(result.outlines + result.errlines)
    # The path is neither a directory nor a hub id: the pair_result fixture fails with a
    # ModelLoadError naming it, so each test of the pair errors (none passes).
    assert result.ret == 1, text[-3000:]
    assert "Traceback (most recent call last)" not in text and "INTERNALERROR" not in text
    assert "such-checkpoint" in text
    assert "neither an existing directory nor a hub id" in text
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) == 0 and outcomes.get("errors", 0) >= 1, outcomes


def _bundle(root: Path) -> Path:
    from reasondiff.bundle import write_bundle

    info = PairInfo("b__d", "b", "d", "b", "d", "SFT", None, num_layers=2)
    res = PairResult(
        info=info,
        weights=[
            WeightRecord(
                "b",
                "d",
                "model.layers.0.mlp.up_proj.weight",
                0,
                "mlp.up_proj.weight",
                (4, 2),
                0.1,
                0.1,
                0.01,
            )
        ],
        cka=[CkaRecord("b", "d", "s:t0", layer, "linear", 1.0) for layer in range(3)],
        trace_sets=["s"],
    )
    write_bundle(root, [res], [Verdict("bathtub", "b__d", False, None, "flat")], config={})
    return root


@pytest.mark.parametrize(
    ("damage", "needles"),
    [
        (
            lambda b: (b / "results.json").write_text("{not json"),
            ["results.json: not readable JSON"],
        ),
        (
            lambda b: (b / "weights.csv").unlink(),
            ["weights.csv: missing from the bundle", "a bundle needs weights.csv"],
        ),
        (
            lambda b: (b / "cka.csv").write_text(
                (b / "cka.csv").read_text().replace("metric", "measure", 1)
            ),
            ["cka.csv line 1: missing column(s) metric; required columns:"],
        ),
        (lambda b: None, []),  # control: the intact bundle replays
    ],
    ids=["broken-results-json", "no-weights-csv", "wrong-column", "intact"],
)
def test_from_results_bundle_problems_are_usage_errors(
    run_pytest: Any, tmp_path: Path, damage: Any, needles: list[str]
) -> None:
    bundle = _bundle(tmp_path / "bundle")
    damage(bundle)
    result = run_pytest("--from-results", str(bundle), timeout=180)
    if needles:
        _usage_error(result, *needles)
    else:
        text = "\n".join(result.outlines + result.errlines)
        assert result.ret != USAGE_ERROR and "Traceback" not in text, text[-3000:]
