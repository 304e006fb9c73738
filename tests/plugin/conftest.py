"""Shared helpers for the plugin's self-tests: a diff cache and a toy project to run.

(``pytest_plugins = ["pytester"]`` sits in each test module: pytest refuses it in a
non-root conftest when the whole ``tests/`` tree is collected.)"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def shared_diff_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One diff cache for every pytester run, so the toy family is built once.

    ``REASONDIFF_SELFTEST_CACHE=DIR`` reuses a cache across sessions (local iteration).
    """
    reuse = os.environ.get("REASONDIFF_SELFTEST_CACHE")
    return Path(reuse) if reuse else tmp_path_factory.mktemp("diff-cache")


@pytest.fixture(scope="session")
def copy_project() -> Callable[[Path], Path]:
    """``copy_project(dest)``: the repo's pytest config and ``diffs/`` suite, copied."""
    return _copy_project


def _copy_project(dest: Path, *, snapshots: bool = True) -> Path:
    """The repo's pytest config and ``diffs/`` suite, copied into ``dest``.

    Running the copy keeps snapshot updates and reports out of the working tree.
    """
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    target = dest / "diffs"
    target.mkdir(exist_ok=True)
    for f in (REPO / "diffs").glob("*.py"):
        shutil.copy(f, target / f.name)
    snaps = REPO / "diffs" / "snapshots"
    if snapshots and snaps.is_dir():
        shutil.copytree(snaps, target / "snapshots", dirs_exist_ok=True)
    return target
