"""Snapshot scopes (issue 11.1): a run judges and updates only the curve snapshots of the
scopes it ran; other scopes are neither reported as unused nor touched; orphans inside
its own scope still are.

One project holds four scopes at once: the committed toy group, a second registry group
``mini`` and two label series ``x`` and ``y``. Every run is a plain ``pytest diffs`` (no
``-k``: a keyword selection hides the bug, because syrupy then judges only snapshots whose
names match it). Before the fix a label run exited 1 with "28 snapshots unused" (the toy
group's) and ``--snapshot-update`` deleted them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

MINI_REGISTRY = """
[groups.mini]
description = "a second group: the planted bathtub and the negative control"
traces = "toy"

[models.mini-base]
source = "toy:base"

[models.mini-massive]
source = "toy:massive"
base = "mini-base"
groups = ["mini"]

[models.mini-copy]
source = "toy:copy"
base = "mini-base"
groups = ["mini"]
"""

MINI = ("--registry", "mini.toml", "--model-group", "mini")
LABEL_X = ("--base", "toy:base", "--candidate", "toy:massive", "--label", "x")
LABEL_Y = ("--base", "toy:base", "--candidate", "toy:copy", "--label", "y")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.json")}


def _in_scope(files: dict[str, bytes], scope: str) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k.startswith(f"{scope}/")}


def _without_scope(files: dict[str, bytes], scope: str) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if not k.startswith(f"{scope}/")}


@pytest.mark.slow
def test_each_scope_is_judged_and_updated_alone(
    pytester: pytest.Pytester,
    shared_diff_cache: Path,
    copy_project: Callable[[Path], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(var, raising=False)
    copy_project(pytester.path)
    (pytester.path / "mini.toml").write_text(MINI_REGISTRY, "utf-8")
    snaps = pytester.path / "diffs" / "snapshots"
    toy = _in_scope(_files(snaps), "toy")
    assert len(toy) == 28, sorted(toy)

    def run(*args: str) -> pytest.RunResult:
        common = ("diffs", "-p", "no:cacheprovider", "-p", "no:randomly")
        cache = ("--diff-cache", str(shared_diff_cache), "--torch-threads", "1")
        return pytester.runpytest_subprocess(*common, *cache, *args)

    def ok(result: pytest.RunResult) -> str:
        out = result.stdout.str()
        assert result.ret == 0, out[-3000:]
        assert "unused" not in out, out[-3000:]
        return out

    # accept a second group and two label series. mini's bundle, replayed without its
    # registry, matches its models to the toy group: a toy-scope run of 2 of its 7 pairs.
    ok(run(*MINI, "--snapshot-update", "--report-dir", "bundle"))
    ok(run(*LABEL_X, "--snapshot-update"))
    ok(run(*LABEL_Y, "--snapshot-update"))
    before = _files(snaps)
    assert {k.split("/test_curves/")[0] for k in before} == {"toy", "mini", "labels/x", "labels/y"}
    assert len(before) == 28 + 8 + 4 + 4
    assert _in_scope(before, "toy") == toy  # the other scopes' updates left toy alone

    # an orphan in mini (a pair the group no longer has) and one in label x
    orphans = {  # orphan -> the accepted snapshot it copies
        "mini": ("mini-base__mini-gone][linear", "mini-base__mini-copy][linear"),
        "labels/x": ("x][gone", "x][rbf"),
    }
    orphan_files = {}
    for scope, (name, like) in orphans.items():
        folder = f"{scope}/test_curves"
        orphan_files[scope] = snaps / folder / f"test_curves[{name}].json"
        orphan_files[scope].write_bytes(before[f"{folder}/test_curves[{like}].json"])
    planted = _files(snaps)

    # plain runs of other scopes exit 0 and see neither orphan
    ok(run(*LABEL_Y))
    replay = ok(run("--from-results", "bundle"))  # the toy scope, two of its seven pairs
    assert "8 snapshots passed" in replay and "group toy" in replay
    assert _files(snaps) == planted

    # a run reports the orphan of its own scope, and --snapshot-update deletes only that
    stale = run(*MINI)
    assert stale.ret == pytest.ExitCode.TESTS_FAILED
    stale.stdout.fnmatch_lines(["*8 snapshots passed. 1 snapshot unused.*"])
    r = run(*MINI, "--snapshot-update")
    assert r.ret == 0
    r.stdout.fnmatch_lines(["*1 unused snapshot deleted*"])
    assert not orphan_files["mini"].exists()
    ok(run(*MINI))

    # label x now tracks another checkpoint: its update rewrites x, deletes x's orphan,
    # and leaves every other scope byte-identical
    r = run("--base", "toy:base", "--candidate", "toy:copy", "--label", "x", "--snapshot-update")
    assert r.ret == 0, r.stdout.str()[-3000:]
    r.stdout.fnmatch_lines(["*snapshots updated*1 unused snapshot deleted*"])
    after = _files(snaps)
    assert not orphan_files["labels/x"].exists()
    assert _without_scope(after, "labels/x") == _without_scope(before, "labels/x")
    assert _in_scope(after, "labels/x").keys() == _in_scope(before, "labels/x").keys()
    assert _in_scope(after, "labels/x") != _in_scope(before, "labels/x")


def test_snapshot_dir_is_anchored_where_it_was_given(pytester: pytest.Pytester) -> None:
    """A relative ``--snapshot-dir`` is taken from the invocation folder, a relative ini
    ``snapshot_dir`` from the ini file's folder, so a cd inside a test moves nothing."""
    pytester.makeini("[pytest]\nsnapshot_dir = team/snaps\n")
    pytester.makepyfile(
        test_where="""
        def test_where(diff_options):
            print("SNAPSHOT_DIR=" + diff_options.snapshot_dir)
        """
    )
    sub = pytester.mkdir("sub")
    result = pytester.runpytest("-s", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines([f"*SNAPSHOT_DIR={pytester.path / 'team' / 'snaps'}"])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(sub)
        result = pytester.runpytest(
            str(pytester.path), "-s", "-p", "no:cacheprovider", "--snapshot-dir", "mine"
        )
    result.stdout.fnmatch_lines([f"*SNAPSHOT_DIR={sub / 'mine'}"])
