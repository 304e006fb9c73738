"""End to end: the ``diffs/`` suite on the toy family, run in subprocesses (and pytester).

One cold run builds the toy family and fills a shared diff cache; every other run here
is warm (it must compute no activation) and compares its verdicts with the cold run's:
``-n 2``, ``--tx 2*popen``, ``--from-results`` (no torch import at all), a registry
that inverts every observed verdict (each finding test must then fail, in one line),
real-model groups without weights (skips, or failures with ``--require-models``) and the
snapshot workflow of an ad-hoc ``--label`` series.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from reasondiff.registry import Registry

# One worker runs the whole module (loadgroup): its cold run fills the cache once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("toy-suite-e2e")]
pytest_plugins = ["pytester"]

FINDING_TESTS = {
    "bathtub": "test_bathtub",
    "bathtub_explained": "test_bathtub_explained_by_dominant_datapoints",
    "final_layer_lowest": "test_final_layer_lowest",
    "weight_distributed": "test_weight_change_distributed",
    "trace_invariant": "test_trace_invariance",
    "sft_more_than_rl": "test_sft_changes_more_than_rl",
}
CACHE_LINE = re.compile(r"reasondiff cache: activations (\d+) computed, (\d+) loaded")
PROBE = """
import json, os, sys

def pytest_sessionfinish(session):
    path = os.environ.get("REASONDIFF_PROBE")
    if path and not hasattr(session.config, "workerinput"):
        mods = {m: m in sys.modules for m in ("torch", "transformers")}
        with open(path, "w") as f:
            json.dump(mods, f)
"""


@dataclass
class Run:
    ret: int
    output: str
    outcomes: dict[str, tuple[str, str]] = field(
        default_factory=dict
    )  # test id -> (outcome, message)
    verdicts: list[dict[str, Any]] = field(default_factory=list)

    def activations_computed(self) -> int:
        m = CACHE_LINE.search(self.output)
        assert m, f"no cache line in the output:\n{self.output[-3000:]}"
        return int(m.group(1))

    def failed(self) -> dict[str, str]:
        return {k: msg for k, (o, msg) in self.outcomes.items() if o in ("failure", "error")}


def run_suite(project: Path, cache: Path, *args: str, env: dict[str, str] | None = None) -> Run:
    """``python -m pytest diffs ...`` in ``project``; outcomes from a junit file."""
    n = len(list(project.glob("junit-*.xml")))
    junit = project / f"junit-{n}.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "diffs",
        "-p",
        "no:cacheprovider",
        "--diff-cache",
        str(cache),
        "--torch-threads",
        "1",
        f"--junitxml={junit}",
        *args,
    ]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    full_env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(project / "hf-home"),
        HF_HUB_CACHE=str(project / "hf-home" / "hub"),
        NO_COLOR="1",
        COLUMNS="200",
    )
    full_env.update(env or {})
    proc = subprocess.run(
        cmd, cwd=project, env=full_env, capture_output=True, text=True, timeout=1200
    )
    run = Run(ret=proc.returncode, output=proc.stdout + proc.stderr)
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome, message = child.tag, child.get("message", "")
            run.outcomes[case.get("name", "")] = (outcome, message)
    return run


def with_bundle(run: Run, report_dir: Path) -> Run:
    results = json.loads((report_dir / "results.json").read_text("utf-8"))
    run.verdicts = sorted(results["verdicts"], key=lambda v: (v["finding"], v["subject"]))
    return run


def verdict_view(run: Run) -> list[tuple[Any, ...]]:
    return [
        (v["finding"], v["subject"], v["observed"], v["expected"], v["summary"])
        for v in run.verdicts
    ]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, copy_project: Callable[[Path], Path]) -> Path:
    root = tmp_path_factory.mktemp("toy-project")
    copy_project(root)
    (root / "reasondiff_probe.py").write_text(PROBE, "utf-8")
    return root


@pytest.fixture(scope="module")
def cold(project: Path, shared_diff_cache: Path) -> Run:
    report = project / "report-cold"
    return with_bundle(run_suite(project, shared_diff_cache, "--report-dir", str(report)), report)


def test_toy_suite_passes_in_one_process(cold: Run) -> None:
    assert cold.ret == 0, (
        "\n".join(f"{k}: {m}" for k, m in cold.failed().items()) or cold.output[-3000:]
    )
    assert {v["finding"] for v in cold.verdicts} == set(FINDING_TESTS)
    assert all(v["status"] in ("pass", "observed", "n/a") for v in cold.verdicts)
    # n/a only where nothing can be judged: the identical copy has no weight change
    assert {(v["subject"], v["finding"]) for v in cold.verdicts if v["status"] == "n/a"} == {
        ("toy-base__toy-copy", "weight_distributed")
    }
    assert cold.activations_computed() > 0 or "activations 0 computed, " in cold.output


def test_xdist_gives_the_same_verdicts_from_a_warm_cache(
    project: Path, shared_diff_cache: Path, cold: Run
) -> None:
    report = project / "report-n2"
    run = with_bundle(
        run_suite(project, shared_diff_cache, "-n", "2", "--report-dir", str(report)), report
    )
    assert run.ret == cold.ret
    assert verdict_view(run) == verdict_view(cold)
    assert run.activations_computed() == 0  # warm, and merged from both workers


def test_tx_popen_gateways_give_the_same_verdicts(
    project: Path, shared_diff_cache: Path, cold: Run
) -> None:
    report = project / "report-tx"
    run = with_bundle(
        run_suite(project, shared_diff_cache, "--tx", "2*popen", "--report-dir", str(report)),
        report,
    )
    assert run.ret == cold.ret
    assert verdict_view(run) == verdict_view(cold)


def test_from_results_replays_verdicts_without_torch(
    project: Path, tmp_path: Path, cold: Run
) -> None:
    probe = tmp_path / "probe.json"
    report = project / "report-replay"
    run = run_suite(
        project,
        tmp_path / "empty-cache",
        "-p",
        "reasondiff_probe",
        "--from-results",
        str(project / "report-cold"),
        "--report-dir",
        str(report),
        env={"REASONDIFF_PROBE": str(probe), "PYTHONPATH": str(project)},
    )
    with_bundle(run, report)
    assert run.ret == cold.ret, run.output[-3000:]
    assert verdict_view(run) == verdict_view(cold)
    assert json.loads(probe.read_text("utf-8")) == {"torch": False, "transformers": False}
    assert not (tmp_path / "empty-cache").exists() or not any(
        (tmp_path / "empty-cache").rglob("*.safetensors")
    )


def flipped_registry(cold: Run) -> tuple[str, dict[tuple[str, str], str]]:
    """A registry group whose expectations contradict every observed cold verdict."""
    models: dict[str, dict[str, bool]] = {}
    group_expect: dict[str, bool] = {}
    expected_failures: dict[tuple[str, str], str] = {}
    registry = Registry.load()
    for v in cold.verdicts:
        if v["observed"] is None:
            continue
        if v["subject"].startswith("base:"):
            group_expect[v["finding"]] = not v["observed"]
            expected_failures[(FINDING_TESTS[v["finding"]], v["subject"])] = v["finding"]
            continue
        recipe = v["subject"].split("__toy-", 1)[1]
        models.setdefault(recipe, {})[v["finding"]] = not v["observed"]
        expected_failures[(FINDING_TESTS[v["finding"]], f"toy-base__flip-{recipe}")] = v["finding"]
    lines = ["[groups.flipped]", 'traces = "toy"']
    if group_expect:
        lines.append(
            "expect = { "
            + ", ".join(f"{k} = {str(x).lower()}" for k, x in group_expect.items())
            + " }"
        )
    for spec in registry.pairs("toy"):  # same models and methods as the toy group
        recipe = spec.descendant.toy_recipe
        expect = models.get(recipe, {})
        lines += [f"[models.flip-{recipe}]", f'source = "toy:{recipe}"', 'base = "toy-base"']
        if spec.method:
            lines.append(f'method = "{spec.method}"')
        lines += [
            'groups = ["flipped"]',
            "expect = { " + ", ".join(f"{k} = {str(x).lower()}" for k, x in expect.items()) + " }",
        ]
    return "\n".join(lines) + "\n", expected_failures


def test_every_finding_test_fails_on_inverted_expectations(
    project: Path, shared_diff_cache: Path, cold: Run
) -> None:
    text, expected = flipped_registry(cold)
    assert {finding for finding in expected.values()} == set(FINDING_TESTS)
    registry = project / "flipped.toml"
    registry.write_text(text, "utf-8")
    run = run_suite(
        project,
        shared_diff_cache,
        "--registry",
        str(registry),
        "--model-group",
        "flipped",
        "-k",
        "not test_curves",
    )
    assert run.ret == pytest.ExitCode.TESTS_FAILED
    failed = run.failed()
    want = {f"{test}[{subject}]" for test, subject in expected}
    assert set(failed) == want, run.output[-3000:]
    for test_id, message in failed.items():
        assert "\n" not in message.strip(), test_id
        assert "expected" in message and re.search(r"\d\.\d", message), (test_id, message)
    assert run.activations_computed() == 0


def test_real_model_group_without_weights_is_skipped(
    project: Path, shared_diff_cache: Path
) -> None:
    group = ("--model-group", "distill1.5b", "--traces", "toy")
    run = run_suite(project, shared_diff_cache, *group, "-k", "not test_curves")
    assert run.ret == 0, run.output[-3000:]
    outcomes = {o for o, _ in run.outcomes.values()}
    assert outcomes == {"skipped"}
    reasons = " ".join(m for _, m in run.outcomes.values())
    assert "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" in reasons

    strict = run_suite(
        project, shared_diff_cache, *group, "-k", "bathtub and not dominant", "--require-models"
    )
    assert strict.ret == pytest.ExitCode.TESTS_FAILED
    assert strict.outcomes and all(o == "error" for o, _ in strict.outcomes.values())
    assert all("--require-models" in m for _, m in strict.outcomes.values())


def test_label_snapshot_workflow(
    pytester: pytest.Pytester,
    shared_diff_cache: Path,
    copy_project: Callable[[Path], Path],
) -> None:
    """fail (no snapshot, with the hint) -> --snapshot-update -> pass -> drift fails per layer.

    Subprocess runs on the warm cache, ``-k test_curves`` only.
    """
    copy_project(pytester.path)

    def run(*args: str) -> pytest.RunResult:
        common = ("diffs", "-p", "no:cacheprovider", "--diff-cache", str(shared_diff_cache))
        return pytester.runpytest_subprocess(
            *common, "--torch-threads", "1", "-k", "test_curves", *args
        )

    massive = ("--base", "toy:base", "--candidate", "toy:massive")
    first = run(*massive, "--label", "my-series")
    assert first.ret == pytest.ExitCode.TESTS_FAILED
    first.stdout.fnmatch_lines(
        ["*my-series linear: no accepted snapshot yet; run with --snapshot-update to accept it"]
    )

    assert run(*massive, "--label", "my-series", "--snapshot-update").ret == 0
    files = sorted(
        p.name for p in (pytester.path / "diffs/snapshots/labels/my-series/test_curves").iterdir()
    )
    assert len(files) == 4 and all("my-series" in f for f in files)
    assert run(*massive, "--label", "my-series").ret == 0

    drifted = run("--base", "toy:base", "--candidate", "toy:copy", "--label", "my-series")
    assert drifted.ret == pytest.ExitCode.TESTS_FAILED
    assert re.search(
        r"my-series linear: .*layer \d+: snapshot [\d.]+ -> now [\d.]+", drifted.stdout.str()
    )

    unlabelled = run(*massive, "-rs")
    assert unlabelled.ret == 0
    unlabelled.stdout.fnmatch_lines(
        ["*ad-hoc comparison without --label is measured and reported*"]
    )
