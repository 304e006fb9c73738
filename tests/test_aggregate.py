"""Rows to curves and weight tables (reasondiff.metrics.aggregate)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reasondiff.errors import MetricInputError
from reasondiff.metrics.aggregate import (
    curves_from_rows,
    per_matrix_diffs,
    trace_set_of,
    trace_sets_of,
    weight_layer_table,
    weight_layer_totals,
    weight_outside_layers,
    weight_summary,
)
from reasondiff.metrics.findings import bootstrap_interval, localization
from reasondiff.records import CkaRecord, WeightRecord

NAN = math.nan


def _rows(
    table: np.ndarray, *, metric: str = "linear", trace_set: str = "a", pair: str = "d"
) -> list[CkaRecord]:
    return [
        CkaRecord("b", pair, f"{trace_set}:t{t}", layer, metric, float(table[t, layer]))
        for t in range(table.shape[0])
        for layer in range(table.shape[1])
    ]


def test_curve_is_mean_with_the_bootstrap_interval() -> None:
    rng = np.random.default_rng(0)
    table = rng.uniform(0.5, 1.0, size=(6, 5))
    rows = _rows(table)
    rng.shuffle(rows)  # row order must not matter for the mean
    curve = curves_from_rows(rows, n_boot=200, seed=3)["linear"]
    assert curve.layers == [0, 1, 2, 3, 4] and curve.n_traces == 6
    np.testing.assert_allclose(curve.mean, table.mean(axis=0))
    assert all(lo <= m <= hi for lo, m, hi in zip(curve.lo, curve.mean, curve.hi, strict=True))
    assert all(hi - lo > 0 for lo, hi in zip(curve.lo, curve.hi, strict=True))


def test_curve_interval_uses_trace_order_of_first_appearance() -> None:
    rng = np.random.default_rng(1)
    table = rng.uniform(size=(4, 3))
    curve = curves_from_rows(_rows(table), n_boot=100, seed=9)["linear"]
    _, lo, hi = bootstrap_interval(table, n_boot=100, seed=9)
    assert curve.lo == lo.tolist() and curve.hi == hi.tolist()


def test_curves_per_metric_and_trace_set_filter() -> None:
    rng = np.random.default_rng(2)
    rows = (
        _rows(rng.uniform(size=(3, 4)), metric="linear", trace_set="math")
        + _rows(rng.uniform(size=(3, 4)), metric="rbf", trace_set="math")
        + _rows(np.full((2, 4), 0.25), metric="linear", trace_set="code")
    )
    assert trace_sets_of(rows) == ["math", "code"]
    both = curves_from_rows(rows, n_boot=50)
    assert list(both) == ["linear", "rbf"] and both["linear"].n_traces == 5
    code = curves_from_rows(rows, trace_set="code", n_boot=50)
    assert list(code) == ["linear"] and code["linear"].mean == [0.25] * 4
    with pytest.raises(MetricInputError, match=r"'poetry'.*\['math', 'code'\]"):
        curves_from_rows(rows, trace_set="poetry")


def test_prenorm_metric_is_a_one_layer_curve() -> None:
    rows = [CkaRecord("b", "d", f"a:{t}", 10, "linear_prenorm", 0.5 + t / 10) for t in range(3)]
    curve = curves_from_rows(rows)["linear_prenorm"]
    assert curve.layers == [10] and curve.mean == [pytest.approx(0.6)]


def test_missing_layer_names_trace_and_layer() -> None:
    rows = [r for r in _rows(np.ones((3, 4))) if not (r.trace == "a:t1" and r.layer == 2)]
    with pytest.raises(MetricInputError, match=r"trace 'a:t1' .*layer 2"):
        curves_from_rows(rows)


def test_duplicate_rows_nan_and_mixed_pairs_are_errors() -> None:
    rows = _rows(np.ones((2, 3)))
    with pytest.raises(MetricInputError, match="duplicate CKA row: trace 'a:t0', layer 0"):
        curves_from_rows([*rows, rows[0]])
    bad = [*rows[:-1], CkaRecord("b", "d", "a:t1", 2, "linear", NAN)]
    with pytest.raises(MetricInputError, match=r"'linear'.*layer 2"):
        curves_from_rows(bad)
    with pytest.raises(MetricInputError, match="pairs"):
        curves_from_rows(rows + _rows(np.ones((2, 3)), pair="other"))


def test_trace_set_of_without_colon() -> None:
    assert trace_set_of("math:17:b") == "math"
    assert trace_set_of("plain") == ""


# --------------------------------------------------------------------------- weights
def _w(
    tensor: str,
    layer: int,
    comp: str,
    d: float,
    *,
    shape: tuple[int, ...] = (4, 4),
    note: str = "",
) -> WeightRecord:
    return WeightRecord("b", "d", tensor, layer, comp, shape, d, d * 2, d / 10, note)


RECORDS = [
    _w("model.layers.0.self_attn.q_proj.weight", 0, "self_attn.q_proj.weight", 0.1),
    _w("model.layers.0.self_attn.q_proj.bias", 0, "self_attn.q_proj.bias", 0.4, shape=(4,)),
    _w("model.layers.1.self_attn.q_proj.weight", 1, "self_attn.q_proj.weight", 0.3),
    _w(
        "model.layers.1.self_attn.q_proj.bias",
        1,
        "self_attn.q_proj.bias",
        NAN,
        shape=(4,),
        note="missing_in_descendant",
    ),
    _w("model.layers.2.self_attn.q_proj.weight", 2, "self_attn.q_proj.weight", 0.2),
    _w("model.layers.2.self_attn.q_proj.bias", 2, "self_attn.q_proj.bias", 0.0, shape=(4,)),
    _w(
        "model.embed_tokens.weight",
        -1,
        "model.embed_tokens.weight",
        0.05,
        shape=(10, 4),
        note="resized:8",
    ),
    _w("lm_head.weight", -1, "lm_head.weight", NAN, shape=(10, 4), note="tied"),
    _w("model.norm.weight", -1, "model.norm.weight", 0.01, shape=(4,)),
]


def test_weight_layer_table_skips_nan_and_components_with_holes() -> None:
    table = weight_layer_table(RECORDS)
    assert table == {"self_attn.q_proj.weight": [0.1, 0.3, 0.2]}
    full = [r for r in RECORDS if r.note != "missing_in_descendant"]
    full.append(
        _w("model.layers.1.self_attn.q_proj.bias", 1, "self_attn.q_proj.bias", 0.6, shape=(4,))
    )
    assert weight_layer_table(full)["self_attn.q_proj.bias"] == [0.4, 0.6, 0.0]


def test_weight_layer_totals_feed_localization() -> None:
    totals = weight_layer_totals(RECORDS)
    assert totals == pytest.approx([0.5, 0.3, 0.2])
    assert localization(totals).max_layer == 0


def test_weight_outside_layers_and_per_matrix() -> None:
    assert weight_outside_layers(RECORDS) == {
        "model.embed_tokens.weight": 0.05,
        "model.norm.weight": 0.01,
    }
    assert sorted(per_matrix_diffs(RECORDS)) == [0.05, 0.1, 0.2, 0.3]
    assert sorted(per_matrix_diffs(RECORDS, blocks_only=True)) == [0.1, 0.2, 0.3]


def test_weight_summary_numbers() -> None:
    """The headline is over the block matrices (study Fig. 3); other kinds apart."""
    s = weight_summary(RECORDS)
    matrices = [0.1, 0.3, 0.2]  # q_proj.weight of blocks 0..2
    assert s["n_tensors"] == 9 and s["n_compared"] == 7 and s["n_not_compared"] == 2
    assert s["n_matrices"] == 3 and s["n_zero_base"] == 0
    assert s["mean_diff"] == pytest.approx(np.mean(matrices))
    assert s["max_diff"] == pytest.approx(0.3)
    assert s["median_diff"] == pytest.approx(0.2)
    assert s["bias_mean_diff"] == pytest.approx(0.2) and s["bias_n"] == 2  # 0.4, 0.0
    assert s["norm_mean_diff"] == pytest.approx(0.01)
    assert s["embedding_mean_diff"] == pytest.approx(0.05)
    assert s["gini"] == pytest.approx(localization(matrices).gini)
    assert all(math.isfinite(v) for v in s.values())


def test_weight_summary_of_unchanged_copy_has_no_localization() -> None:
    same = [
        _w(f"model.layers.{i}.mlp.up_proj.weight", i, "mlp.up_proj.weight", 0.0) for i in range(3)
    ]
    s = weight_summary(same)
    assert s["mean_diff"] == 0.0 and "gini" not in s
    assert weight_summary([]) == {
        "n_tensors": 0.0,
        "n_compared": 0.0,
        "n_not_compared": 0.0,
        "n_matrices": 0.0,
        "n_zero_base": 0.0,
    }


def test_weight_records_of_two_pairs_are_refused() -> None:
    other = WeightRecord("b", "x", "t", 0, "c", (2, 2), 0.1, 0.1, 0.1)
    with pytest.raises(MetricInputError, match="pairs"):
        weight_layer_totals([*RECORDS, other])


def test_aggregate_takes_its_statistics_from_stats_not_findings() -> None:
    """The layering runs one way: aggregate -> stats, never aggregate -> findings."""
    import subprocess
    import sys

    code = (
        "import sys, reasondiff.metrics.aggregate; "
        "print('reasondiff.metrics.findings' in sys.modules, "
        "'reasondiff.metrics.stats' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_findings_re_exports_the_same_statistics() -> None:
    from reasondiff.metrics import findings, stats

    assert findings.bootstrap_interval is stats.bootstrap_interval
    assert findings.mann_whitney_greater is stats.mann_whitney_greater
