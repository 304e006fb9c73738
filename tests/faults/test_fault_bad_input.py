"""Issue 15.2-15.7: bad input is named up front, once, as a usage error; nothing crashes.

Each case was, before the fix, accepted in silence, a traceback, a per-test error, a
late error after the models were loaded, or a crash. End-to-end cases run pytest in a
scratch project (``run_pytest``); ``compare()`` and the pure checks run in process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reasondiff.errors import ReasondiffError
from reasondiff.records import CkaRecord, PairInfo, PairResult, WeightRecord

USAGE_ERROR = pytest.ExitCode.USAGE_ERROR


def _text(result: Any) -> str:
    return "\n".join(result.outlines + result.errlines)


def _usage_error(result: Any, *needles: str) -> str:
    text = _text(result)
    assert result.ret == USAGE_ERROR, text[-3000:]
    assert "Traceback (most recent call last)" not in text and "INTERNALERROR" not in text
    for needle in needles:
        assert needle in text, (needle, text[-3000:])
    return text


def _bundle(
    root: Path, config: dict[str, Any] | None = None, *, notes: list[str] | None = None
) -> Path:
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
        notes=list(notes or []),
    )
    write_bundle(root, [res], [], config=config or {"device": "cpu", "dtype": "auto"})
    return root


# --------------------------------------------------------------------- 15.3 replay options
@pytest.mark.parametrize(
    "extra",
    [
        ["--layers", "0,1"],
        ["--max-tokens", "5"],
        ["--device", "cuda"],
        ["--traces", "/no/such/traces.jsonl"],
        ["--model-group", "distill7b"],
    ],
    ids=["layers", "max-tokens", "device", "traces", "model-group"],
)
def test_replay_refuses_options_it_cannot_honour(
    run_pytest: Any, tmp_path: Path, extra: list[str]
) -> None:
    bundle = _bundle(tmp_path / "bundle")
    result = run_pytest("--from-results", str(bundle), *extra, timeout=120)
    _usage_error(result, f"--from-results {bundle} replays measured results", extra[0])


def test_replay_notes_harmless_options(run_pytest: Any, tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle")
    result = run_pytest(
        "--from-results", str(bundle), "--torch-threads", "1", "-k", "weight", timeout=120
    )
    text = _text(result)
    assert result.ret != USAGE_ERROR, text[-3000:]
    assert "--torch-threads ignored: --from-results replays" in text, text[-3000:]


def test_a_replayed_bundle_keeps_the_bundles_device_and_dtype(
    run_pytest: Any, tmp_path: Path
) -> None:
    bundle = _bundle(tmp_path / "bundle", {"device": "cuda", "dtype": "bfloat16", "layers": None})
    out = tmp_path / "again"
    result = run_pytest(
        "--from-results", str(bundle), "--report-dir", str(out), "-k", "weight", timeout=120
    )
    assert (out / "results.json").is_file(), _text(result)[-3000:]
    config = json.loads((out / "results.json").read_text())["config"]
    assert (config["device"], config["dtype"]) == ("cuda", "bfloat16"), config
    assert config["replayed_from"] == [str(bundle)]


def test_from_results_naming_a_file_is_a_usage_error(run_pytest: Any, tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle")
    result = run_pytest("--from-results", str(bundle / "results.json"), timeout=120)
    _usage_error(result, "is a file; --from-results takes the bundle directory", str(bundle))


@pytest.mark.parametrize(("name", "rows"), [("cka.csv", 3), ("massive.csv", 0)])
def test_a_listed_csv_missing_from_the_bundle_is_named_not_skipped(
    run_pytest: Any, tmp_path: Path, name: str, rows: int
) -> None:
    """Before: a note, and every pair replayed as "weights only"."""
    bundle = _bundle(tmp_path / "bundle")
    (bundle / name).unlink()
    result = run_pytest("--from-results", str(bundle), timeout=120)
    _usage_error(
        result, f"{name}: missing from the bundle, although results.json records {rows} rows"
    )


def test_a_replays_terminal_report_never_shows_this_machines_device_or_dtype(
    run_pytest: Any, tmp_path: Path
) -> None:
    note = "activations computed in bfloat16; --dtype bfloat16 on cuda"
    bundle = _bundle(
        tmp_path / "bundle", {"device": "cuda", "dtype": "bfloat16", "layers": None}, notes=[note]
    )
    result = run_pytest("--from-results", str(bundle), "-k", "weight", timeout=120)
    text = _text(result)
    assert result.ret == 0, text[-3000:]
    assert "reasondiff" in text and "b__d" in text, text[-3000:]  # the report was drawn
    assert "on cpu" not in text and "--dtype auto" not in text, text[-3000:]
    assert note in " ".join(text.split()), text[-3000:]  # the bundle's own, as recorded


def test_cka_cut_at_a_line_boundary_is_named_not_skipped(run_pytest: Any, tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle")
    lines = (bundle / "cka.csv").read_text().splitlines(keepends=True)
    (bundle / "cka.csv").write_text("".join(lines[:1]))  # header only: every pair "weights only"
    result = run_pytest("--from-results", str(bundle), timeout=120)
    _usage_error(result, "cka.csv: 0 rows found, results.json records 3")


# --------------------------------------------------------------------- 15.4 registry
@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        (
            '[groups.g]\n[models.ms]\nsource = "toy:copy"\nbase = "ms"\ngroups = ["g"]\n',
            "[models.ms]: the model is its own base",
        ),
        (
            '[groups.g]\n[models.a]\nsource = "toy:copy"\nbase = "b"\ngroups = ["g"]\n'
            '[models.b]\nsource = "toy:massive"\nbase = "a"\ngroups = ["g"]\n',
            "the bases form a cycle: a -> b -> a",
        ),
        (
            '[models.m]\nsource = "toy:copy"\nbase = "toy-base"\ngroups = ["nowhere"]\n',
            "[models.m]: group(s) 'nowhere' not declared",
        ),
    ],
    ids=["self-base", "cycle", "undeclared-group"],
)
def test_bad_registry_is_a_usage_error_naming_models_and_file(
    run_pytest: Any, tmp_path: Path, toml: str, needle: str
) -> None:
    reg = tmp_path / "bad.toml"
    reg.write_text(toml, "utf-8")
    _usage_error(run_pytest("--registry", str(reg), "--co", timeout=120), str(reg), needle)


# --------------------------------------------------------------------- 15.5 bounds
def test_torch_threads_beyond_the_bound_is_a_usage_error(run_pytest: Any) -> None:
    _usage_error(run_pytest("--torch-threads", "100000", "--co", timeout=120), "--torch-threads")


@pytest.mark.parametrize("value", ["0", "3"])
def test_max_tokens_follows_one_rule(run_pytest: Any, value: str) -> None:
    _usage_error(
        run_pytest("--max-tokens", value, "--co", timeout=120), "--max-tokens", "at least 4"
    )


def test_dominant_k_beyond_the_traces_is_named_before_models_load(
    run_pytest: Any, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    result = run_pytest("--dominant-k", "100000", "--diff-cache", str(cache), timeout=300)
    _usage_error(result, "--dominant-k 100000 is too large for trace")
    built = sorted(p.parent.name for p in cache.rglob("toy_recipe.json"))
    assert built == [], f"models built before the error: {built}"


#: compare()'s default traces are toy set a, whose shortest trace has 181 tokens: k = 89
#: passes "k <= N" but its up to 2k = 178 removed rows leave 3 < 4 (MIN_ROWS_LEFT).
K_TOO_LARGE = 89


def test_dominant_k_whose_2k_rows_leave_too_few_is_named_before_models_load(
    run_pytest: Any, tmp_path: Path
) -> None:
    # pytest compares on sets a and b; b's shortest trace has 148 tokens: 144 < 2 x 73 <= 296
    cache = tmp_path / "cache"
    result = run_pytest("--dominant-k", "73", "--diff-cache", str(cache), timeout=300)
    _usage_error(
        result,
        "--dominant-k 73 is too large for trace 'toy-b:b-011' (148 tokens, after --max-tokens)",
        "removing up to 2k = 146 dominant tokens (the top 73 of each side) must leave at "
        "least 4 for CKA; give --dominant-k 72 or less",
    )
    built = sorted(p.parent.name for p in cache.rglob("toy_recipe.json"))
    assert built == [], f"models built before the error: {built}"


@pytest.mark.parametrize(
    ("n", "k", "ok"),
    [
        (10, 3, True),  # 2k = 6 = N - 4: four rows left
        (10, 4, False),  # N - 4 < 2k <= 2N: k <= N, yet only 2 rows may be left
        (10, 5, False),
        (10, 10, False),  # 2k = 2N
        (5, 1, False),  # no k fits a 5-token trace
    ],
)
def test_dominant_k_bound_is_2k_at_most_n_minus_the_rows_cka_needs(
    n: int, k: int, ok: bool
) -> None:
    from reasondiff.metrics.defaults import MIN_ROWS_LEFT
    from reasondiff.metrics.dominant import MIN_ROWS_LEFT as ABLATION_MIN
    from reasondiff.preflight import PreflightError, check_dominant_k

    assert MIN_ROWS_LEFT is ABLATION_MIN == 4  # one place for the fact
    if ok:
        check_dominant_k(k, {"s:t": n})
        return
    with pytest.raises(PreflightError, match=rf"^--dominant-k {k} is too large for trace 's:t'"):
        check_dominant_k(k, {"s:t": n})


def test_layers_beyond_the_depth_is_one_usage_error(run_pytest: Any, tmp_path: Path) -> None:
    result = run_pytest(
        "--layers", "0,99", "--diff-cache", str(tmp_path / "cache"), "-k", "bathtub", timeout=300
    )
    text = _usage_error(result, "--layers: layer(s) 99 beyond the depth of")
    assert text.count("beyond the depth") == 1, text[-3000:]


def _long_trace(path: Path, n: int) -> Path:
    path.write_text(json.dumps({"id": "long", "text": "x", "token_ids": [1] * n}) + "\n", "utf-8")
    return path


#: 12 000 tokens: RBF CKA's N x N kernels need about 4.3 GiB per layer, over the 4 GiB budget.
LONG = 12_000


@pytest.mark.parametrize("verbosity", [["-v"], []], ids=["header", "quiet"])
def test_rbf_budget_is_in_the_report_header_before_any_test(
    run_pytest: Any, tmp_path: Path, verbosity: list[str]
) -> None:
    """End to end: pytest_report_header (or, under -q, the session start) says it first."""
    trace = _long_trace(tmp_path / "long.jsonl", LONG)
    result = run_pytest(
        "--traces", str(trace), "--max-tokens", str(LONG), "--diff-cache", str(tmp_path / "c"),
        "-k", "no_test_has_this_name", *verbosity, timeout=120,
    )  # fmt: skip
    text = _text(result)
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED, text[-3000:]
    (line,) = [ln for ln in result.outlines if "RBF CKA over a trace" in ln]
    assert line.startswith(f"reasondiff: RBF CKA over a trace of {LONG} tokens needs N^2 = 1.4e+08")
    assert "--max-tokens 11585 keeps it within budget" in line, line
    first = result.outlines.index(line)
    later = [i for i, ln in enumerate(result.outlines) if "deselected" in ln or "collected" in ln]
    assert later and first < min(later), text[-3000:]


def test_compare_warns_of_the_rbf_budget_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import warnings

    from reasondiff import api
    from reasondiff.errors import RbfBudgetWarning

    def no_work(*args: Any, **kw: Any) -> Any:
        raise AssertionError("compare() started work before warning of the RBF budget")

    monkeypatch.setattr(api.Engine, "pair_result", no_work)
    trace = _long_trace(tmp_path / "long.jsonl", LONG)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RbfBudgetWarning)  # the warning stops compare() here
        with pytest.raises(RbfBudgetWarning, match=r"N\^2 = 1\.4e\+08 pairs.*max_tokens 11585"):
            api.compare("toy:base", ["toy:copy"], traces=trace, cache_dir=tmp_path, max_tokens=LONG)
    with pytest.warns(RbfBudgetWarning, match="RBF CKA over a trace of 12000 tokens") as seen:
        got = api.compare(
            "toy:base", ["toy:copy"], traces=trace, cache_dir=tmp_path, max_tokens=LONG
        )
    assert len(seen) == 1 and seen[0].filename == __file__  # attributed to the caller
    assert any("RBF CKA over a trace" in n for n in got.notes)  # and kept in the notes
    assert got.failed and "started work" in (got[0].error or "")


def test_rbf_budget_is_stated_with_the_estimate_and_the_option(tmp_path: Path) -> None:
    from reasondiff.preflight import check_run

    trace = {"id": "long", "text": "x", "token_ids": [1] * 100_000}
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(trace) + "\n", "utf-8")
    notes = check_run(
        layers=None, dominant_k=10, max_tokens=100_000, pairs=[],
        trace_paths=lambda: [path], toy_root=lambda: tmp_path,
    )  # fmt: skip
    assert len(notes) == 1 and "N^2 = 1e+10 pairs" in notes[0] and "--max-tokens" in notes[0]
    short = check_run(
        layers=None, dominant_k=10, max_tokens=4096, pairs=[],
        trace_paths=lambda: [path], toy_root=lambda: tmp_path,
    )  # fmt: skip
    assert short == []


# --------------------------------------------------------------------- 15.6 paths, names
def test_snapshot_dir_naming_a_file_is_a_usage_error(run_pytest: Any, tmp_path: Path) -> None:
    f = tmp_path / "not-a-dir"
    f.write_text("x")
    _usage_error(
        run_pytest("--snapshot-dir", str(f), "--co", timeout=120),
        "--snapshot-dir",
        "is a file, not a directory",
    )


def test_diff_cache_cap_zero_is_documented(run_pytest: Any) -> None:
    out = " ".join(_text(run_pytest("--help", timeout=120)).split())
    assert "0 or none: no cap" in out


def test_stream_blocks_with_from_results_is_noted_as_ignored(
    run_pytest: Any, tmp_path: Path
) -> None:
    bundle = _bundle(tmp_path / "bundle")
    result = run_pytest("--from-results", str(bundle), "--stream-blocks", "-k", "weight")
    text = " ".join(_text(result).split())
    assert result.ret == 0, text[-3000:]
    assert "--stream-blocks ignored: --from-results replays" in text, text[-3000:]


def test_labels_that_share_a_scope_collide_loudly(tmp_path: Path) -> None:
    from reasondiff.snapshots import claim_label_scope

    claim_label_scope(tmp_path, "a-b", write=True)
    claim_label_scope(tmp_path, "a-b", write=True)  # the same series again: fine
    with pytest.raises(ReasondiffError, match=r"--label 'a/b' and --label 'a-b' share"):
        claim_label_scope(tmp_path, "a/b", write=True)


# --------------------------------------------------------------------- 15.7 compare()
@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"descendants": []}, ReasondiffError, "compare(descendants=[]) has nothing"),
        ({"descendants": "toy:rl-a"}, TypeError, "descendants=['toy:rl-a']"),
        ({"descendants": ["toy-rl-a"], "method": "DPO"}, ReasondiffError, "method='DPO'"),
        ({"descendants": ["toy:copy"], "dominant_k": 0}, ReasondiffError, "dominant_k"),
        ({"descendants": ["toy:copy"], "max_tokens": 2}, ReasondiffError, "max_tokens 2"),
        (
            {"descendants": ["toy:copy"], "torch_threads": 100000},
            ReasondiffError,
            "compare(): torch_threads 100000 is out of range: give 1..",
        ),
        (
            {"descendants": ["toy:copy"], "dominant_k": K_TOO_LARGE},
            ReasondiffError,
            f"dominant_k {K_TOO_LARGE} is too large for trace 'toy-a:a-010' (181 tokens, after max_tokens)",
        ),
    ],
    ids=[
        "empty",
        "string",
        "unknown-method",
        "dominant-k-0",
        "max-tokens",
        "torch-threads",
        "dominant-k-2k",
    ],
)
def test_compare_checks_its_arguments_before_any_work(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kwargs: dict[str, Any],
    error: type,
    needle: str,
) -> None:
    from reasondiff import api

    def no_work(*args: Any, **kw: Any) -> Any:
        raise AssertionError("compare() started work before checking its arguments")

    monkeypatch.setattr(api.Engine, "pair_result", no_work)
    base = "no-such-base" if kwargs["descendants"] == [] else "toy:base"
    with pytest.raises(error) as info:
        api.compare(base, cache_dir=tmp_path, **kwargs)
    assert needle in str(info.value)
