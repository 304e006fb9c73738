"""Child process of the cka_scale benchmark: one kernel at one size, in a fresh process.

``python -m benchmarks.scale_child {linear|rbf} N D REPEATS`` prints one JSON line with the
seconds of each repeat and the RSS high-water mark (``VmHWM``) before and after the
metric ran. The data is created, and the code paths warmed on a small slice, before the
"before" mark, so the difference is the metric's own working memory (torch allocations
included, which ``tracemalloc`` cannot see).
"""

from __future__ import annotations

import json
import sys
import time


def vm_hwm_bytes() -> int:
    """This process's peak resident set size so far, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM line in /proc/self/status (not Linux?)")


def main(argv: list[str]) -> int:
    kernel, n, d, repeats = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    import torch

    from reasondiff.metrics import linear_cka, rbf_cka

    fn = {"linear": linear_cka, "rbf": rbf_cka}[kernel]
    gen = torch.Generator().manual_seed(n)
    rank = 32
    factors = torch.randn(n, rank, generator=gen)
    x = factors @ torch.randn(rank, d, generator=gen) + 0.5 * torch.randn(n, d, generator=gen)
    y = x + 0.3 * torch.randn(n, d, generator=gen)
    x[0, 3] = 1.0e4  # a massive activation, as in real hidden states
    y[0, 3] = 0.5e4
    fn(x[:256], y[:256])  # warm code paths (lazy imports, thread pools) before measuring
    before = vm_hwm_bytes()
    seconds: list[float] = []
    value = float("nan")
    for _ in range(repeats):
        start = time.perf_counter()
        value = float(fn(x, y))
        seconds.append(time.perf_counter() - start)
    after = vm_hwm_bytes()
    print(
        json.dumps({"seconds": seconds, "hwm_before": before, "hwm_after": after, "value": value})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
