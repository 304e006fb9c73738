"""forwards: model calls needed for every pair of a group of k descendants on T traces.

Reference approach: each (base, descendant) pair runs both models on every trace, so
2k forwards per trace. Ours: the project's real path (``extract_activations`` through
``ActivationCache``) computes the base once per trace and each descendant once: k + 1.
Forwards are *counted* by a forward pre-hook on every model, not derived by arithmetic.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import tiny_models
from benchmarks.harness import NotReady, Result, print_table

NAME = "forwards"


class CallCounter:
    """Counts calls of each model through a forward pre-hook (one per top-level call)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def attach(self, name: str, model: torch.nn.Module) -> Callable[[], None]:
        self.calls[name] = 0

        def hook(_module: torch.nn.Module, _args: object) -> None:
            self.calls[name] += 1

        handle = model.register_forward_pre_hook(hook)
        return handle.remove

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def reference_forwards(
    base: torch.nn.Module, descs: list[torch.nn.Module], traces: list[list[int]]
) -> None:
    """Each pair recomputes both models' hidden states on every trace (no reuse)."""
    with torch.inference_mode():
        for desc in descs:
            for ids in traces:
                input_ids = torch.tensor([ids])
                base(input_ids=input_ids, output_hidden_states=True)
                desc(input_ids=input_ids, output_hidden_states=True)


def ours_forwards(
    base: tuple[str, torch.nn.Module],
    descs: list[tuple[str, torch.nn.Module]],
    traces: list[list[int]],
    cache_root: Path,
) -> None:
    """Every pair through the project's cache: a model's trace is computed once."""
    try:
        from reasondiff.activations import extract_activations
        from reasondiff.cache import ActivationCache, cache_key
    except ImportError as exc:
        raise NotReady(f"reasondiff.activations / reasondiff.cache: {exc}") from exc
    cache = ActivationCache(cache_root, cap_bytes=None)

    def acts(name: str, model: torch.nn.Module, t: int, ids: list[int]) -> dict[str, torch.Tensor]:
        key = cache_key(model=name, trace=f"bench:{t}", tokens=str(len(ids)))
        meta = {"model": name, "trace": f"bench:{t}"}
        result: dict[str, torch.Tensor] = cache.get_or_compute(
            key, meta, lambda: extract_activations(model, ids)
        )
        return result

    base_name, base_model = base
    for desc_name, desc_model in descs:
        for t, ids in enumerate(traces):
            acts(base_name, base_model, t, ids)
            acts(desc_name, desc_model, t, ids)


def run(*, quick: bool) -> list[Result]:
    k, t_count, length = (4, 2, 64) if quick else (4, 4, 256)
    with tempfile.TemporaryDirectory(prefix="rd-bench-fwd-") as tmp:
        root = Path(tmp)
        base_dir, desc_dirs = tiny_models.build_family(root / "models", descendants=k)
        base = tiny_models.load(base_dir)
        descs = [tiny_models.load(d) for d in desc_dirs]
        traces = tiny_models.random_traces(t_count, length=length)
        counter = CallCounter()
        removers = [counter.attach("base", base)]
        removers += [counter.attach(f"desc-{j}", m) for j, m in enumerate(descs)]
        try:
            start = time.perf_counter()
            reference_forwards(base, descs, traces)
            ref_s = time.perf_counter() - start
            ref_calls = dict(counter.calls)
            counter.calls = dict.fromkeys(counter.calls, 0)
            start = time.perf_counter()
            ours_forwards(
                ("base", base),
                [(f"desc-{j}", m) for j, m in enumerate(descs)],
                traces,
                root / "cache",
            )
            ours_s = time.perf_counter() - start
            ours_calls = dict(counter.calls)
        finally:
            for remove in removers:
                remove()
    ref_total, ours_total = sum(ref_calls.values()), sum(ours_calls.values())
    rows = [
        [
            "reference (2k per trace)",
            ref_calls["base"],
            ref_total - ref_calls["base"],
            ref_total,
            ref_total / t_count,
            ref_s,
        ],
        [
            "ours (cache)",
            ours_calls["base"],
            ours_total - ours_calls["base"],
            ours_total,
            ours_total / t_count,
            ours_s,
        ],
    ]
    print_table(
        f"forwards: k={k} descendants, T={t_count} traces of {length} tokens (tiny Qwen2)",
        ["approach", "base calls", "descendant calls", "total", "per trace", "seconds"],
        rows,
    )
    if ours_total == 0:
        return [Result(NAME, None, ">=", 2 * k / (k + 1), reason="ours made no model call")]
    return [Result(NAME, ref_total / ours_total, ">=", round(2 * k / (k + 1), 2))]
