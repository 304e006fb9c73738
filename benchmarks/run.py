"""Run reasondiff's benchmarks: ``python benchmarks/run.py [--quick] [--only NAME]``.

Each benchmark prints a table of raw figures, then result lines of the form
``NAME: ratio=X.XX goal=OP G status=ok|short|n/a|not measured``. A missed goal (``short``)
is a result and keeps the exit status 0; only a crash of a benchmark exits non-zero.
``n/a``: measured, but the goal does not apply to this run (a GPU goal from a CPU or
``--tiny`` run); ``not measured``: a probe this mode skips. Neither counts as short.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import NotReady, Result, load_average

#: Benchmark name -> module under benchmarks/ exposing ``run(quick: bool) -> list[Result]``.
BENCHMARKS = {
    "cka_group": "bench_cka_group",
    "forwards": "bench_forwards",
    "weight_diff": "bench_weight_diff",
    "pipeline": "bench_pipeline",
    "cka_scale": "bench_cka_scale",
    "gpu_study": "gpu_study",
    "generate": "bench_generate",
    "stream": "bench_stream",
}
#: Goal of each benchmark's main line, used when it cannot run at all.
MAIN_GOAL = {
    "cka_group": (">=", 3.0),
    "forwards": (">=", 1.6),
    "weight_diff": ("<=", 1.4),
    "pipeline": (">=", 5.0),
    "cka_scale": ("<=", 1.3),
    "gpu_study": ("<=", 10.0),
    "generate": (">=", 3.0),
    "stream": ("<=", 0.5),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (< 5 minutes)")
    parser.add_argument(
        "--only", action="append", choices=sorted(BENCHMARKS), help="run only NAME (repeatable)"
    )
    args = parser.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    print(_machine_line(), flush=True)
    failed = False
    lines: list[str] = []
    every: list[Result] = []
    for name in names:
        print(f"\n=== {name} ({'quick' if args.quick else 'full'}) ===", flush=True)
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{BENCHMARKS[name]}")
            results: list[Result] = module.run(quick=args.quick)
        except NotReady as exc:
            op, goal = MAIN_GOAL[name]
            results = [Result(name, None, op, goal, reason=f"not ready: {exc}")]
        except Exception:
            traceback.print_exc()
            op, goal = MAIN_GOAL[name]
            results = [Result(name, None, op, goal, reason="crashed (traceback above)")]
            failed = True
        for r in results:
            print(r.line(), flush=True)
            lines.append(r.line())
            every.append(r)
        print(f"({name} took {time.perf_counter() - start:.1f} s)", flush=True)
    print("\n=== summary ===")
    print("\n".join(lines))
    print(f"short: {sum(r.short for r in every)} of {len(every)}")
    return 1 if failed else 0


def _machine_line() -> str:
    import torch

    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return (
        f"machine: {cpu}, {os.cpu_count()} cpus, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), python {platform.python_version()}, "
        f"load avg {load_average()}, {time.strftime('%Y-%m-%d %H:%M')}"
    )


if __name__ == "__main__":
    sys.exit(main())
