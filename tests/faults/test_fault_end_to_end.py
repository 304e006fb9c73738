"""Rows 3, 6, 10 and 11 end to end: ``pytest diffs`` in a scratch project, in a subprocess.

A small registry group ``faults`` (the toy base, its byte copy and a copy with one
changed block, two traces) keeps each run to seconds. The first run (module fixture)
fills a diff cache and writes a results bundle; the tests copy that cache, damage it or
take it away, and check that the verdicts do not change and the report says why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _faultkit import (
    copy_checkpoint,
    entries,
    file_of_tensor,
    make_project,
    run_pytest_in,
    small_trace_file,
    truncate_file,
)
from safetensors.torch import load_file, save_file

# One worker runs the whole module (loadgroup), so its toy build is shared.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("faults-e2e")]

CHANGED = "model.layers.5.mlp.up_proj.weight"


@dataclass(frozen=True)
class FaultsGroup:
    registry: Path
    cache: Path  # warm cache of the baseline run (copy it before changing it)
    verdicts: list[dict[str, Any]]
    traces: Path
    base: Path
    changed: Path
    snapshots: Path  # the accepted curve snapshots (diffs/snapshots/faults)


def _scaled_copy(src: Path, dst: Path, tensor: str, factor: float) -> Path:
    ckpt = copy_checkpoint(src, dst)
    f = file_of_tensor(ckpt, tensor)
    tensors = load_file(f)
    tensors[tensor] = tensors[tensor] * factor
    save_file(tensors, f, metadata={"format": "pt"})
    return ckpt


def _verdicts(report_dir: Path) -> list[dict[str, Any]]:
    doc = json.loads((report_dir / "results.json").read_text("utf-8"))
    return sorted(
        (
            {k: v[k] for k in ("finding", "subject", "observed", "expected")}
            for v in doc["verdicts"]
        ),
        key=lambda v: (v["subject"], v["finding"]),
    )


def _group_args(group: FaultsGroup, cache: Path | str, report: Path | None = None) -> list[str]:
    args = [
        "--registry",
        str(group.registry),
        "--model-group",
        "faults",
        "--diff-cache",
        str(cache),
    ]
    # --keep-activations: the cache guarantees below cover the activation entries too
    args += ["--max-tokens", "32", "--bootstrap", "20", "--keep-activations"]
    if report is not None:  # a verdict run: curve snapshots have their own test here
        args += ["--report-dir", str(report), "-k", "not test_curves"]
    return args


def _no_traceback(result: pytest.RunResult) -> None:
    text = "\n".join(result.outlines + result.errlines)
    assert "Traceback (most recent call last)" not in text, text[-3000:]
    assert "INTERNALERROR" not in text, text[-3000:]


@pytest.fixture(scope="module")
def faults_group(
    tmp_path_factory: pytest.TempPathFactory, toy_base: Path, toy_copy: Path, toy_traces: Path
) -> FaultsGroup:
    root = tmp_path_factory.mktemp("faults_group")
    changed = _scaled_copy(toy_copy, root / "changed", CHANGED, 1.5)
    traces = small_trace_file(toy_traces, root / "traces.jsonl", count=2)
    registry = root / "faults.toml"
    registry.write_text(
        f"""
[groups.faults]
description = "fault suite: toy base, its copy, one changed block"
traces = "{traces}"

[models.fbase]
source = "{toy_base}"

[models.fcopy]
source = "{toy_copy}"
base = "fbase"
method = "SFT"
groups = ["faults"]
expect = {{ bathtub = false, final_layer_lowest = false }}

[models.fchanged]
source = "{changed}"
base = "fbase"
method = "RL"
groups = ["faults"]
expect = {{ weight_distributed = false }}
""",
        "utf-8",
    )
    group = FaultsGroup(registry, root / "cache", [], traces, toy_base, changed, root / "snaps")
    proj = make_project(root / "proj")
    # every finding test, and the curve snapshots accepted for the snapshot test
    args = [*_group_args(group, group.cache), "--report-dir", str(root / "report")]
    result = run_pytest_in(proj, *args, "--snapshot-update")
    _no_traceback(result)
    assert result.ret == 0, "\n".join(result.outlines[-60:])
    verdicts = _verdicts(root / "report")
    assert {v["subject"] for v in verdicts} >= {"fbase__fcopy", "fbase__fchanged"}
    shutil.copytree(proj / "diffs" / "snapshots" / "faults", group.snapshots)
    return FaultsGroup(registry, group.cache, verdicts, traces, toy_base, changed, group.snapshots)


def test_corrupt_cache_entries_between_runs_keep_verdicts_and_are_named(
    faults_group: FaultsGroup, run_pytest: Any, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(faults_group.cache, cache)
    all_entries = entries(cache)
    metrics = sorted(p for p in all_entries if "metrics" in p.parts)
    weights = sorted(p for p in all_entries if "weightdiff" in p.parts)
    acts = sorted(p for p in all_entries if p.suffix == ".safetensors")
    assert metrics and weights and acts
    damaged = [metrics[len(metrics) // 2], *weights, *acts]
    for p in damaged:
        truncate_file(p, keep=0.5)

    result = run_pytest(*_group_args(faults_group, cache, tmp_path / "report"))
    _no_traceback(result)
    assert result.ret == 0, "\n".join(result.outlines[-60:])
    assert _verdicts(tmp_path / "report") == faults_group.verdicts
    out = "".join(result.outlines)  # joined without breaks: the report may fold long paths
    # the report names each damaged entry that was read: the metric entry, the weight
    # diffs, and the activations recomputing that metric entry had to load
    for p in [metrics[len(metrics) // 2], *weights]:
        assert p.name in out, f"{p} not named in the report"
    assert sum(p.name in out for p in acts) >= 1  # base and copy share theirs
    assert "note: cache entry discarded and recomputed: " in "\n".join(result.outlines)


def test_nan_weight_in_candidate_fails_every_pair_test_naming_it(
    faults_group: FaultsGroup, run_pytest: Any, tmp_path: Path
) -> None:
    bad = copy_checkpoint(faults_group.changed, tmp_path / "nan-cand")
    tensor = "model.layers.3.self_attn.v_proj.weight"
    f = file_of_tensor(bad, tensor)
    tensors = load_file(f)
    tensors[tensor][1, 2] = float("nan")
    save_file(tensors, f, metadata={"format": "pt"})

    result = run_pytest(
        "--base", str(faults_group.base), "--candidate", str(bad),
        "--traces", str(faults_group.traces), "--diff-cache", str(tmp_path / "cache"),
        "--max-tokens", "32", "--bootstrap", "20",
    )  # fmt: skip
    _no_traceback(result)
    outcomes = result.parseoutcomes()
    assert result.ret == 1 and outcomes.get("passed", 0) == 0, outcomes
    # the pair_result fixture fails, so each pair test is reported as an error in setup
    assert outcomes.get("failed", 0) + outcomes.get("errors", 0) >= 5, outcomes
    failures = [ln for ln in result.outlines if ln.startswith(("FAILED", "ERROR"))]
    assert failures and all("NonFiniteError" in ln for ln in failures), failures
    # each error section carries the whole message: model, tensor and its layer
    message = f"NonFiniteError: model 'nan-cand': 1 NaN/Inf values in weight {tensor} (block 3)"
    assert "\n".join(result.outlines).count(message) >= len(failures)


def _snapshot_files(project: Path) -> list[Path]:
    """This group's curve snapshots (the copied diffs/ may hold the toy group's too)."""
    return sorted((project / "diffs" / "snapshots").rglob("faults/**/*.json"))


_KILL_SNAPSHOT_WRITE = """
import os, signal

_real_fsync = os.fsync


def _dying_fsync(fd):
    target = os.readlink(f"/proc/self/fd/{fd}")
    if "/diffs/snapshots/" in target:
        size = os.fstat(fd).st_size
        os.ftruncate(fd, size // 2)  # half of the new snapshot reached the disk ...
        os.kill(os.getpid(), signal.SIGKILL)  # ... when the process was killed
    return _real_fsync(fd)


os.fsync = _dying_fsync
"""


def test_snapshots_change_only_with_snapshot_update_and_never_tear(
    faults_group: FaultsGroup, run_pytest: Any, project: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(faults_group.cache, cache)
    args = _group_args(faults_group, cache)
    shutil.copytree(faults_group.snapshots, project / "diffs" / "snapshots" / "faults")
    snaps = _snapshot_files(project)
    assert len(snaps) == 8, snaps  # 2 pairs x (3 CKA curves + weight diff)

    # An accepted curve that the models no longer reproduce: shift every value by 0.5.
    drifted = snaps[0]
    doc = json.loads(drifted.read_text())
    for point in doc["points"]:
        point["value"] += 0.5
    drifted.write_text(json.dumps(doc, indent=2) + "\n")
    os.utime(drifted, ns=(1_000_000_000, 1_000_000_000))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in snaps}

    checked = run_pytest(*args, target="diffs/test_curves.py")
    _no_traceback(checked)
    assert checked.ret == 1 and checked.parseoutcomes().get("failed") == 1
    assert "beyond tolerance" in "\n".join(checked.outlines)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in _snapshot_files(project)} == before

    # An update killed in the middle of writing the new snapshot: old file, never a mix.
    (project / "conftest.py").write_text(_KILL_SNAPSHOT_WRITE)
    killed = run_pytest(*args, "--snapshot-update", target="diffs/test_curves.py")
    assert killed.ret == -signal.SIGKILL, "\n".join(killed.outlines[-40:] + killed.errlines[-20:])
    assert drifted.read_bytes() == before[drifted][0]
    for p in _snapshot_files(project):
        json.loads(p.read_text())  # every snapshot file is whole
    assert {p: p.read_bytes() for p in _snapshot_files(project)} == {
        p: b for p, (b, _) in before.items()
    }

    # Without the fault, --snapshot-update replaces the drifted file with the new curve.
    (project / "conftest.py").unlink()
    updated = run_pytest(*args, "--snapshot-update", target="diffs/test_curves.py")
    assert updated.ret == 0, "\n".join(updated.outlines[-40:])
    assert drifted.read_bytes() != before[drifted][0]
    assert all(p.read_bytes() == before[p][0] for p in snaps if p != drifted)


_FULL_DISK = """
import errno, os

_real_replace = os.replace


def _no_space(src, dst, *args, **kwargs):
    if "{cache}" in os.fspath(dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    return _real_replace(src, dst, *args, **kwargs)


os.replace = _no_space
"""


def test_full_disk_still_gives_the_same_verdicts_and_says_so_once(
    faults_group: FaultsGroup, run_pytest: Any, project: Path, tmp_path: Path
) -> None:
    """Every cache write fails with ENOSPC (injected by a conftest in the run)."""
    cache = tmp_path / "cache"
    (project / "conftest.py").write_text(_FULL_DISK.replace("{cache}", str(cache)))
    result = run_pytest(*_group_args(faults_group, cache, tmp_path / "report"))
    _no_traceback(result)
    assert result.ret == 0, "\n".join(result.outlines[-60:])
    assert _verdicts(tmp_path / "report") == faults_group.verdicts
    off = [ln for ln in result.outlines if "caching was off for this run" in ln]
    assert len(off) == 1, off
    assert "ENOSPC" in off[0]
    assert entries(cache) == []
