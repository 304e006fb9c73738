"""Options, validation and parametrization of the reasondiff plugin (no models are loaded)."""

from __future__ import annotations

from typing import Any

import pytest

from reasondiff.options import parse_bytes, parse_layers

pytest_plugins = ["pytester"]

TOY_IDS = [
    "toy-base__toy-copy",
    "toy-base__toy-local",
    "toy-base__toy-massive",
    "toy-base__toy-rl-a",
    "toy-base__toy-rl-b",
    "toy-base__toy-sft-a",
    "toy-base__toy-sft-b",
]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--model-group", "nope"], "choose one of: distill1.5b, distill7b, qwenmath7b, toy"),
        (["--device", "tpu"], "--device 'tpu' is not one of: auto, cpu, cuda"),
        (["--dtype", "int8"], "--dtype 'int8' is not one of: auto, float32, bfloat16, float16"),
        (
            ["--base", "toy:base", "--candidate", "toy:copy", "--method", "DPO"],
            "--method 'DPO' is not one of SFT, RL, SFT+RL",
        ),
        (["--base", "toy:base"], "--base and --candidate go together"),
        (["--label", "x"], "--label and --method describe an ad-hoc pair"),
        (["--layers", "3-1"], "--layers: bad layer range '3-1'"),
        (["--layers", "a,b"], "--layers: bad layer item 'a'"),
        (["--diff-cache-cap", "lots"], "--diff-cache-cap: 'lots' is not a size"),
        (["--sft-rl-ratio", "0"], "--sft-rl-ratio: '0' must be a number > 0"),
        (["--rbf-median", "diag"], "--rbf-median: 'diag' is not one of: offdiag, all"),
        (["--bathtub-band", "0.9,0.1"], "--bathtub-band: '0.9,0.1' is not a band"),
        (["--curve-atol", "-1"], "--curve-atol: '-1' must be a number >= 0"),
        (["--max-tokens", "0"], "--max-tokens: 0 is below 4"),
        (["--from-results", "no-such-dir"], "no-such-dir"),
    ],
)
def test_bad_option_is_a_usage_error_naming_the_choices(
    pytester: pytest.Pytester, args: list[str], fragment: str
) -> None:
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert fragment in result.stderr.str()


def test_bad_ini_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nbathtub_delta = deep\n")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert (
        "ini option bathtub_delta: could not convert string to float: 'deep'" in result.stderr.str()
    )


def test_ini_sets_defaults_and_the_command_line_wins(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\ndiff_cache = cache-from-ini\nbathtub_delta = 0.25\ndevice = cpu\ncurve_atol = 0.5\n"
    )
    pytester.makepyfile(
        """
        import os

        def test_options(diff_options):
            assert diff_options.diff_cache == "cache-from-ini"
            assert diff_options.device == "cpu"
            assert diff_options.curve_atol == 0.5
            assert diff_options.bathtub_delta == float(os.environ["EXPECTED_DELTA"])
            assert diff_options.localization_max_gini == 0.5  # documented default
        """
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXPECTED_DELTA", "0.25")
        assert pytester.runpytest().ret == 0
        mp.setenv("EXPECTED_DELTA", "0.75")
        assert pytester.runpytest("--bathtub-delta", "0.75").ret == 0
        assert pytester.runpytest().ret == pytest.ExitCode.TESTS_FAILED


def test_help_documents_options_and_defaults(pytester: pytest.Pytester) -> None:
    out = " ".join(pytester.runpytest("--help").stdout.str().split())  # help text wraps
    for text in (
        "--model-group",
        "--traces-alt",
        "--diff-cache-cap",
        "--from-results",
        "--require-models",
        "bathtub: minimum drop of the dip below both its sides (default 0.25)",
        "(default 0.15,0.85)",
        "--sft-rl-ratio",
        "(default 2)",
        "--rbf-median",
        "(default offdiag)",
        "curve snapshots: absolute tolerance per layer (default 0.02)",
        "diff_cache (string)",
        "--pass-size",
    ):
        assert text in out, text
    assert "%%" not in out  # argparse's escape must not leak into the ini help


def test_pairs_parametrize_in_a_stable_order_with_group_tests_last(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        def test_group(base_subject):
            pass

        def test_pair(pair):
            pass
        """
    )
    result = pytester.runpytest("--co", "-q")
    ids = [line.split("::", 1)[1] for line in result.outlines if "::" in line]
    assert ids == [f"test_pair[{i}]" for i in TOY_IDS] + ["test_group[base:toy-base]"]


def test_adhoc_pair_id_uses_the_label(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_pair(pair):\n    assert pair.expect == {}\n")
    args = ["--base", "toy:base", "--candidate", "toy:massive", "--co", "-q"]
    assert "test_pair[toy-base__toy-massive]" in pytester.runpytest(*args).stdout.str()
    labelled = pytester.runpytest(*args, "--label", "My Series 2")
    assert "test_pair[my-series-2]" in labelled.stdout.str()


def test_extra_registry_file_adds_a_group(pytester: pytest.Pytester) -> None:
    reg = pytester.makefile(
        ".toml",
        extra='[groups.mine]\n[models.mine]\nsource = "toy:copy"\nbase = "toy-base"\nmethod = "RL"\n'
        'groups = ["mine"]\nexpect = { bathtub = true }\n',
    )
    pytester.makepyfile("def test_pair(pair):\n    assert pair.expect == {'bathtub': True}\n")
    result = pytester.runpytest("--registry", str(reg), "--model-group", "mine", "-q")
    result.assert_outcomes(passed=1)
    bad = pytester.runpytest("--registry", str(pytester.path / "missing.toml"))
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    assert "cannot read registry file" in bad.stderr.str()


@pytest.mark.parametrize(
    ("args", "suffix"),
    [
        (["-n", "2"], "@toy-base__toy-copy"),
        (["--tx", "2*popen"], "@toy-base__toy-copy"),
        (["-n", "2", "--dist", "load"], None),
    ],
)
def test_n_without_dist_means_loadgroup(
    pytester: pytest.Pytester, args: list[str], suffix: str | None
) -> None:
    pytester.makepyfile("def test_pair(pair):\n    pass\n")
    result = pytester.runpytest_subprocess(*args, "-v", "-p", "no:cacheprovider")
    assert result.ret == 0
    line = next(
        ln for ln in result.outlines if "test_pair[toy-base__toy-copy]" in ln and "PASSED" in ln
    )
    if suffix:
        assert suffix in line
    else:
        assert "@" not in line


def test_collect_only_of_the_suite_succeeds(pytester: pytest.Pytester, copy_project: Any) -> None:
    """syrupy would count the committed curve snapshots as unused and fail a listing."""
    copy_project(pytester.path)
    result = pytester.runpytest_subprocess("diffs", "--co", "-q", "-p", "no:cacheprovider")
    assert result.ret == 0
    assert "snapshots unused" not in result.stdout.str()
    assert any("test_curves[toy-base__toy-massive]" in line for line in result.outlines)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0,4,8-12", (0, 4, 8, 9, 10, 11, 12)), ("3, 1,1", (1, 3)), ("all", None), ("", None)],
)
def test_parse_layers(text: str, expected: tuple[int, ...] | None) -> None:
    assert parse_layers(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1000", 1000),
        ("512M", 512 << 20),
        ("50G", 50 << 30),
        ("1.5t", int(1.5 * (1 << 40))),
        ("0", None),
        ("none", None),
    ],
)
def test_parse_bytes(text: str, expected: int | None) -> None:
    assert parse_bytes(text) == expected


def test_rbf_median_from_ini_and_command_line(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nrbf_median = all\n")
    pytester.makepyfile(
        """
        import os

        def test_options(diff_options):
            assert diff_options.rbf_median == os.environ["EXPECTED_MEDIAN"]
            assert diff_options.to_dict()["rbf_median"] == diff_options.rbf_median
        """
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXPECTED_MEDIAN", "all")
        assert pytester.runpytest().ret == 0
        mp.setenv("EXPECTED_MEDIAN", "offdiag")
        assert pytester.runpytest("--rbf-median", "OFFDIAG").ret == 0
