"""Block-streamed scoring passes in the engine (``--stream-blocks``, issue 17 item 1).

The reference is the whole-model pass of the same engine on the toy family (its values
are checked against an independent path in test_engine.py); the streamed pass must give
the same rows, share the metric cache with it, be chosen when the models do not fit the
memory budget, and fall back to whole passes for an architecture it cannot stream.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

import reasondiff.streaming as streaming
from reasondiff.api import Comparison, compare, compare_with_engine
from reasondiff.block_reader import SafetensorsReader
from reasondiff.engine import Engine, EngineConfig, resolve_trace_path
from reasondiff.fixtures.toy import ensure_toy_model
from reasondiff.metrics.defaults import MAX_TOKENS
from reasondiff.model_pool import ModelPool
from reasondiff.registry import adhoc_pair

DESCENDANTS = ["toy:massive", "toy:sft-a"]
FAST: dict[str, Any] = {"bootstrap": 50, "torch_threads": 1}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stream-toy")
    for recipe in ("base", "massive", "sft-a"):
        ensure_toy_model(root / "toy", recipe)
    return root


@pytest.fixture
def fresh_cache(toy_root: Path, tmp_path: Path) -> Path:
    """The toy checkpoints, no metric results yet."""
    shutil.copytree(toy_root / "toy", tmp_path / "toy", symlinks=True)
    return tmp_path


@pytest.fixture(scope="module")
def whole(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Comparison:
    """The reference: whole-model passes in a cache of its own."""
    cache = tmp_path_factory.mktemp("stream-whole")
    shutil.copytree(toy_root / "toy", cache / "toy", symlinks=True)
    got = compare("toy:base", DESCENDANTS, cache_dir=cache, raise_on_error=True, **FAST)
    assert not any("streaming blocks" in n for n in got.notes)
    return got


#: 16 toy traces cut to 160 tokens: the streamed bound of base + both descendants (2.8 MB)
#: is then below the whole size of base + one (3.8 MB), as for models larger than memory.
SHORT: dict[str, Any] = {**FAST, "max_tokens": 160}


@pytest.fixture(scope="module")
def whole_short(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Comparison:
    """The whole-model reference at ``SHORT``'s token cut."""
    cache = tmp_path_factory.mktemp("stream-whole-short")
    shutil.copytree(toy_root / "toy", cache / "toy", symlinks=True)
    return compare("toy:base", DESCENDANTS, cache_dir=cache, raise_on_error=True, **SHORT)


@pytest.fixture
def streamed_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts stream_layers calls (each one a block-major pass); the real one runs."""
    calls: list[int] = []
    real = streaming.stream_layers

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(args[0]))  # models in the pass
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "stream_layers", counting)
    return calls


def _rows(comparison: Comparison) -> dict[tuple[str, str, int, str], float]:
    return {
        (r.descendant, r.trace, r.layer, r.metric): r.value for res in comparison for r in res.cka
    }


def assert_same_rows(got: Comparison, want: Comparison) -> None:
    """Every CKA metric within 1e-9, the same massive-activation positions."""
    a, b = _rows(got), _rows(want)
    assert a.keys() == b.keys() and a
    bad = {k: (a[k], b[k]) for k in a if not abs(a[k] - b[k]) <= 1e-9}
    assert not bad, f"{len(bad)} of {len(a)} rows differ, e.g. {list(bad.items())[:3]}"
    for g, w in zip(got, want, strict=True):
        assert [(m.model, m.trace, m.layer, m.positions) for m in g.massive] == [
            (m.model, m.trace, m.layer, m.positions) for m in w.massive
        ]
        for m, n in zip(g.massive, w.massive, strict=True):
            assert m.max_abs == pytest.approx(n.max_abs, rel=1e-6)


def test_streamed_rows_equal_whole_rows(
    fresh_cache: Path, whole: Comparison, streamed_calls: list[int]
) -> None:
    got = compare(
        "toy:base",
        DESCENDANTS,
        cache_dir=fresh_cache,
        raise_on_error=True,
        stream_blocks=True,
        **FAST,
    )
    assert streamed_calls == [3]  # one block-major pass: base + both descendants
    assert "streaming blocks: --stream-blocks" in got.notes
    assert_same_rows(got, whole)
    for g, w in zip(got, whole, strict=True):
        assert {k: v.observed for k, v in g.verdicts.items()} == {
            k: v.observed for k, v in w.verdicts.items()
        }


def test_a_whole_run_after_a_streamed_run_computes_nothing(
    fresh_cache: Path, whole: Comparison, streamed_calls: list[int]
) -> None:
    _, eng = compare_with_engine(
        "toy:base", DESCENDANTS, cache_dir=fresh_cache, stream_blocks=True, **FAST
    )
    assert streamed_calls == [3] and eng.forwards > 0
    again, eng2 = compare_with_engine("toy:base", DESCENDANTS, cache_dir=fresh_cache, **FAST)
    assert eng2.forwards == 0 and eng2.stats.activations_computed == 0
    assert not eng2.pool.loaded  # no model loaded: every entry came from the cache
    assert_same_rows(again, whole)
    # and the other way round: streaming after a whole run reads the same cache
    _, eng3 = compare_with_engine(
        "toy:base", DESCENDANTS, cache_dir=fresh_cache, stream_blocks=True, **FAST
    )
    assert eng3.forwards == 0 and streamed_calls == [3]


@pytest.fixture
def block_reads(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, str]]:
    """Counts whole-tensor reads of block streaming per (checkpoint dir, tensor)."""
    reads: Counter[tuple[str, str]] = Counter()
    real = SafetensorsReader.read

    def counting(self: SafetensorsReader, tensor: str, **kwargs: Any) -> Any:
        reads[(str(self.path.resolve()), tensor)] += 1
        return real(self, tensor, **kwargs)

    monkeypatch.setattr(SafetensorsReader, "read", counting)
    return reads


def _bounds(cache: Path, recipes: list[str], max_tokens: int = MAX_TOKENS) -> tuple[int, int]:
    """(whole bytes of the toy models, streamed bound of one pass over all of them) at
    float32, the toy trace set's token counts: what the scheduler claims by."""
    from reasondiff.traces import load_trace_set

    dirs = [ensure_toy_model(cache / "toy", r) for r in recipes]
    configs = [json.loads((d / "config.json").read_text()) for d in dirs]
    traces = load_trace_set(resolve_trace_path("toy", cache / "toy", "a"))
    tokens = [min(len(t), max_tokens) for t in traces.traces]
    bound = streaming.memory_bound(configs, tokens, dtype=torch.float32).total
    whole = sum(f.stat().st_size for d in dirs for f in d.glob("*.safetensors"))
    return whole, bound


def test_models_over_the_memory_budget_stream_in_one_pass(
    fresh_cache: Path,
    whole_short: Comparison,
    streamed_calls: list[int],
    block_reads: Counter[tuple[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not even base + one descendant fits whole, but the streamed bound of base + both
    does: the claim is sized by that bound, so base and both descendants go in one
    streamed pass and every block tensor of every checkpoint is read exactly once in the
    run (sized by whole models, as before, it was two passes and the base read twice)."""
    recipes = ["base", "massive", "sft-a"]
    one_pair, _ = _bounds(fresh_cache, recipes[:2])
    _, bound = _bounds(fresh_cache, recipes, SHORT["max_tokens"])
    assert bound < one_pair, (bound, one_pair)  # the budget below sits between the two
    budget = (bound + one_pair) // 2
    monkeypatch.setattr(ModelPool, "memory_budget", lambda self: budget)
    got = compare("toy:base", DESCENDANTS, cache_dir=fresh_cache, raise_on_error=True, **SHORT)
    notes = [n for n in got.notes if n.startswith("streaming blocks: ")]
    assert notes and "do not fit the memory budget" in notes[0], got.notes
    assert "toy-base" in notes[0]
    assert streamed_calls == [3]  # one pass: base + both descendants
    block_tensors = {k for k in block_reads if ".layers." in k[1]}
    assert {Path(d).name for d, _ in block_tensors} == set(recipes)
    assert len(block_tensors) == 3 * 10 * 12  # 3 checkpoints x 10 blocks x 12 tensors
    twice = {k: n for k, n in block_reads.items() if n != 1}
    assert not twice, f"tensors read more than once: {list(twice.items())[:5]}"
    assert_same_rows(got, whole_short)


def test_a_budget_under_the_streamed_bound_of_all_splits_the_pass(
    fresh_cache: Path,
    whole_short: Comparison,
    streamed_calls: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cap is the streamed bound, not "no cap": a budget that holds a streamed pass
    over base + one descendant but not over base + two gives two passes of two."""
    cut = SHORT["max_tokens"]
    one_pair, two = _bounds(fresh_cache, ["base", "massive"], cut)
    _, three = _bounds(fresh_cache, ["base", "massive", "sft-a"], cut)
    budget = (two + three) // 2
    assert two < budget < three and budget < one_pair  # streams, two models at a time
    monkeypatch.setattr(ModelPool, "memory_budget", lambda self: budget)
    got = compare("toy:base", DESCENDANTS, cache_dir=fresh_cache, raise_on_error=True, **SHORT)
    assert streamed_calls == [2, 2]
    assert_same_rows(got, whole_short)


def test_the_claim_sizes_by_whole_models_when_the_pass_cannot_stream(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An architecture that cannot stream keeps whole passes: the claim is capped by whole
    model sizes (one descendant per pass here), no model is loaded to decide it."""
    real = streaming.supports_streaming
    monkeypatch.setattr(
        streaming, "supports_streaming", lambda c: real({**c, "model_type": "gpt2"})
    )
    _, bound = _bounds(fresh_cache, ["base", "massive", "sft-a"])
    monkeypatch.setattr(ModelPool, "memory_budget", lambda self: bound + 1)
    pairs = [adhoc_pair("toy:base", f"toy:{r}") for r in ("massive", "sft-a")]
    engine = Engine(
        EngineConfig(cache_dir=fresh_cache),
        trace_paths=[resolve_trace_path("toy", fresh_cache / "toy", "a")],
    )
    src = engine.sources()[0]
    claimed = engine.scheduler.claim(
        pairs[0], pairs[1:], lambda p: engine.pair_key(p, src), list(range(11)), [40] * 4
    )
    try:
        assert [job.pair.pair_id for job, _ in claimed] == [pairs[0].pair_id]
    finally:
        for _, lock in claimed:
            lock.release()
    assert not engine.pool.loaded


def test_models_within_the_budget_do_not_stream(
    fresh_cache: Path, streamed_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ModelPool, "memory_budget", lambda self: 1 << 40)
    got = compare("toy:base", DESCENDANTS[:1], cache_dir=fresh_cache, layers=[0], **FAST)
    assert streamed_calls == [] and not any("streaming" in n for n in got.notes)


def test_an_unsupported_architecture_falls_back_with_a_note(
    fresh_cache: Path,
    whole: Comparison,
    streamed_calls: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = streaming.supports_streaming

    def as_gpt2(config: Any) -> tuple[bool, str]:  # the toy checkpoints claim another family
        return real({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})

    monkeypatch.setattr(streaming, "supports_streaming", as_gpt2)
    got = compare(
        "toy:base",
        DESCENDANTS,
        cache_dir=fresh_cache,
        raise_on_error=True,
        stream_blocks=True,
        **FAST,
    )
    assert streamed_calls == []
    notes = [n for n in got.notes if n.startswith("not streaming blocks")]
    assert len(notes) == 1, got.notes
    assert (
        "model toy-base: GPT2LMHeadModel (model_type 'gpt2') is not block-streamable" in (notes[0])
    )
    assert "falls back to whole-model passes" in notes[0]
    assert_same_rows(got, whole)
