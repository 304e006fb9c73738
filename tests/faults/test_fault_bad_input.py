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


def _bundle(root: Path, config: dict[str, Any] | None = None) -> Path:
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
    _usage_error(result, "--dominant-k 100000 is larger than trace")
    built = sorted(p.parent.name for p in cache.rglob("toy_recipe.json"))
    assert built == [], f"models built before the error: {built}"


def test_layers_beyond_the_depth_is_one_usage_error(run_pytest: Any, tmp_path: Path) -> None:
    result = run_pytest(
        "--layers", "0,99", "--diff-cache", str(tmp_path / "cache"), "-k", "bathtub", timeout=300
    )
    text = _usage_error(result, "--layers: layer(s) 99 beyond the depth of")
    assert text.count("beyond the depth") == 1, text[-3000:]


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
    ],
    ids=["empty", "string", "unknown-method", "dominant-k-0", "max-tokens"],
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
