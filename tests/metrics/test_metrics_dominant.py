"""Dominant datapoints: the union U, the ablation (and the ~indices bug), norm overlap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from reasondiff.errors import MetricInputError
from reasondiff.metrics import (
    CkaStats,
    cka_without,
    dominant_datapoints,
    linear_cka,
    pc1_projection,
    projection_norm_correlation,
    rbf_cka,
    top_norm_overlap,
)


def planted(seed: int, n: int = 80, d: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Descendant y of x; x has massive tokens at rows 1-3, y at rows 1 and 5."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = x + 0.3 * rng.standard_normal((n, d))
    x[1, 0], x[2, 0], x[3, 0] = 500.0, -450.0, 400.0
    y[1, 0], y[5, 4] = 300.0, -700.0
    return x, y


def test_union_is_sorted_and_contains_both_sides_top_k() -> None:
    x, y = planted(0)
    u = dominant_datapoints(x, y, k=4)
    assert u.dtype == torch.int64
    assert u.tolist() == sorted(set(u.tolist()))
    top_x = set(torch.topk(pc1_projection(x), 4).indices.tolist())
    top_y = set(torch.topk(pc1_projection(y), 4).indices.tolist())
    assert set(u.tolist()) == top_x | top_y
    assert {1, 2, 3, 5} <= set(u.tolist())
    assert 4 <= u.numel() <= 8


def test_union_unchanged_when_a_pc_sign_flips() -> None:
    x, y = planted(1)
    u = dominant_datapoints(x, y).tolist()
    assert dominant_datapoints(-x, y).tolist() == u
    assert dominant_datapoints(x, -y).tolist() == u
    # a signed ranking would miss the strongly negative token 2 on one of the signs
    assert 2 in u


def test_ablation_removes_exactly_u_and_not_the_reference_bug() -> None:
    x, y = planted(2)
    x[-20:] = np.random.default_rng(9).standard_normal((20, x.shape[1]))  # tail unrelated to y
    u = dominant_datapoints(x, y, k=5)
    ours = cka_without(x, y, u)
    want = linear_cka(np.delete(x, u.numpy(), 0), np.delete(y, u.numpy(), 0))
    assert ours == pytest.approx(want, abs=1e-12)
    # the reference's X[~top_indices]: ~i == -(i+1), i.e. |U| rows from the END of the trace
    buggy = linear_cka(x[(~u).numpy()], y[(~u).numpy()])
    assert abs(ours - buggy) > 0.2
    with pytest.raises(MetricInputError, match="outside"):
        cka_without(x, y, ~u)


def test_ablation_with_nothing_dropped_and_rbf_kernel() -> None:
    x, y = planted(3)
    assert cka_without(x, y, []) == pytest.approx(linear_cka(x, y), abs=1e-12)
    keep = np.ones(len(x), bool)
    keep[[1, 5]] = False
    assert cka_without(x, y, [5, 1], kernel="rbf", scale=0.5) == pytest.approx(
        rbf_cka(x[keep], y[keep], scale=0.5), abs=1e-12
    )
    assert cka_without(CkaStats.from_matrix(x), CkaStats.from_matrix(y), [5, 1]) == pytest.approx(
        linear_cka(x[keep], y[keep]), abs=1e-10
    )


def test_too_few_rows_left_is_an_error() -> None:
    x, y = planted(4, n=10)
    with pytest.raises(MetricInputError, match="leaves 3"):
        cka_without(x, y, list(range(7)))
    with pytest.raises(MetricInputError, match="leaves 3"):
        cka_without(CkaStats.from_matrix(x), CkaStats.from_matrix(y), list(range(7)))


def test_top_norm_overlap_with_massive_tokens_and_reference() -> None:
    x, _ = planted(5)
    assert top_norm_overlap(x, k=3) == 1.0  # the three massive tokens lead both rankings
    rng = np.random.default_rng(6)
    g = rng.standard_normal((60, 5)) * np.array([3.0, 1.0, 1.0, 1.0, 1.0])
    k = 10
    top_p = set(np.argsort(-np.asarray(pc1_projection(g)), kind="stable")[:k].tolist())
    top_n = set(np.argsort(-np.linalg.norm(g, axis=1), kind="stable")[:k].tolist())
    assert top_norm_overlap(g, k=k) == pytest.approx(len(top_p & top_n) / k)
    given = torch.tensor(sorted(top_n))
    assert top_norm_overlap(g, given, k=k) == 1.0


def test_projection_norm_correlation_matches_scipy() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((70, 6)) * np.array([4.0, 1, 1, 1, 1, 1]) + 1.0
    p = np.asarray(pc1_projection(x))
    want = pearsonr(p, np.linalg.norm(x, axis=1)).statistic
    assert projection_norm_correlation(x) == pytest.approx(want, abs=1e-10)
    assert projection_norm_correlation(planted(8)[0]) > 0.95
