"""Block-streamed scoring passes in the engine (``--stream-blocks``, issue 17 item 1).

The reference is the whole-model pass of the same engine on the toy family (its values
are checked against an independent path in test_engine.py); the streamed pass must give
the same rows, share the metric cache with it, be chosen when the models do not fit the
memory budget, and fall back to whole passes for an architecture it cannot stream.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

import reasondiff.streaming as streaming
from reasondiff.api import Comparison, compare, compare_with_engine
from reasondiff.fixtures.toy import ensure_toy_model
from reasondiff.model_pool import ModelPool

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


def test_models_over_the_memory_budget_stream_with_a_note(
    fresh_cache: Path,
    whole: Comparison,
    streamed_calls: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ModelPool, "memory_budget", lambda self: 1 << 20)  # 1 MiB
    got = compare("toy:base", DESCENDANTS, cache_dir=fresh_cache, raise_on_error=True, **FAST)
    notes = [n for n in got.notes if n.startswith("streaming blocks: ")]
    assert notes and "do not fit the memory budget (0.00 GiB)" in notes[0], got.notes
    assert "toy-base" in notes[0]
    # the budget also keeps whole passes to one descendant each: two streamed passes
    assert streamed_calls == [2, 2]
    assert_same_rows(got, whole)


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
