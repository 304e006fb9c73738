"""Where a run may write: checked before any work, degraded or refused with a reason.

Two promises depend on it (issue 11.10): an unusable ``--diff-cache`` means results are
computed in memory (the caches turn themselves off), yet the toy family still needs a
directory to be built in, so :func:`toy_root` falls back to a temporary one; and an
unusable ``--report-dir`` is a usage error at start-up (:func:`check_report_dir`), not
a traceback after all the work.

This module imports no torch (the plugin calls it while configuring) and writes nothing
but the report directory it is asked to check and empty probe files it removes again.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ReasondiffError

__all__ = ["check_report_dir", "dir_problem", "toy_root"]

log = logging.getLogger("reasondiff")
_TEMP_TOY_ROOTS: dict[Path, Path] = {}


def default_cache_dir() -> Path:
    """``$REASONDIFF_CACHE``, else ``$XDG_CACHE_HOME/reasondiff``, else ``~/.cache/reasondiff``.

    Here, not in :mod:`reasondiff.cache` (which re-exports it), so that the weight-diff
    kernel finds its directory without importing safetensors (~30 ms a process).
    """
    if os.environ.get("REASONDIFF_CACHE"):
        return Path(os.environ["REASONDIFF_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "reasondiff"
    return Path.home() / ".cache" / "reasondiff"


def dir_problem(path: Path, *, create: bool) -> str | None:
    """Why files cannot be written in ``path`` (None when they can).

    With ``create`` the directory (and its parents) is made first. An existing directory
    gets a probe file created and removed, which catches read-only mounts and permission
    bits alike; without ``create`` a missing one is judged by its nearest existing
    ancestor, so nothing is created.
    """
    path = Path(path)
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            fd, probe = tempfile.mkstemp(prefix=".reasondiff-probe-", dir=path)
            os.close(fd)
            os.unlink(probe)
            return None
        if path.exists():
            return "not a directory"
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            return f"{ancestor} is not a directory"
        if not os.access(ancestor, os.W_OK | os.X_OK):
            return f"{ancestor} is not writable"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_report_dir(path: Path) -> None:
    """Raise ``ReasondiffError`` naming ``--report-dir`` and why it cannot be written."""
    problem = dir_problem(path, create=True)
    if problem is not None:
        raise ReasondiffError(
            f"--report-dir {path}: cannot write the results bundle there ({problem}); "
            "choose a writable directory"
        )


def toy_root(cache_dir: Path) -> Path:
    """The directory the toy family is built in: ``cache_dir/toy`` when it can be written
    (or already holds the whole family), else a temporary directory removed at exit."""
    root = Path(cache_dir) / "toy"
    if root in _TEMP_TOY_ROOTS:
        return _TEMP_TOY_ROOTS[root]
    problem = dir_problem(root, create=False)
    if problem is None or _family_built(root):
        return root
    tmp = Path(tempfile.mkdtemp(prefix="reasondiff-toy-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    _TEMP_TOY_ROOTS[root] = tmp
    log.warning(
        "reasondiff: toy models and traces cannot go under %s (%s); using %s for this run",
        root,
        problem,
        tmp,
    )
    return tmp


def _family_built(root: Path) -> bool:
    """Every toy recipe and both trace sets are there already (a read-only, warm cache)."""
    with contextlib.suppress(Exception):
        from reasondiff.fixtures.toy import MARKER, TOY_RECIPES, TOY_VERSION

        version = root / TOY_VERSION
        recipes = all((version / r / MARKER).is_file() for r in TOY_RECIPES)
        traces = all((version / f"traces-{w}.jsonl").is_file() for w in ("a", "b"))
        return recipes and traces
    return False


def file_mode() -> int:
    """0o666 less the process umask: the mode ``open()`` would give a new file.

    Read from ``/proc/self/status`` where it exists (setting the umask to read it back
    is not thread-safe), else by setting and restoring it.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask
