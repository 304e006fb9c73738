"""pipeline: ``pytest diffs --model-group=toy`` end to end, cold cache vs warm cache.

Runs the suite in a subprocess with a fresh ``--diff-cache`` in a temp dir (and the toy
models built there too, via ``--toy-root`` when the plugin has it), ``-p no:cacheprovider``
and ``-q``: first cold (empty cache), then warm (same cache) -- goal: warm >= 5x faster.
Then ``-n 2`` vs ``-n 0`` on the same warm cache, reported without a goal (2 shared cores).
If the plugin cannot collect ``diffs`` yet, the benchmark says so (``NotReady``).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import REPO_ROOT, NotReady, Result, print_table, run_child

NAME = "pipeline"
GOAL = 5.0


def _pytest(cache: Path, *extra: str, check: bool = True) -> tuple[float, str]:
    argv = [
        sys.executable, "-m", "pytest", "diffs", "--model-group=toy", f"--diff-cache={cache}",
        "-p", "no:cacheprovider", "-q", *extra,
    ]  # fmt: skip
    run = run_child(argv, cwd=REPO_ROOT, check=False, timeout=1200)
    tail = (run.stdout + run.stderr).strip().splitlines()
    if check and run.returncode not in (0, 1):  # 1 = some finding failed: still a full run
        raise RuntimeError(
            f"pytest {' '.join(extra)} exited {run.returncode}:\n" + "\n".join(tail[-30:])
        )
    return run.seconds, tail[-1] if tail else ""


def _ready(cache: Path) -> str | None:
    """None when ``pytest diffs`` collects toy tests, else the reason it does not."""
    run = run_child(
        [sys.executable, "-m", "pytest", "diffs", "--model-group=toy", f"--diff-cache={cache}",
         "-p", "no:cacheprovider", "-q", "--co"],
        cwd=REPO_ROOT, check=False, timeout=600,
    )  # fmt: skip
    out = (run.stdout + run.stderr).strip().splitlines()
    if run.returncode != 0:
        return f"`pytest diffs --co` exited {run.returncode}: {out[-1] if out else 'no output'}"
    if not any("::" in line for line in out):
        return "`pytest diffs --co` collected no tests"
    return None


#: --quick trims the traces and the bootstrap so the cold run fits in a few minutes.
QUICK_ARGS = ("--max-tokens=48", "--bootstrap=100")


def run(*, quick: bool) -> list[Result]:
    warm_repeats = 1 if quick else 3
    extra = QUICK_ARGS if quick else ()
    with tempfile.TemporaryDirectory(prefix="rd-bench-pipe-") as tmp:
        cache = Path(tmp) / "cache"
        reason = _ready(Path(tmp) / "probe-cache")
        if reason:
            raise NotReady(reason)
        rows: list[list[object]] = []
        cold, cold_tail = _pytest(cache, *extra)
        rows.append(["cold cache, -n 0", cold, cold_tail])
        warm: list[float] = []
        for _ in range(warm_repeats):
            s, tail = _pytest(cache, *extra)
            warm.append(s)
            rows.append(["warm cache, -n 0", s, tail])
        xdist: list[float] = []
        for _ in range(1 if quick else 3):
            s, tail = _pytest(cache, *extra, "-n", "2")
            xdist.append(s)
            rows.append(["warm cache, -n 2", s, tail])
    print_table(
        f"pipeline: pytest diffs --model-group=toy {' '.join(extra)} (wall seconds, incl. interpreter start)",
        ["run", "seconds", "pytest summary"],
        rows,
    )
    warm_med, x_med = statistics.median(warm), statistics.median(xdist)
    print(f"warm -n 0 / warm -n 2 = {warm_med / x_med:.2f} (no goal: 2 shared cores)")
    return [Result(NAME, cold / warm_med, ">=", GOAL)]
