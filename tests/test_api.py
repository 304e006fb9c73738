"""``reasondiff.compare`` -> ``Comparison``: keywords, argument checks, failures kept, and
verdicts, frames and the written bundle equal to a pytest run's (issue 18.2, issue 15.7)."""

from __future__ import annotations

import csv
import inspect
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

import reasondiff.api as api
from reasondiff import compare
from reasondiff.engine import EngineConfig
from reasondiff.errors import ReasondiffError, RegistryError
from reasondiff.findings import FindingOptions
from reasondiff.options import _FLAGS, OPTIONS

REPO = Path(__file__).resolve().parents[1]
MINI_REGISTRY = """
[groups.mini]
description = "three toy descendants"
traces = "toy"
expect = { sft_more_than_rl = true }

[models.mini-massive]
source = "toy:massive"
base = "toy-base"
groups = ["mini"]
expect = { bathtub = true, bathtub_explained = true, weight_distributed = false }

[models.mini-sft]
source = "toy:sft-a"
base = "toy-base"
method = "SFT"
groups = ["mini"]
expect = { bathtub = false, weight_distributed = true }

[models.mini-rl]
source = "toy:rl-a"
base = "toy-base"
method = "RL"
groups = ["mini"]
expect = { bathtub = false, weight_distributed = true }
"""
#: Small but real: every layer (the bathtub needs the whole curve), fewer resamples.
FAST = {"bootstrap": 200, "torch_threads": 1}


# ---------------------------------------------------------------- keywords (one table)
def test_every_engine_option_is_a_keyword_with_the_pytest_default() -> None:
    params = inspect.signature(compare).parameters
    table = {o.dest: o.default for o in OPTIONS}
    flags = {dest for _flag, dest, _text in _FLAGS}
    engine = [f.name for f in fields(EngineConfig) if f.name != "cache_dir"]
    for name in [*engine, *(f.name for f in fields(FindingOptions))]:
        assert name in params, f"compare() has no keyword {name!r}"
        p = params[name]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, name
        want = False if name in flags else table[name]
        assert p.default == want, f"{name}: compare() default {p.default!r}, pytest {want!r}"
    # the five the issue found missing
    for name in ("trust_remote_code", "allow_pickle", "pass_size", "torch_threads"):
        assert name in params
    assert "diff_cache_cap" in params


# ---------------------------------------------------------------- checks before any work
@pytest.fixture
def no_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the engine was created: the argument was not checked first")

    monkeypatch.setattr(api, "Engine", refuse)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"descendants": []}, "compare(descendants=[]) has nothing to compare"),
        (
            {"descendants": "toy:rl-a"},
            "got the single value 'toy:rl-a'; write descendants=['toy:rl-a']",
        ),
        ({"descendants": ["toy:rl-a"], "method": "DPO"}, "compare(method='DPO'): not one of"),
        ({"descendants": ["toy:rl-a"], "dominant_k": 0}, "dominant_k must be an integer >= 1"),
        ({"descendants": ["toy:rl-a"], "device": "tpu"}, "device 'tpu' is not one of"),
        ({"descendants": ["toy:rl-a"], "bathtub_band": (0.8, 0.2)}, "bathtub_band"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(no_engine, kwargs, message) -> None:
    with pytest.raises((ReasondiffError, TypeError)) as info:  # a string: TypeError
        compare("no/such-base", **kwargs)
    assert message in str(info.value)


def test_a_method_for_a_registry_model_is_refused(no_engine) -> None:
    with pytest.raises(RegistryError, match=r"'toy-rl-a' with method RL; method='SFT'"):
        compare("toy:base", ["toy:rl-a"], method="SFT")


def test_frames_without_pandas_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    comparison = api.Comparison(
        [],
        [],
        finding_options=FindingOptions.defaults(),
        group_expect={},
        config={},
        cache=api.CacheStats(),
        stage_seconds={},
        notes=[],
    )
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"reasondiff\[frames\]"):
        comparison.frames()


# ---------------------------------------------------------------- on the toy family
@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from reasondiff.fixtures.toy import ensure_toy_model

    root = tmp_path_factory.mktemp("api-toy")
    for recipe in ("base", "massive", "sft-a", "rl-a"):
        ensure_toy_model(root / "toy", recipe)
    return root


@pytest.fixture(scope="module")
def mini_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("api-registry") / "mini.toml"
    path.write_text(MINI_REGISTRY)
    return path


@pytest.fixture(scope="module")
def pytest_run(toy_cache: Path, mini_registry: Path, tmp_path_factory: pytest.TempPathFactory):
    """The finding suite on the mini group, with --report-dir: the reference."""
    out = tmp_path_factory.mktemp("api-pytest-report")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env.update(HF_HUB_OFFLINE="1", NO_COLOR="1", COLUMNS="200")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "diffs",
        "-p",
        "no:cacheprovider",
        "-n",
        "0",
        "-q",
        "--registry",
        str(mini_registry),
        "--model-group",
        "mini",
        "--diff-cache",
        str(toy_cache),
        "--report-dir",
        str(out),
        "--bootstrap",
        str(FAST["bootstrap"]),
        "--torch-threads",
        "1",
        "--snapshot-dir",
        str(tmp_path_factory.mktemp("api-snapshots")),
        "--snapshot-update",  # a fresh scope: accept the curves, so every test must pass
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert (out / "results.json").is_file()
    # the terminal report, beside the bundle (not in it: write() must match the folder)
    out.with_name(out.name + "-stdout.txt").write_text(proc.stdout)
    return out


@pytest.fixture(scope="module")
def comparison(toy_cache: Path, mini_registry: Path, pytest_run: Path) -> api.Comparison:
    sets = json.loads((pytest_run / "results.json").read_text())["pairs"][0]["trace_sets"]
    return compare(
        "toy-base",
        ["mini-massive", "mini-rl", "mini-sft"],
        traces=["toy"] * len(sets),  # toy set a, and set b when pytest had two
        registry=[mini_registry],
        cache_dir=toy_cache,
        **FAST,
    )


def _csv_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


@pytest.mark.slow
def test_compare_verdicts_equal_pytests(comparison, pytest_run: Path) -> None:
    doc = json.loads((pytest_run / "results.json").read_text())
    want = {(v["subject"], v["finding"]): v for v in doc["verdicts"]}
    got = {(v.subject, v.finding): v for v in comparison.verdicts()}
    assert set(got) == set(want)
    for key, v in got.items():
        w = want[key]
        assert (v.observed, v.expected, v.status) == (w["observed"], w["expected"], w["status"])
        assert v.summary == w["summary"], key
        assert json.loads(json.dumps(v.details)) == w["details"], key
    massive = comparison[0]
    assert massive.info.pair_id == "toy-base__mini-massive"
    assert massive.verdicts["bathtub"].status == "pass"  # planted, and a negative control:
    assert comparison[2].verdicts["bathtub"].observed is False  # SFT has no dip
    assert [v.finding for v in comparison.group_verdicts] == ["sft_more_than_rl"]
    assert comparison.group_verdicts[0].status == "pass"


@pytest.mark.slow
def test_curves_carry_the_bootstrap_interval(comparison) -> None:
    curve = comparison[0].curves["linear"]
    assert curve.layers == list(range(len(curve.mean)))
    assert all(lo <= m <= hi for lo, m, hi in zip(curve.lo, curve.mean, curve.hi, strict=True))
    assert any(hi > lo for lo, hi in zip(curve.lo, curve.hi, strict=True))


@pytest.mark.slow
def test_write_writes_what_report_dir_writes(comparison, pytest_run: Path, tmp_path: Path) -> None:
    out = comparison.write(tmp_path / "nb")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in pytest_run.iterdir())
    for name in ("weights.csv", "cka.csv", "massive.csv", "dominant.csv"):
        assert (out / name).read_text() == (pytest_run / name).read_text(), name
    mine, theirs = (json.loads((d / "results.json").read_text()) for d in (out, pytest_run))
    assert mine["pairs"] == theirs["pairs"]
    assert mine["verdicts"] == theirs["verdicts"]


@pytest.mark.slow
def test_frames_row_counts_equal_the_bundle(comparison, pytest_run: Path) -> None:
    pytest.importorskip("pandas")
    frames = comparison.frames()
    assert set(frames) == {"weights", "cka", "massive", "dominant", "verdicts"}
    for name in ("weights", "cka", "massive", "dominant"):
        rows = _csv_rows(pytest_run / f"{name}.csv")
        assert list(frames[name].columns) == rows[0], name
        assert len(frames[name]) == len(rows) - 1, name
    doc = json.loads((pytest_run / "results.json").read_text())
    assert len(frames["verdicts"]) == len(doc["verdicts"])
    assert len(frames["dominant"]) == doc["files"]["dominant.csv"]["rows"] > 0
    sink = frames["dominant"][frames["dominant"]["position"] == 0]
    assert set(sink["token"]) == {"<|bos|>"}  # position 0 of every toy trace


@pytest.mark.slow
def test_the_pytest_report_names_the_planted_sink_and_no_dip_for_sft(pytest_run: Path) -> None:
    """The session's report (a live pytest run): toy-massive's dip is carried by BOS."""
    text = pytest_run.with_name(pytest_run.name + "-stdout.txt").read_text()
    lines = [ln.strip() for ln in text.splitlines()]
    dip = [ln for ln in lines if ln.startswith("mini-massive dominant in dip (layers ")]
    assert len(dip) == 1 and "): '<|bos|>' 16/16 traces (position 0)" in dip[0], dip
    for control in ("mini-sft", "mini-rl"):
        mine = [ln for ln in lines if ln.startswith(f"{control} ") and "dominant" in ln]
        assert mine and not any("in dip" in ln for ln in mine), (control, mine)
    rows = _csv_rows(pytest_run / "dominant.csv")
    header = rows[0]
    named = [dict(zip(header, r, strict=True)) for r in rows[1:]]
    assert any(
        r["descendant"] == r["model"] == "mini-massive"
        and (r["position"], r["token_id"], r["token"]) == ("0", "1", "<|bos|>")
        for r in named
    )


@pytest.mark.slow
def test_report_prints_the_terminal_report(comparison, capsys) -> None:
    comparison.report(width=200)
    text = capsys.readouterr().out
    assert "mini-massive" in text and "SFT vs RL" in text
    from reasondiff.reports.figures import build_figure_1

    fig = build_figure_1(comparison.report_data())  # the README's notebook figure
    assert fig is not None and fig.axes


@pytest.mark.slow
def test_a_failed_descendant_is_kept_and_the_rest_returned(toy_cache: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-checkpoint")
    got = compare("toy:base", ["toy:massive", missing], cache_dir=toy_cache, **FAST)
    assert len(got) == 2
    ok, failed = got
    assert ok.error is None and ok.cka and ok.verdicts
    assert failed.error is not None and "no-such-checkpoint" in failed.error
    assert not failed.ok and not failed.cka and not failed.verdicts
    assert got.failed == [failed]
    assert repr(got) == (
        f"<Comparison of 2 pair(s), 1 failed: {ok.info.pair_id}, {failed.info.pair_id}>"
    )
    assert failed.info.pair_id.endswith("no-such-checkpoint"), failed.info.pair_id
    with pytest.raises(ReasondiffError, match="no-such-checkpoint"):
        compare("toy:base", [missing], cache_dir=toy_cache, raise_on_error=True, **FAST)


def test_a_broken_or_failed_pair_never_raises_out_of_the_comparison() -> None:
    import math

    from test_findings_lib import DIP, _result

    from reasondiff.records import CkaRecord
    from reasondiff.registry import ModelSpec, PairSpec

    base = ModelSpec(key="b", source="b")
    pairs = [
        PairSpec(base, ModelSpec(key=k, source=k, base="b", method=m), group=None)
        for k, m in (("sft", "SFT"), ("rl", "RL"))
    ]
    broken = _result(DIP, pid="b__sft")
    broken.cka[0] = CkaRecord("b", "d", "a:0", 0, "linear", math.nan)
    failed = api._failed(pairs[1], OSError("disk gone"))
    comparison = api.Comparison(
        [broken, failed],
        pairs,
        finding_options=FindingOptions.defaults(),
        group_expect={"sft_more_than_rl": True},
        config={},
        cache=api.CacheStats(),
        stage_seconds={},
        notes=[],
    )
    assert broken.verdicts["bathtub"].observed is None  # named, not raised
    assert "layer 0, trace a:0" in broken.verdicts["bathtub"].summary
    assert failed.error == "OSError: disk gone" and comparison.failed == [failed]
    (group,) = comparison.group_verdicts
    assert group.observed is None and "rl failed" in group.summary
    data = comparison.report_data()
    assert any("b__rl: failed: OSError: disk gone" in n for n in data.notes)


@pytest.mark.slow
def test_each_trace_sets_generator_is_in_the_notes_and_both_bundles(
    comparison, pytest_run: Path, tmp_path: Path
) -> None:
    for res in comparison:
        named = [n for n in res.notes if n.startswith("trace set ") and "generated by" in n]
        assert len(named) == len(res.trace_sets), res.notes
    comparison.write(tmp_path / "w")
    ours = json.loads((tmp_path / "w" / "results.json").read_text())["config"]
    theirs = json.loads((pytest_run / "results.json").read_text())["config"]
    assert set(ours["trace_generators"]) == set(comparison[0].trace_sets)
    assert ours["trace_generators"] == theirs["trace_generators"]
