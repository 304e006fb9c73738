"""The comparison engine: values equal to the pairwise path, forwards shared, caches honoured.

"Today's path" below is the per-pair scoring the session did before the engine existed
(each side prepared from scratch, the CPU's automatic form), written out here from the
public metric functions as the independent reference. The engine prepares the base once
per (trace, layer) and, on a GPU, holds N x N Gram matrices instead (``form="gram"``);
both must give the same values to 1e-9, on random data with massive activations and on
the toy family.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from reasondiff import activations
from reasondiff.api import compare
from reasondiff.engine import Engine, EngineConfig
from reasondiff.fixtures.toy import ensure_toy_model
from reasondiff.metrics import (
    CkaStats,
    dominant_datapoints,
    linear_cka_and_ablated,
    massive_activations,
    pc1_carried_share,
    pc1_share,
    projection_norm_correlation,
    rbf_cka_prepared,
    top_norm_overlap,
)
from reasondiff.metrics.layer import LAYER_METRICS, prepare_base_layer, score_layer
from reasondiff.registry import ModelSpec, PairSpec

TOY = ("base", "massive", "sft-a", "rl-a")


def reference_scores(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    k: int = 10,
    median: str = "offdiag",
    form: str = "auto",
) -> dict[str, float]:
    """Today's per-pair path (the session's ``_score_layer`` before the engine)."""
    sx = CkaStats.from_matrix(x, name="x", form=form)  # type: ignore[arg-type]
    sy = CkaStats.from_matrix(y, name="y", form=form)  # type: ignore[arg-type]
    u = dominant_datapoints(sx, sy, k=k)
    linear, without = linear_cka_and_ablated(sx, sy, u)
    return {
        "linear": linear,
        "rbf": rbf_cka_prepared(sx, sy, median=median),  # type: ignore[arg-type]
        "linear_without_dominant": without,
        "pc1_share_base": pc1_share(sx),
        "pc1_share_descendant": pc1_share(sy),
        "pc1_carried": pc1_carried_share(sx, sy),
        "dominant_count": float(u.numel()),
        "top_norm_overlap_base": top_norm_overlap(sx, k=k),
        "top_norm_overlap_descendant": top_norm_overlap(sy, k=k),
        "proj_norm_corr_base": projection_norm_correlation(sx),
        "proj_norm_corr_descendant": projection_norm_correlation(sy),
        "massive_count_base": float(len(massive_activations(x).positions)),
        "massive_count_descendant": float(len(massive_activations(y).positions)),
    }


def massive_data(seed: int, n: int, d: int) -> torch.Tensor:
    """Gaussian hidden states with a sink token carrying ~3e4 in a shared carrier dim."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[0, 3] = 3.0e4
    x[5, 3] = 1.2e3
    x[:, 3] += torch.randn(n, generator=g)  # every token has a small value there too
    return x


def assert_close(got: dict[str, Any], want: dict[str, float], tol: float, what: str) -> None:
    assert set(got) == set(LAYER_METRICS)
    for name in LAYER_METRICS:
        assert abs(got[name] - want[name]) <= tol, f"{what} {name}: {got[name]!r} vs {want[name]!r}"


def form_tol(x: torch.Tensor, y: torch.Tensor) -> float:
    """How far the Gram and feature forms of linear CKA may drift apart in float64.

    Both sum the same off-diagonal terms tr(K~ L~) = sum_{i != j} (x_i.x_j)(y_i.y_j), one
    directly, one as ||Xc^T Yc||^2 - sum_i r_i s_i: the diagonal mass sum r_i s_i (and
    its x/x, y/y analogues) cancels, so each result keeps eps x that mass relative to the
    off-diagonal terms. A massive token makes the ratio ~1e6 (about 8 digits left); on
    plain data it is ~1 and the bound is the 1e-9 floor.
    """
    xc, yc = (x - x.mean(0)).double(), (y - y.mean(0)).double()
    r, q = (xc * xc).sum(1), (yc * yc).sum(1)
    ratios = []
    for a, b, ra, rb in ((xc, yc, r, q), (xc, xc, r, r), (yc, yc, q, q)):
        diag = float((ra * rb).sum())
        off = float(torch.linalg.matrix_norm(a.T @ b) ** 2) - diag
        ratios.append(diag / abs(off))
    return max(1e-9, 16 * torch.finfo(torch.float64).eps * max(ratios))


@pytest.mark.parametrize("n, d", [(300, 64), (48, 96)], ids=["N>D", "N<D"])
@pytest.mark.parametrize("form", ["auto", "gram"])
@pytest.mark.parametrize("median", ["offdiag", "all"])
def test_shared_base_scores_equal_todays_pairwise_path(
    n: int, d: int, form: str, median: str
) -> None:
    """One prepared base scores three descendants as three fresh pairwise runs do.

    The CPU's form is today's computation exactly (1e-9, in fact equal); the GPU's Gram
    form agrees within the round-off its cancellation allows (:func:`form_tol`).
    """
    x = massive_data(0, n, d)
    base = prepare_base_layer(x, name="base", k=10, form=form)  # type: ignore[arg-type]
    for i in range(3):
        y = x + (0.3 * (i + 1)) * massive_data(10 + i, n, d) / 1e3
        y[0, 3] *= 1.0 + 0.5 * i  # the massive token moves too
        entry = score_layer(base, y, k=10, rbf_median=median, form=form)  # type: ignore[arg-type]
        tol = 1e-9 if form == "auto" else form_tol(x, y)
        assert tol < 1e-7  # a bound that still catches a wrong formula
        assert_close(entry["metrics"], reference_scores(x, y, median=median), tol, f"desc {i}")
        assert entry["massive"]["base"][0] == [0, 5]  # 3e4 and 1.2e3 are massive


def test_cpu_and_gpu_take_the_gram_path_up_to_its_row_limit() -> None:
    """Both forms hold the N x N Gram even when N > D (one path on CPU and CUDA)."""
    x = massive_data(1, 200, 32)
    for form in ("gram", "auto"):
        side = prepare_base_layer(x, name="b", k=10, form=form)  # type: ignore[arg-type]
        assert side.stats.gram is not None


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root holding the toy checkpoints used here (built once per module)."""
    root = tmp_path_factory.mktemp("engine-toy")
    for recipe in TOY:
        ensure_toy_model(root / "toy", recipe)
    return root


@pytest.fixture
def fresh_cache(toy_root: Path, tmp_path: Path) -> Path:
    """A cache root with the toy checkpoints but no metric results yet."""
    shutil.copytree(toy_root / "toy", tmp_path / "toy", symlinks=True)
    return tmp_path


def _hidden(path: Path, ids: list[int]) -> dict[str, torch.Tensor]:
    from reasondiff.models import load_model

    model = load_model(path, device="cpu", dtype="float32", name=path.name)
    return activations.extract_activations(model, ids)


@pytest.mark.slow
def test_engine_values_equal_todays_path_on_the_toy_family(fresh_cache: Path) -> None:
    from reasondiff.fixtures.toy_traces import ensure_toy_traces
    from reasondiff.traces import load_trace_set

    results = compare(
        "toy:base",
        ["toy:massive", "toy:sft-a"],
        traces="toy",
        cache_dir=fresh_cache,
        layers=[0, 4, 6],
    )
    traces = load_trace_set(ensure_toy_traces(fresh_cache / "toy", "a")).traces[:3]
    base_dir = ensure_toy_model(fresh_cache / "toy", "base")
    for result, recipe in zip(results, ["massive", "sft-a"], strict=True):
        desc_dir = ensure_toy_model(fresh_cache / "toy", recipe)
        got = {(r.trace, r.layer, r.metric): r.value for r in result.cka}
        for trace in traces:
            hb, hd = (
                _hidden(base_dir, list(trace.token_ids)),
                _hidden(desc_dir, list(trace.token_ids)),
            )
            for lay in (0, 4, 6, 10):
                # the engine holds Gram matrices on CPU too (one path with CUDA), so the
                # reference is the whole-matrix Gram path (the feature form loses up to
                # 1e-5 relative to cancellation on the massive model's layer 4)
                want = reference_scores(hb[f"hidden.{lay}"], hd[f"hidden.{lay}"], form="gram")
                mine = {m: got[(f"toy-a:{trace.id}", lay, m)] for m in LAYER_METRICS}
                assert_close(mine, want, 1e-9, f"{recipe} {trace.id} layer {lay}")
            pre = reference_scores(hb["prenorm.10"], hd["prenorm.10"], form="gram")
            assert abs(got[(f"toy-a:{trace.id}", 10, "linear_prenorm")] - pre["linear"]) <= 1e-9


def _specs(recipes: list[str]) -> tuple[ModelSpec, list[PairSpec]]:
    base = ModelSpec(key="toy-base", source="toy:base")
    pairs = [
        PairSpec(
            base=base,
            descendant=ModelSpec(key=f"toy-{r}", source=f"toy:{r}", base="toy-base"),
            group=None,
        )
        for r in recipes
    ]
    return base, pairs


def _engine(cache: Path, *, workers: int | None = None, keep: bool = False) -> Engine:
    from reasondiff.engine import resolve_trace_path

    config = EngineConfig(cache_dir=cache, layers=(0, 5), keep_activations=keep)
    return Engine(
        config,
        trace_paths=lambda: [resolve_trace_path("toy", cache / "toy", "a")],
        worker_count=workers,
    )


@pytest.mark.slow
def test_one_base_forward_per_trace_for_all_descendants_and_a_warm_rerun_loads_nothing(
    fresh_cache: Path,
) -> None:
    _, pairs = _specs(["massive", "sft-a", "rl-a"])
    engine = _engine(fresh_cache)
    first = engine.pair_result(pairs[0], pairs)
    traces = len(engine.sources()[0].trace_set.traces)
    assert engine.forwards == traces * (len(pairs) + 1)  # k + 1 per trace
    for p in pairs[1:]:  # the siblings were scored in the same pass
        engine.pair_result(p, pairs)
    assert engine.forwards == traces * (len(pairs) + 1)
    assert not (fresh_cache / "activations").exists(), "a default run writes no activations"

    warm = _engine(fresh_cache)
    before = activations.FORWARD_COUNTER.count
    again = warm.pair_result(pairs[0], pairs)
    assert activations.FORWARD_COUNTER.count == before
    assert warm.forwards == 0 and "load" not in warm.stage_seconds and not warm.pool.loaded
    assert again.cka == first.cka
    entries = len({(c.trace, c.layer) for c in first.cka})  # one per (trace, layer)
    assert engine.stats.metrics_computed == len(pairs) * entries
    assert warm.stats.metrics_computed == 0 and warm.stats.metrics_loaded == entries


@pytest.mark.slow
def test_two_workers_split_the_descendants_within_k_plus_workers_forwards(
    fresh_cache: Path,
) -> None:
    """Worker A claims ceil(k / 2) pairs, worker B the rest: k + 2 forwards per trace."""
    _, pairs = _specs(["massive", "sft-a", "rl-a"])
    a, b = _engine(fresh_cache, workers=2), _engine(fresh_cache, workers=2)
    ra = a.pair_result(pairs[0], pairs)
    traces = len(a.sources()[0].trace_set.traces)
    assert a.forwards == traces * 3  # base + 2 claimed descendants
    rb = [b.pair_result(p, pairs) for p in pairs]
    assert b.forwards == traces * 2  # base + the one left
    assert a.forwards + b.forwards <= traces * (len(pairs) + 2)
    single = _engine(fresh_cache / "single")  # same values from a one-process run
    shutil.copytree(fresh_cache / "toy", fresh_cache / "single" / "toy", symlinks=True)
    assert [r.cka for r in (ra, *rb[1:])] == [single.pair_result(p, pairs).cka for p in pairs]


@pytest.mark.slow
def test_keep_activations_stores_and_reuses_hidden_states(fresh_cache: Path) -> None:
    _, pairs = _specs(["massive"])
    first = _engine(fresh_cache, keep=True)
    r1 = first.pair_result(pairs[0], pairs)
    assert list((fresh_cache / "activations").rglob("*.safetensors"))
    shutil.rmtree(fresh_cache / "json" / "metrics")  # metrics gone, activations kept
    second = _engine(fresh_cache, keep=True)
    r2 = second.pair_result(pairs[0], pairs)
    assert second.forwards == 0 and second.stats.activations_loaded > 0
    assert r2.cka == r1.cka


@pytest.mark.slow
def test_a_bad_sibling_does_not_fail_the_requested_pair(fresh_cache: Path, tmp_path: Path) -> None:
    """A descendant whose checkpoint is broken fails its own result, not its siblings'."""
    broken = tmp_path / "broken"
    shutil.copytree(ensure_toy_model(fresh_cache / "toy", "rl-a"), broken)
    (broken / "config.json").write_text('{"num_hidden_layers": 3}', "utf-8")
    base, pairs = _specs(["massive"])
    bad = PairSpec(
        base=base,
        descendant=ModelSpec(key="broken", source=str(broken), base="toy-base"),
        group=None,
    )
    engine = _engine(fresh_cache)
    good = engine.pair_result(pairs[0], [*pairs, bad])
    assert good.cka
    with pytest.raises(Exception, match="broken"):
        engine.pair_result(bad, [*pairs, bad])


def test_engine_config_maps_every_option(tmp_path: Path) -> None:
    """Every EngineConfig field comes from its option: each set to a non-default value."""
    import dataclasses

    from reasondiff.options import DiffOptions

    values: dict[str, object] = {
        "device": "cpu",
        "dtype": "float32",
        "max_tokens": 77,
        "layers": (1, 2),
        "dominant_k": 5,
        "rbf_median": "all",
        "keep_activations": True,
        "diff_cache_cap": 1 << 20,
        "torch_threads": 3,
        "trust_remote_code": True,
        "allow_pickle": True,
        "pass_size": 2,
        "stream_blocks": True,
    }
    opts = DiffOptions(diff_cache=str(tmp_path / "c"), **values)  # type: ignore[arg-type]
    cfg = EngineConfig.from_options(opts)
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    assert fields == {"cache_dir", *values}, "a new EngineConfig field needs a row here"
    default = EngineConfig(cache_dir=tmp_path)
    for name, value in values.items():
        assert getattr(default, name) != value, f"{name}: pick a non-default test value"
        assert getattr(cfg, name) == value, name
    assert cfg.cache_dir == opts.cache_dir() == tmp_path / "c"


def test_fast_tokenizer_matches_auto_tokenizer_on_the_toy_tokenizer(toy_root: Path) -> None:
    from reasondiff.fixtures.toy_traces import ensure_toy_traces
    from reasondiff.models import load_tokenizer
    from reasondiff.tokenizer import FastTokenizer, load_fast_tokenizer
    from reasondiff.traces import load_trace_set, tokenizer_identity

    path = ensure_toy_model(toy_root / "toy", "base")
    fast, auto = load_fast_tokenizer(path), load_tokenizer(path)
    assert isinstance(fast, FastTokenizer)
    assert tokenizer_identity(fast) == tokenizer_identity(auto)
    for trace in load_trace_set(ensure_toy_traces(toy_root / "toy", "a")).traces[:4]:
        ids = fast(trace.text, add_special_tokens=False)["input_ids"]
        assert ids == auto(trace.text, add_special_tokens=False)["input_ids"]
        assert fast.convert_ids_to_tokens(ids) == auto.convert_ids_to_tokens(ids)
        assert fast.decode(ids) == auto.decode(ids)


def test_fingerprints_are_hashed_once_across_processes(
    toy_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reasondiff import fingerprint

    path = ensure_toy_model(toy_root / "toy", "base")
    hashed: list[str] = []
    real = fingerprint._sha256_file
    monkeypatch.setattr(fingerprint, "_sha256_file", lambda p: hashed.append(p.name) or real(p))
    monkeypatch.setattr(fingerprint, "_MEMO", {})
    first = _engine(tmp_path).fingerprint(path)
    assert hashed, "the first process hashes the files"
    hashed.clear()
    monkeypatch.setattr(fingerprint, "_MEMO", {})  # a new process (an xdist worker)
    assert _engine(tmp_path).fingerprint(path) == first
    assert hashed == []
    (path / "config.json").touch()  # a change (mtime / ctime) re-hashes that file only
    monkeypatch.setattr(fingerprint, "_MEMO", {})
    assert _engine(tmp_path).fingerprint(path) == first
    assert hashed == ["config.json"]


@pytest.mark.slow
def test_a_pass_takes_only_the_descendants_that_fit_in_memory(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for the base and one descendant, each pass scores one: k passes."""
    _, pairs = _specs(["massive", "sft-a"])
    engine = _engine(fresh_cache)
    one_model = engine.model_bytes(ensure_toy_model(fresh_cache / "toy", "base"))
    assert one_model > 0
    monkeypatch.setattr(engine.pool, "memory_budget", lambda: int(2.5 * one_model))
    engine.pair_result(pairs[0], pairs)
    traces = len(engine.sources()[0].trace_set.traces)
    assert engine.forwards == traces * 2  # base + the requested pair only
    engine.pair_result(pairs[1], pairs)
    assert engine.forwards == traces * 4  # a second pass for the other descendant


def test_pass_size_caps_the_claim(fresh_cache: Path) -> None:
    from reasondiff.engine import resolve_trace_path

    _, pairs = _specs(["massive", "sft-a", "rl-a"])
    config = EngineConfig(cache_dir=fresh_cache, layers=(0, 5), pass_size=1)
    engine = Engine(config, trace_paths=[resolve_trace_path("toy", fresh_cache / "toy", "a")])
    src = engine.sources()[0]
    claimed = engine.scheduler.claim(
        pairs[0], pairs[1:], lambda p: engine.pair_key(p, src), [0, 5, 10]
    )
    try:
        assert [job.pair.pair_id for job, _ in claimed] == [pairs[0].pair_id]
    finally:
        for _, lock in claimed:
            lock.release()


def test_the_hidden_state_source_is_one_pluggable_piece(fresh_cache: Path, tmp_path: Path) -> None:
    """A source of its own (here: one that wraps the whole-model forwards and records what
    it hands out) drives the pass layer by layer and gives the default source's rows."""
    from reasondiff.engine import resolve_trace_path
    from reasondiff.hidden_states import WholeModelForwards

    _, pairs = _specs(["massive"])
    full = resolve_trace_path("toy", fresh_cache / "toy", "a")
    short = tmp_path / "two-traces.jsonl"  # header + 2 traces: two cheap cold runs
    short.write_text("".join(full.read_text("utf-8").splitlines(keepends=True)[:3]), "utf-8")

    seen: list[tuple[str, int, list[str], list[str]]] = []

    class Recording:
        def __init__(self, inner: WholeModelForwards) -> None:
            self.inner = inner

        def __call__(self, trace, models, layers, num_layers, errors):  # type: ignore[no-untyped-def]
            for lay, states in self.inner(trace, models, layers, num_layers, errors):
                seen.append((trace.id, lay, sorted(states), sorted(states["base"])))
                yield lay, states

    def engine(cache: Path, **kw: Any) -> Engine:
        config = EngineConfig(cache_dir=cache, layers=(0, 5))
        return Engine(config, trace_paths=[short], **kw)

    default = engine(fresh_cache).pair_result(pairs[0], pairs)
    other = tmp_path / "other"
    shutil.copytree(fresh_cache / "toy", other / "toy", symlinks=True)
    plugged_engine = engine(
        other, hidden_source=lambda c, pool, log: Recording(WholeModelForwards(c, pool, log))
    )
    plugged = plugged_engine.pair_result(pairs[0], pairs)

    traces = plugged_engine.sources()[0].trace_set.traces
    assert len(traces) == 2
    assert [(t, lay) for t, lay, _, _ in seen] == [
        (t.id, lay) for t in traces for lay in (0, 5, 10)
    ]
    assert all("base" in keys and len(keys) == 2 for _, _, keys, _ in seen)  # base + 1
    assert {lay: kinds for _, lay, _, kinds in seen} == {
        0: ["hidden"],
        5: ["hidden"],
        10: ["hidden", "prenorm"],
    }
    assert plugged.cka and plugged.cka == default.cka and plugged.massive == default.massive
