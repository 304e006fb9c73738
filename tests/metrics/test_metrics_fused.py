"""The fused per-descendant passes (:mod:`reasondiff.metrics.fused`) against plain paths.

Each value of :func:`~reasondiff.metrics.layer.score_layer`'s Gram path is checked
against an independent computation on explicit matrices: the ablation against deleting
the rows and recomputing, RBF CKA against the streamed plain function, the median
bracket's fallback against the bracket, and the new ``dominant`` key against a sort of
the PC1 projections.
"""

from __future__ import annotations

import pytest
import torch

from reasondiff.metrics import fused
from reasondiff.metrics.cka import linear_cka_gram
from reasondiff.metrics.dominant import dominant_datapoints
from reasondiff.metrics.layer import prepare_base_layer, score_layer
from reasondiff.metrics.massive import massive_activations
from reasondiff.metrics.pca import pc1_projection
from reasondiff.metrics.prepared import CkaStats
from reasondiff.metrics.rbf import rbf_cka


def massive_pair(seed: int, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two related representations; two tokens carry massive values in one dimension."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[0, 3], x[5, 3] = 3.0e4, 1.2e3
    x[:, 3] += torch.randn(n, generator=g, dtype=torch.float64)
    y = x + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    y[0, 3] *= 1.5
    return x, y


@pytest.mark.parametrize("n, d", [(300, 64), (48, 96), (700, 16)])
@pytest.mark.parametrize("median", ["offdiag", "all"])
def test_fused_values_equal_explicit_recomputation(n: int, d: int, median: str) -> None:
    x, y = massive_pair(n + d, n, d)
    entry = score_layer(prepare_base_layer(x, name="b", k=10), y, k=10, rbf_median=median)
    got = entry["metrics"]
    u = dominant_datapoints(x, y, k=10)
    keep = torch.ones(n, dtype=torch.bool)
    keep[u] = False
    assert got["dominant_count"] == u.numel()
    assert abs(got["linear"] - linear_cka_gram(x, y)) <= 1e-9
    assert abs(got["linear_without_dominant"] - linear_cka_gram(x[keep], y[keep])) <= 1e-9
    assert abs(got["rbf"] - rbf_cka(x, y, median=median)) <= 1e-9  # type: ignore[arg-type]


def test_dominant_key_is_each_sides_top_k_by_pc1_projection() -> None:
    x, y = massive_pair(7, 200, 32)
    k = 6
    entry = score_layer(prepare_base_layer(x, name="b", k=k), y, k=k)
    for side, data in (("base", x), ("descendant", y)):
        p = pc1_projection(CkaStats.from_matrix(data, form="features"))  # other route to PC1
        want = torch.sort(p, descending=True, stable=True).indices[:k].tolist()
        got = entry["dominant"][side]
        assert [pos for pos, _ in got] == want
        values = [v for _, v in got]
        assert values == sorted(values, reverse=True)
        assert all(abs(v - float(p[i])) <= 1e-9 * float(p.max()) for i, v in got)
    assert set(entry) == {"metrics", "massive", "dominant"}


def test_a_missed_median_bracket_falls_back_to_the_same_exact_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, y = massive_pair(3, 300, 24)
    base = prepare_base_layer(x, name="b", k=10)
    want = score_layer(base, y, k=10)["metrics"]["rbf"]
    calls: list[int] = []

    def far_off(r: torch.Tensor, gram: torch.Tensor, n: int, median: str) -> tuple[float, float]:
        calls.append(n)
        return -2.0, -1.0  # holds no distance: every value is "above"

    monkeypatch.setattr(fused, "_bracket", far_off)
    assert score_layer(base, y, k=10)["metrics"]["rbf"] == want
    assert calls == [300]


def test_ties_and_zero_distances_keep_the_median_exact() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(120, 8, generator=g, dtype=torch.float64)
    y = x.clone()
    y[:70] = y[0]  # 70 identical tokens: most pair distances are exactly 0 ... but not half
    y[70:] += torch.randn(50, 8, generator=g, dtype=torch.float64)
    for median in ("offdiag", "all"):
        got = score_layer(prepare_base_layer(x, name="b", k=4), y, k=4, rbf_median=median)
        assert abs(got["metrics"]["rbf"] - rbf_cka(x, y, median=median)) <= 1e-9  # type: ignore[arg-type]


def test_massive_median_of_bfloat16_equals_float32() -> None:
    x, _ = massive_pair(1, 64, 16)
    a = massive_activations(x.to(torch.bfloat16))
    b = massive_activations(x.to(torch.bfloat16).float())
    assert a.median_abs == b.median_abs and a.positions == b.positions


@pytest.mark.parametrize("median", ["offdiag", "all"])
def test_sampled_bracket_holds_the_median_at_large_n(
    median: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond ``_WHOLE`` pairs a sample brackets the ranks; the exact value is unchanged."""
    n = 1600
    assert n * (n - 1) // 2 > fused._WHOLE
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = x + 0.5 * torch.randn(n, 6, generator=g, dtype=torch.float64)

    def no_fallback(d2: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the bracket missed the median ranks")

    monkeypatch.setattr(fused, "upper_values", no_fallback)
    got = score_layer(prepare_base_layer(x, name="b", k=10), y, k=10, rbf_median=median)
    assert abs(got["metrics"]["rbf"] - rbf_cka(x, y, median=median)) <= 1e-9  # type: ignore[arg-type]
