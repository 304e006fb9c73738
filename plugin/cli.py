"""``reasondiff-diff``: run the finding tests that ship with the package, from anywhere.

A team gates its checkpoints from its own repository, without a fork of this one::

    reasondiff-diff --base ORG/BASE --candidate ./ckpt-42 --label my-rl-run \\
        --snapshot-dir reasondiff/snapshots --report-dir report

is ``pytest --pyargs reasondiff.diffs`` followed by the same arguments: every pytest,
syrupy (``--snapshot-update``), xdist (``-n``) and reasondiff option is accepted, and the
pytest configuration of the current directory applies (e.g. an ini ``snapshot_dir``).
"""

from __future__ import annotations

import sys

__all__ = ["DIFFS_PACKAGE", "main", "pytest_args"]

#: The package holding the finding tests (folder ``diffs/`` of the source tree).
DIFFS_PACKAGE = "reasondiff.diffs"


def pytest_args(argv: list[str]) -> list[str]:
    """The pytest command line for ``reasondiff-diff ARGV``."""
    return ["--pyargs", DIFFS_PACKAGE, *argv]


def main(argv: list[str] | None = None) -> int:
    """Run the finding tests; the exit status is pytest's."""
    import pytest

    return int(pytest.main(pytest_args(list(sys.argv[1:] if argv is None else argv))))


if __name__ == "__main__":
    raise SystemExit(main())
