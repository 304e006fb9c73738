"""``--shard i/n`` and merged bundles (``--from-results DIR DIR ...``) on the toy group.

One live run writes a full bundle; the per-shard bundles are made by replaying it with
``--shard`` (no model runs again), then merged by a replay of all of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("shards-e2e")]


def run(project: Path, cache: Path, *args: str) -> tuple[int, str, dict[str, str]]:
    """``python -m pytest diffs ...`` in ``project``: (exit code, output, test id -> outcome)."""
    junit = project / f"junit-{len(list(project.glob('junit-*.xml')))}.xml"
    cmd = [sys.executable, "-m", "pytest", "diffs", "-p", "no:cacheprovider", "-rA"]
    cmd += ["--diff-cache", str(cache), "--torch-threads", "1", f"--junitxml={junit}", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env.update(HF_HUB_OFFLINE="1", NO_COLOR="1", COLUMNS="200")
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=1200)
    outcomes: dict[str, str] = {}
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = child.tag
            outcomes[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return proc.returncode, proc.stdout + proc.stderr, outcomes


def verdicts(bundle: Path) -> list[tuple[Any, ...]]:
    data = json.loads((bundle / "results.json").read_text("utf-8"))
    return sorted(
        (v["finding"], v["subject"], v["observed"], v["status"]) for v in data["verdicts"]
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, copy_project: Callable[[Path], Path]) -> Path:
    root = tmp_path_factory.mktemp("shard-project")
    copy_project(root)
    return root


@pytest.fixture(scope="module")
def full(project: Path, shared_diff_cache: Path) -> Path:
    """The one live run: every toy pair, its bundle in ``full/``."""
    ret, out, _ = run(project, shared_diff_cache, "--report-dir", str(project / "full"))
    assert ret == 0, out[-3000:]
    return project / "full"


def test_shards_are_disjoint_complete_and_merge_to_the_unsplit_verdicts(
    project: Path, full: Path, tmp_path: Path
) -> None:
    ret, out, unsplit = run(project, tmp_path, "--from-results", str(full), "--report-dir", "r0")
    assert ret == 0, out[-3000:]
    shard_tests: list[dict[str, str]] = []
    for i in (1, 2):
        ret, out, outcomes = run(
            project, tmp_path, "--from-results", str(full), "--shard", f"{i}/2",
            "--report-dir", f"s{i}",
        )  # fmt: skip
        assert ret == 0, out[-3000:]
        assert f"--shard {i}/2:" in out
        config = json.loads((project / f"s{i}" / "results.json").read_text("utf-8"))["config"]
        assert config["shard"] == f"{i}/2"
        group = {k: o for k, o in outcomes.items() if "[base:" in k}
        assert group and set(group.values()) == {"skipped"}, group  # never failed
        assert "undecided inside --shard" in out
        shard_tests.append({k: o for k, o in outcomes.items() if "[base:" not in k})
    pair_tests = {k for k in unsplit if "[base:" not in k}
    assert not set(shard_tests[0]) & set(shard_tests[1])  # disjoint
    assert set(shard_tests[0]) | set(shard_tests[1]) == pair_tests  # complete
    # each pair test has the outcome it has in the unsplit run, and none failed
    for outcomes in shard_tests:
        assert outcomes == {k: unsplit[k] for k in outcomes}
        bad = {k: o for k, o in outcomes.items() if o in ("failure", "error")}
        assert not bad, bad

    ret, out, merged = run(
        project, tmp_path, "--from-results", "s1", "s2", "--report-dir", "merged"
    )
    assert ret == 0, out[-3000:]
    assert merged == unsplit
    want = verdicts(project / "r0")
    assert any(v[0] == "sft_more_than_rl" for v in want)
    assert verdicts(project / "merged") == want


def test_live_shards_merge_to_the_unsplit_run(
    project: Path, full: Path, shared_diff_cache: Path
) -> None:
    """Two LIVE ``--shard i/2`` runs (models, not a replay; the shared cache is warm, so
    they read metric entries rather than recompute them) merge to the unsplit run's
    verdicts, group findings included."""
    unsplit_pairs = {r["info"]["pair_id"] for r in _pairs(full)}
    held: list[set[str]] = []
    for i in (1, 2):
        ret, out, outcomes = run(
            project, shared_diff_cache, "--shard", f"{i}/2", "--report-dir", f"live{i}"
        )
        assert ret == 0, out[-3000:]
        assert f"--shard {i}/2:" in out
        assert not {k: o for k, o in outcomes.items() if o in ("failure", "error")}
        held.append({r["info"]["pair_id"] for r in _pairs(project / f"live{i}")})
    assert not held[0] & held[1] and held[0] | held[1] == unsplit_pairs
    ret, out, merged = run(
        project, shared_diff_cache, "--from-results", "live1", "live2", "--report-dir", "livem"
    )
    assert ret == 0, out[-3000:]
    group = {k: o for k, o in merged.items() if "[base:" in k}
    assert group and "skipped" not in group.values(), group  # decided at the merge
    assert verdicts(project / "livem") == verdicts(full)
    config = json.loads((project / "livem" / "results.json").read_text("utf-8"))["config"]
    assert config["trace_hashes"] and config["dtype_resolved"]["device"] == "cpu"


def _pairs(bundle: Path) -> list[dict[str, Any]]:
    pairs: list[dict[str, Any]] = json.loads((bundle / "results.json").read_text("utf-8"))["pairs"]
    return pairs


def test_a_shard_leaves_the_other_shards_snapshots_alone(
    project: Path, full: Path, tmp_path: Path
) -> None:
    snaps = project / "diffs" / "snapshots" / "toy" / "test_curves"
    before = {p.name: p.read_bytes() for p in snaps.glob("*.json")}
    ret, out, outcomes = run(project, tmp_path, "--from-results", str(full), "--shard", "1/2")
    assert ret == 0, out[-3000:]
    mine = {k.split("[", 1)[1].split("]")[0] for k in outcomes if "test_curves" in k}
    others = [n for n in before if n.split("[", 1)[1].split("]")[0] not in mine]
    assert mine and others
    # another shard's accepted curve that this shard's pairs would not match: not judged
    victim = snaps / others[0]
    data = json.loads(victim.read_text("utf-8"))
    data["points"][0]["value"] = 0.123456
    victim.write_text(json.dumps(data, indent=2) + "\n", "utf-8")
    changed = victim.read_bytes()
    ret, out, _ = run(
        project, tmp_path, "--from-results", str(full), "--shard", "1/2", "--snapshot-update"
    )
    assert ret == 0, out[-3000:]
    assert "unused" not in out.lower() or "0 snapshots unused" in out.lower()
    assert victim.read_bytes() == changed
    for name in others[1:]:
        assert (snaps / name).read_bytes() == before[name]


def test_an_empty_shard_exits_0_with_a_note(project: Path, full: Path, tmp_path: Path) -> None:
    ret, out, _ = run(project, tmp_path, "--from-results", str(full), "--shard", "99/99")
    assert ret == 0, out[-3000:]
    assert "--shard 99/99: this shard holds none of the" in out


def test_bad_shard_is_a_usage_error(project: Path, tmp_path: Path) -> None:
    ret, out, _ = run(project, tmp_path, "--shard", "3/2", "--collect-only")
    assert ret == pytest.ExitCode.USAGE_ERROR
    assert "--shard '3/2'" in out


def test_conflicting_bundles_are_an_error_naming_both(
    project: Path, full: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    for f in full.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    results = json.loads((other / "results.json").read_text("utf-8"))
    results["config"]["max_tokens"] = 7
    (other / "results.json").write_text(json.dumps(results), "utf-8")
    ret, out, _ = run(project, tmp_path, "--from-results", str(full), str(other))
    assert ret == pytest.ExitCode.USAGE_ERROR, out[-3000:]
    assert str(full) in out and str(other) in out
