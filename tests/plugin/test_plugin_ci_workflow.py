"""docs/reasondiff-ci.yml replayed on the toy models, from a team's repository outside
this checkout, against an installed wheel of reasondiff (issue 11.1 and 11.9).

The wheel is built from a copy of the sources (so nothing is written into the working
tree) and installed into a fresh virtual environment whose only view of the checkout's
environment is a ``.pth`` line to its site-packages for the dependencies (torch,
transformers, pytest, syrupy): a ``.pth`` file on such a path is not executed, so the
editable install of this checkout stays invisible and ``reasondiff`` is imported from
the wheel. The "team repository" is a clone of a bare repository, so the workflow's
commit step can push.

The workflow's ``run:`` steps are executed as GitHub would (``bash -eo pipefail``, job
env, ``if:`` on the accept input); ``setup`` (pip from the network) is the fixture's
install and ``uses:`` steps are skipped. Device and base are the toy ones. The dispatches
are the life of a label series in CI: no snapshot yet -> fails with the accept hint;
accept -> passes and pushes the snapshots; rerun -> passes; a drifted checkpoint -> fails
with per-layer lines.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "docs" / "reasondiff-ci.yml"
LABEL = "my-rl-run"


@dataclass(frozen=True)
class Installed:
    venv: Path
    site: Path  # the venv's site-packages, where the wheel went


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (
        f"{cmd}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """reasondiff built as a wheel and installed in a fresh venv (no editable install)."""
    root = tmp_path_factory.mktemp("installed")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in ("plugin", "reports", "fixtures", "diffs"):
        shutil.copytree(
            REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    wheels = root / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)])
    (wheel,) = wheels.glob("reasondiff-*.whl")

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).stdout.strip()
    )
    # the dependencies: this environment's site dirs (a chained venv may have several),
    # whose .pth files (the editable install's finder among them) are not processed there
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "_checkout_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
    _run([*pip, "--no-index", str(wheel)])
    where = _run(
        [
            str(python),
            "-c",
            "import pytest, syrupy, torch, reasondiff.diffs as d; print(d.__file__)",
        ],
        cwd=root,
    ).stdout.strip()
    assert Path(where).is_relative_to(site), f"reasondiff.diffs imported from {where}, not {site}"
    shipped = site / "reasondiff" / "diffs" / "snapshots" / "toy" / "test_curves"
    assert len(list(shipped.glob("*.json"))) == 28, "the toy snapshots must ship as package data"
    return Installed(venv=venv, site=site)


@pytest.fixture
def team_repo(tmp_path: Path, installed: Installed) -> Path:
    """A clone of a bare repository with the toy traces committed and the venv linked."""
    from reasondiff.fixtures.toy_traces import ensure_toy_traces

    remote = tmp_path / "remote.git"
    _run(["git", "init", "-q", "--bare", str(remote)])
    repo = tmp_path / "team"
    _run(["git", "clone", "-q", str(remote), str(repo)])
    (repo / ".venv").symlink_to(installed.venv)
    (repo / ".gitignore").write_text(".venv\nreport/\n")
    traces = repo / "reasondiff" / "traces" / "toy-a.jsonl"
    traces.parent.mkdir(parents=True)
    shutil.copy(ensure_toy_traces(tmp_path / "toy-traces", "a"), traces)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    _run([*git, "add", "-A"])
    _run([*git, "commit", "-q", "-m", "team repository"])
    _run([*git, "push", "-q", "-u", "origin", "HEAD"])
    return repo


@dataclass(frozen=True)
class StepRun:
    name: str
    returncode: int
    output: str


def dispatch(repo: Path, *, candidate: str, accept: bool, cache: Path, home: Path) -> list[StepRun]:
    """Run the workflow's steps in ``repo`` as a workflow_dispatch with these inputs."""
    job = yaml.safe_load(WORKFLOW.read_text())["jobs"]["diff"]
    inputs = {"candidate": candidate, "accept": "true" if accept else "false"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    for key, value in job["env"].items():
        m = re.fullmatch(r"\$\{\{\s*inputs\.(\w+)\s*\}\}", str(value))
        env[key] = inputs[m.group(1)] if m else str(value)
    env.update(
        BASE="toy:base",
        METHOD="RL",
        DEVICE="cpu",
        TRACES="reasondiff/traces/toy-a.jsonl",
        REASONDIFF_CACHE=str(cache),
        HF_HOME=str(home),
        HF_HUB_OFFLINE="1",
        PYTEST_ADDOPTS="--torch-threads 1",
        COLUMNS="200",
    )
    ran: list[StepRun] = []
    failed = False
    for step in job["steps"]:
        if "run" not in step:
            assert "uses" in step, step
            continue
        name, script = step["name"], step["run"]
        assert "${{" not in script, f"step {name!r}: inputs must reach the script through env"
        if name == "setup":  # pip from the network: the `installed` fixture did this
            assert 'pip install "$REASONDIFF"' in script and "python3 -m venv .venv" in script
            continue
        condition = str(step.get("if", "success()"))
        if condition == "${{ inputs.accept }}":
            wanted = accept and not failed
        else:
            assert condition == "success()", f"step {name!r}: unsupported if: {condition}"
            wanted = not failed
        if not wanted:
            continue
        proc = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        ran.append(StepRun(name, proc.returncode, proc.stdout + proc.stderr))
        failed = failed or proc.returncode != 0
    return ran


def _step(runs: list[StepRun], name: str) -> StepRun:
    (run,) = [r for r in runs if r.name == name]
    return run


@pytest.mark.slow
def test_ci_workflow_gates_a_label_series_from_outside_the_checkout(
    team_repo: Path, installed: Installed, shared_diff_cache: Path, tmp_path: Path
) -> None:
    assert not team_repo.resolve().is_relative_to(REPO)
    remote = team_repo.parent / "remote.git"
    snapshots = team_repo / "reasondiff" / "snapshots"

    def ci(candidate: str, *, accept: bool = False) -> list[StepRun]:
        return dispatch(
            team_repo, candidate=candidate, accept=accept, cache=shared_diff_cache, home=tmp_path
        )

    # 1. no accepted snapshot yet: the gate fails and says how to accept
    first = ci("toy:massive")
    diff = _step(first, "diff")
    assert diff.returncode == 1, diff.output[-3000:]
    assert f"{LABEL} linear: no accepted snapshot yet; run with --snapshot-update" in diff.output
    assert [r.name for r in first] == ["traces", "diff"] and not snapshots.exists()

    # 2. accept: snapshot update, then the commit step pushes the label's snapshots only
    accepted = ci("toy:massive", accept=True)
    assert [(r.name, r.returncode) for r in accepted] == [
        ("traces", 0),
        ("diff", 0),
        ("commit accepted snapshots", 0),
    ], accepted[-1].output[-3000:]
    assert "4 snapshots generated" in _step(accepted, "diff").output
    git = ["git", "--git-dir", str(remote)]
    subject = _run([*git, "log", "-1", "--format=%s"]).stdout.strip()
    assert subject == f"reasondiff: accept {LABEL} at toy:massive"
    pushed = _run([*git, "show", "--name-only", "--format=", "HEAD"]).stdout.split()
    # the four curves, and the folder's record of its label (reasondiff.snapshot_scopes)
    assert f"reasondiff/snapshots/labels/{LABEL}/.label" in pushed, pushed
    curves = [p for p in pushed if not p.endswith("/.label")]
    assert len(curves) == 4 and all(
        p.startswith(f"reasondiff/snapshots/labels/{LABEL}/test_curves/test_curves[{LABEL}][")
        for p in curves
    ), pushed

    # 3. the same checkpoint again: every test passes and the run exits 0
    rerun = _step(ci("toy:massive"), "diff")
    assert rerun.returncode == 0, rerun.output[-3000:]
    assert "4 snapshots passed" in rerun.output and "unused" not in rerun.output
    assert (team_repo / "report" / "results.json").is_file()

    # 4. a checkpoint whose curves drifted: fails, one line per layer beyond tolerance
    drifted = _step(ci("toy:copy"), "diff")
    assert drifted.returncode == 1
    assert re.search(
        rf"{LABEL} linear: .*layer \d+: snapshot [\d.]+ -> now [\d.]+", drifted.output
    ), drifted.output[-3000:]

    # nothing was written into the installed package; the team repo holds one scope
    assert not (installed.site / "reasondiff" / "diffs" / "snapshots" / "labels").exists()
    assert sorted(p.name for p in snapshots.iterdir()) == ["labels"]
    assert sorted(p.name for p in (snapshots / "labels").iterdir()) == [LABEL]
