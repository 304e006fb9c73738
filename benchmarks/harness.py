"""Shared benchmark plumbing: timing, child processes with peak RSS, tables, result lines.

Every figure a benchmark reports is a ratio of two things measured side by side in the
same run, so this module only measures and prints; it never decides what "fast" means.
It does not import reasondiff: the baselines must stay independent of the project.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Operators a goal may use; the result line prints them verbatim (``goal=>= 3``).
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda value, goal: value >= goal,
    "<=": lambda value, goal: value <= goal,
}


class NotReady(Exception):
    """The project code a benchmark measures is not there yet (or cannot run here).

    A benchmark raising this reports ``ratio=n/a status=short`` with the reason instead
    of crashing: a missing piece is a result, not an error of the harness.
    """


#: How a result relates to its goal: judged against it, measured where the goal does not
#: apply (a GPU goal from a CPU or ``--tiny`` run: ``n/a``), or not run in this mode.
Scope = Literal["goal", "n/a", "not measured"]


@dataclass(frozen=True)
class Result:
    """One grep-able result line: ``NAME: ratio=X.XX goal=OP G status=ok|short|n/a|not measured``.

    ``scope="goal"`` (default) judges the ratio: ``ok`` or ``short``. ``scope="n/a"`` keeps
    the measured value but says the goal does not apply to this run (e.g. a GPU goal from
    a CPU run); ``scope="not measured"`` is a probe this mode skips. Neither is short.
    """

    name: str
    ratio: float | None
    op: str
    goal: float
    reason: str = ""
    scope: Scope = "goal"

    @property
    def ok(self) -> bool:
        if self.ratio is None or math.isnan(self.ratio):
            return False
        return _OPS[self.op](self.ratio, self.goal)

    @property
    def short(self) -> bool:
        """Judged against its goal and missing it (n/a and not-measured lines never are)."""
        return self.scope == "goal" and not self.ok

    @property
    def status(self) -> str:
        if self.scope != "goal":
            return self.scope
        return "ok" if self.ok else "short"

    def line(self) -> str:
        if self.op not in _OPS:
            raise ValueError(f"result {self.name!r}: goal operator {self.op!r} is not >= or <=")
        if self.ratio is None or math.isnan(self.ratio):
            ratio = "n/a"
        elif self.ratio != 0 and abs(self.ratio) < 0.01:  # agreement lines: 3.2e-07, not 0.00
            ratio = f"{self.ratio:.2e}"
        else:
            ratio = f"{self.ratio:.2f}"
        goal = f"{self.goal:g}"
        tail = f"  # {self.reason}" if self.reason and (self.short or self.scope != "goal") else ""
        return f"{self.name}: ratio={ratio} goal={self.op} {goal} status={self.status}{tail}"


@dataclass
class Timing:
    """Wall-clock seconds of repeated calls; the median is the figure, min the best case."""

    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)


def time_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = 0) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls (noise: take the median)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    timing = Timing()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        timing.seconds.append(time.perf_counter() - start)
    return timing


@dataclass(frozen=True)
class ChildRun:
    """A finished child process: wall time, its own peak RSS, and what it printed."""

    seconds: float
    peak_rss_bytes: int
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """The last stdout line parsed as JSON (children report through it)."""
        lines = [ln for ln in self.stdout.splitlines() if ln.strip()]
        if not lines:
            raise RuntimeError(f"child printed nothing on stdout; stderr:\n{self.stderr[-2000:]}")
        return json.loads(lines[-1])


#: Forks and execs the measured command from a tiny interpreter, then writes the child's
#: ru_maxrss (KiB) to a file. Linux carries the forking process's RSS high-water mark into
#: the child's ru_maxrss across exec, so forking straight from the benchmark process (GBs
#: of test data) would inflate every child's figure; this launcher adds ~10 MiB at most.
_LAUNCHER = """
import os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
with open(out, "w") as f:
    f.write(f"{usage.ru_maxrss} {seconds!r}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(
    argv: Sequence[str],
    *,
    timeout: float = 1800.0,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
) -> ChildRun:
    """Run ``argv`` in its own process; return wall time, its own peak RSS and its output.

    Peak RSS is the child's ``ru_maxrss`` as seen by a minimal launcher process (see
    ``_LAUNCHER``), so it is the child's own high-water mark, not ours.
    """
    full_env = {**os.environ, **(env or {})}
    with tempfile.TemporaryDirectory(prefix="rd-bench-rss-") as tmp:
        rss_file = Path(tmp) / "maxrss"
        cmd = [sys.executable, "-S", "-c", _LAUNCHER, str(rss_file), *argv]
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env=full_env,
                cwd=str(cwd or REPO_ROOT),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"child {' '.join(argv)!r} ran past {timeout:.0f} s") from None
        if not rss_file.exists():
            raise RuntimeError(f"launcher for {' '.join(argv)!r} failed:\n{proc.stderr[-3000:]}")
        rss_kib, seconds = rss_file.read_text().split()
    run = ChildRun(float(seconds), int(rss_kib) * 1024, proc.returncode, proc.stdout, proc.stderr)
    if check and run.returncode != 0:
        raise RuntimeError(
            f"child {' '.join(argv)!r} exited {run.returncode}; stderr tail:\n{proc.stderr[-3000:]}"
        )
    return run


def python_child(module: str, *args: str) -> list[str]:
    """argv running ``python -m benchmarks.<module> args`` with this interpreter."""
    return [sys.executable, "-m", f"benchmarks.{module}", *args]


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print the raw figures of a benchmark (rich if available, else aligned text)."""
    cells = [[_fmt(v) for v in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a project dependency
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        print(title)
        print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
        for r in cells:
            print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))
        return
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, justify="right")
    for r in cells:
        table.add_row(*r)
    Console(width=160).print(table)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.2e}"
        return f"{value:.3f}"
    return str(value)


def mib(nbytes: float) -> float:
    """Bytes to MiB, for tables."""
    return nbytes / 2**20


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x): the empirical complexity exponent."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"need >= 2 matching points for a slope, got {len(xs)} and {len(ys)}")
    if min(xs) <= 0 or min(ys) <= 0:
        raise ValueError("a log-log slope needs positive values")
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    if sxx == 0:
        raise ValueError("a log-log slope needs at least two different x values")
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sxx


def drop_page_cache() -> bool:
    """Drop the OS page cache (root only). Returns False when the kernel refuses."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def load_average() -> str:
    """The 1/5/15-minute load average, to note whether other work shared the machine."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:  # pragma: no cover
        return "unknown"
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"
