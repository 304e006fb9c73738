"""Child process of the weight_diff benchmark: one approach, one process, one peak RSS.

``python -m benchmarks.weight_child {ours|naive} BASE_DIR DESC_DIR`` prints one JSON line:
import and work seconds, and the normalized difference per tensor name (so the parent can
check both approaches agree). Each approach runs in its own process so that its peak RSS
(``wait4`` in the parent) is its own.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def naive(base_dir: Path, desc_dir: Path) -> dict[str, float]:
    """The naive approach: both models loaded whole, then compared parameter by parameter.

    The per-tensor math is the same as the project's (float32, float64 sums) so that the
    benchmark compares the loading strategy, not the arithmetic.
    """
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    desc = AutoModelForCausalLM.from_pretrained(desc_dir, dtype=torch.bfloat16)
    desc_params = dict(desc.named_parameters())
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, p in base.named_parameters():
            a = p.to(torch.float32)
            b = desc_params[name].to(torch.float32)
            diff = torch.linalg.vector_norm(b - a, dtype=torch.float64)
            na = torch.linalg.vector_norm(a, dtype=torch.float64)
            nb = torch.linalg.vector_norm(b, dtype=torch.float64)
            out[name] = float(diff / (0.5 * na + 0.5 * nb))
    return out


def ours(base_dir: Path, desc_dir: Path) -> dict[str, float]:
    """The project's streaming comparison."""
    from reasondiff.weightdiff import stream_weight_diff

    records = stream_weight_diff(base_dir, desc_dir, base_name="base", desc_name="desc")
    return {r.tensor: float(r.normalized_diff) for r in records}


def main(argv: list[str]) -> int:
    mode, base_dir, desc_dir = argv[0], Path(argv[1]), Path(argv[2])
    start = time.perf_counter()
    import torch  # noqa: F401  (import cost measured apart from the work)

    if mode == "naive":
        import transformers  # noqa: F401
    else:
        import reasondiff.weightdiff  # noqa: F401
    imported = time.perf_counter()
    values = {"naive": naive, "ours": ours}[mode](base_dir, desc_dir)
    done = time.perf_counter()
    print(json.dumps({"import_s": imported - start, "work_s": done - imported, "values": values}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
