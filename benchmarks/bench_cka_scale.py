"""cka_scale: how linear and RBF CKA time and memory grow with the number of tokens N.

Documented complexity (METHODS §2-3): linear CKA in feature form is O(N D^2), so time vs N
has log-log slope ~1; RBF CKA is O(N^2 D), slope ~2, and chunked, so its working memory
must stay far below an N x N float64 matrix (N^2 x 8 bytes). Each (kernel, N) runs in a
fresh process (``scale_child``) so its RSS high-water mark is its own.

Sizes too slow for the machine are estimated from the smaller ones (slope 2) before
running and skipped with a note when they would exceed ``MAX_RBF_SECONDS``.
"""

from __future__ import annotations

import statistics

from benchmarks.harness import (
    NotReady,
    Result,
    loglog_slope,
    mib,
    print_table,
    python_child,
    run_child,
)

NAME = "cka_scale"
MAX_RBF_SECONDS = 150.0
#: Slope goals: the documented exponent plus tolerance for fixed overheads and noise.
LINEAR_SLOPE_GOAL = 1.3
RBF_SLOPE_GOAL = 2.3
#: RBF working memory must be at most this fraction of one N x N float64 matrix, at the
#: memory-probe sizes (large N, small D so they run in seconds; memory hardly depends on D).
RBF_MEMORY_GOAL = 0.25
#: One probe: N = 16384 already takes ~3 minutes on 2 cores (the exact median's selection
#: passes dominate at small D); 32768 would take ~12. --quick skips the memory goal.
MEMORY_PROBES_FULL = ((16384, 128),)
MEMORY_PROBES_QUICK: tuple[tuple[int, int], ...] = ()


def _measure(kernel: str, n: int, d: int, repeats: int) -> dict[str, float]:
    run = run_child(python_child("scale_child", kernel, str(n), str(d), str(repeats)), check=False)
    if run.returncode != 0:
        tail = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else ""
        if "ImportError" in run.stderr or "ModuleNotFoundError" in run.stderr:
            raise NotReady(f"reasondiff.metrics: {tail}")
        raise RuntimeError(
            f"scale_child {kernel} N={n} exited {run.returncode}:\n{run.stderr[-3000:]}"
        )
    data = run.json()
    return {
        "seconds": statistics.median(data["seconds"]),
        "work_bytes": max(0, data["hwm_after"] - data["hwm_before"]),
        "peak_bytes": run.peak_rss_bytes,
        "value": data["value"],
    }


def run(*, quick: bool) -> list[Result]:
    d = 512 if quick else 1536
    sizes = [1024, 2048, 4096] if quick else [1024, 4096, 16384, 32768]
    rows: list[list[object]] = []
    notes: list[str] = []
    points: dict[str, list[tuple[int, float]]] = {"linear": [], "rbf": []}
    rbf_mem: list[float] = []
    for kernel in ("linear", "rbf"):
        for n in sizes:
            if kernel == "rbf" and points["rbf"]:
                n0, s0 = points["rbf"][-1]
                estimate = s0 * (n / n0) ** 2
                if estimate > MAX_RBF_SECONDS:
                    notes.append(
                        f"rbf N={n} skipped: estimated {estimate:.0f} s > {MAX_RBF_SECONDS:.0f} s"
                    )
                    continue
            repeats = 3 if n <= 4096 else 1
            m = _measure(kernel, n, d, repeats)
            points[kernel].append((n, m["seconds"]))
            dense = n * n * 8
            rows.append(
                [
                    kernel,
                    n,
                    d,
                    m["seconds"],
                    mib(m["work_bytes"]),
                    mib(m["peak_bytes"]),
                    mib(dense),
                    m["work_bytes"] / dense,
                    f"{m['value']:.6f}",
                ]
            )
    for n, dp in MEMORY_PROBES_QUICK if quick else MEMORY_PROBES_FULL:
        m = _measure("rbf", n, dp, 1)
        dense = n * n * 8
        rbf_mem.append(m["work_bytes"] / dense)
        rows.append(
            [
                "rbf (memory probe)",
                n,
                dp,
                m["seconds"],
                mib(m["work_bytes"]),
                mib(m["peak_bytes"]),
                mib(dense),
                m["work_bytes"] / dense,
                f"{m['value']:.6f}",
            ]
        )
    print_table(
        f"cka_scale: time and memory vs N (D={d}; slopes from the D={d} rows, memory goal from the probe rows; work MiB = RSS high-water increase during the metric)",
        [
            "kernel",
            "N",
            "D",
            "seconds",
            "work MiB",
            "peak RSS MiB",
            "N^2x8 MiB",
            "work / N^2x8",
            "value",
        ],
        rows,
    )
    for note in notes:
        print(note)
    results: list[Result] = []
    for kernel, goal in (("linear", LINEAR_SLOPE_GOAL), ("rbf", RBF_SLOPE_GOAL)):
        pts = points[kernel]
        slope = loglog_slope([p[0] for p in pts], [p[1] for p in pts]) if len(pts) >= 2 else None
        print(
            f"{kernel}: log-log slope of time vs N = {slope if slope is None else round(slope, 2)} "
            f"(documented: {'1 (O(N D^2))' if kernel == 'linear' else '2 (O(N^2 D))'})"
        )
        results.append(Result(f"{NAME}_{kernel}_slope", slope, "<=", goal))
    if rbf_mem:
        results.append(Result(f"{NAME}_rbf_memory", max(rbf_mem), "<=", RBF_MEMORY_GOAL))
    else:
        results.append(
            Result(
                f"{NAME}_rbf_memory",
                None,
                "<=",
                RBF_MEMORY_GOAL,
                reason="--quick runs no large-N memory probe",
                scope="not measured",
            )
        )
    return results
