"""``reasondiff.compare``: the suite's comparison as one function call (notebooks, scripts).

The same engine the pytest session uses (:class:`~reasondiff.engine.Engine`), the same
metric cache, no pytest. Verdicts come from :mod:`reasondiff.metrics.findings` applied
to the curves of :mod:`reasondiff.metrics.aggregate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .diskcheck import toy_root
from .engine import Engine, EngineConfig, resolve_trace_path
from .methods import check_method
from .metrics.defaults import DOMINANT_K, MAX_TOKENS, RBF_MEDIAN
from .records import PairResult
from .registry import ModelSpec, PairSpec, Registry, key_from_source


def compare(
    base: str,
    descendants: Sequence[str],
    *,
    traces: str | Path | Sequence[str | Path] = "toy",
    device: str = "auto",
    dtype: str = "auto",
    max_tokens: int = MAX_TOKENS,
    layers: Sequence[int] | None = None,
    dominant_k: int = DOMINANT_K,
    rbf_median: str = RBF_MEDIAN,
    keep_activations: bool = False,
    cache_dir: str | Path | None = None,
    registry: Sequence[str | Path] = (),
    method: str | None = None,
) -> list[PairResult]:
    """Compare a base with its descendants; the pytest suite's work as one function call.

    ``base`` and ``descendants`` are registry keys (``r1-distill-qwen-7b``), hub ids
    (``org/name[@rev]``), local checkpoint folders or ``toy:<recipe>``. ``traces`` is a
    trace-set JSONL file, ``"toy"`` (the toy family's set ``a``) or a list of those (the
    first is primary). Returns one :class:`~reasondiff.records.PairResult` per
    descendant, in order: weight-diff records, CKA rows per (trace, layer) and the
    registry's expectations; pass them to :mod:`reasondiff.metrics.aggregate` for curves
    and to :mod:`reasondiff.metrics.findings` for verdicts. Per trace there is one base
    forward and one per descendant; results land in the same metric cache the pytest
    suite uses (``cache_dir``, default ``$REASONDIFF_CACHE`` or ``~/.cache/reasondiff``).
    """
    results, _ = compare_with_engine(
        base,
        descendants,
        traces=traces,
        device=device,
        dtype=dtype,
        max_tokens=max_tokens,
        layers=layers,
        dominant_k=dominant_k,
        rbf_median=rbf_median,
        keep_activations=keep_activations,
        cache_dir=cache_dir,
        registry=registry,
        method=method,
    )
    return results


def compare_with_engine(
    base: str,
    descendants: Sequence[str],
    *,
    traces: str | Path | Sequence[str | Path] = "toy",
    cache_dir: str | Path | None = None,
    registry: Sequence[str | Path] = (),
    method: str | None = None,
    layers: Sequence[int] | None = None,
    **config: Any,
) -> tuple[list[PairResult], Engine]:
    """:func:`compare`, also returning the engine (stage times, forwards, cache counts)."""
    from .cache import default_cache_dir
    from .preflight import check_compare_arguments, check_run

    check_compare_arguments(descendants, method)
    reg = Registry.load([str(p) for p in registry])
    base_spec = _spec(reg, base)
    pairs: list[PairSpec] = []
    for d in descendants:
        spec = _spec(reg, d, base=base_spec.key, method=method)
        if spec.key in {base_spec.key, *(p.descendant.key for p in pairs)}:
            spec = replace(spec, key=f"{spec.key}-{len(pairs) + 1}")  # two ".../model" dirs
        group = spec.groups[0] if spec.base == base_spec.key and spec.groups else None
        pairs.append(PairSpec(base=base_spec, descendant=spec, group=group))
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    engine_config = EngineConfig(
        cache_dir=root, layers=tuple(layers) if layers is not None else None, **config
    )
    specs = [traces] if isinstance(traces, str | Path) else list(traces)

    def paths() -> list[Path]:
        return [
            resolve_trace_path(s, toy_root(root), which)
            for s, which in zip(specs, "abcdefgh", strict=False)
        ]

    notes = check_run(
        layers=engine_config.layers,
        dominant_k=engine_config.dominant_k,
        max_tokens=engine_config.max_tokens,
        pairs=pairs,
        trace_paths=paths,
        toy_root=lambda: toy_root(root),
        names=("layers", "dominant_k", "max_tokens"),
    )
    engine = Engine(engine_config, trace_paths=paths)
    engine.notes.extend(notes)
    try:
        return [engine.pair_result(p, pairs) for p in pairs], engine
    finally:
        engine.release_models()  # a notebook keeps the engine; not the GPU memory


def _spec(
    reg: Registry, ref: str, *, base: str | None = None, method: str | None = None
) -> ModelSpec:
    """A registry model by key or source, else an ad-hoc one keyed as --base/--candidate are."""
    if ref in reg.models:
        return reg.models[ref]
    found = reg.find_by_source(ref)
    if found is not None:
        return found
    check_method(method)
    return ModelSpec(key=key_from_source(ref), source=ref, base=base, method=method)
