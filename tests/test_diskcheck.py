"""Where a run may write: the toy root falls back, an unwritable report dir is named (11.10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reasondiff.diskcheck import check_report_dir, dir_problem, toy_root
from reasondiff.errors import ReasondiffError


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    f = tmp_path / "a-file"
    f.write_text("a regular file")
    return f


def test_toy_root_is_under_a_usable_cache_and_creates_nothing(tmp_path: Path) -> None:
    assert toy_root(tmp_path / "cache") == tmp_path / "cache" / "toy"
    assert not (tmp_path / "cache").exists()  # real-model runs never build the toy


def test_toy_root_falls_back_to_one_temporary_dir(blocker: Path) -> None:
    first = toy_root(blocker / "cache")
    assert first.is_dir() and blocker not in first.parents
    assert toy_root(blocker / "cache") == first  # one per cache dir and process
    (first / "probe").write_text("writable")
    assert blocker.read_text() == "a regular file"


def test_report_dir_problems_are_named(tmp_path: Path, blocker: Path) -> None:
    with pytest.raises(ReasondiffError, match=r"--report-dir .*a-file/report: cannot write"):
        check_report_dir(blocker / "report")
    check_report_dir(tmp_path / "new" / "report")  # created, probe removed
    assert list((tmp_path / "new" / "report").iterdir()) == []
    assert dir_problem(blocker, create=False) == "not a directory"
    assert dir_problem(tmp_path / "missing" / "deeper", create=False) is None
    assert not (tmp_path / "missing").exists()
    assert dir_problem(blocker / "sub" / "dir", create=False) == f"{blocker} is not a directory"
