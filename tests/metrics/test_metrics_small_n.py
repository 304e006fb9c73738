"""Small-N fast path of the RBF statistics against the streamed, bounded-memory path.

For N^2 <= one row block a :class:`CkaStats` builds its squared-distance matrix once and
takes both the median bandwidth and the kernel from it; the streamed path (forced here
by shrinking the block size) must give the same medians and RBF CKA, on data with tied
distances (duplicated and integer-valued rows) and with massive rows. The medians agree
to 1e-12 (the median pair is never a cancelling one); RBF CKA agrees to 1e-12 on plain
data and to the rounding bound of its conditioning on massive rows (``_conditioning``:
two 3e4-scale rows lose ~8 digits of their distance, so blockings differ by ~5e-11).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _conditioning import rbf_rounding_tol

from reasondiff.metrics import CkaStats, median_pairwise_distance, rbf_cka, rbf_cka_prepared
from reasondiff.metrics import hsic as hsic_mod
from reasondiff.metrics._median import _kth, _sq_dist_block, upper_values

TOL = 1e-12


def _data(kind: str, n: int = 150, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if kind == "ties":  # integer rows, many exact duplicates: tied pair distances
        x = torch.randint(-2, 3, (n, d), generator=g).to(torch.float64)
        x[n - n // 2 :] = x[: n // 2].clone()
    y = x + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    if kind == "ties":
        y = y.round()
    if kind == "massive":  # a few tokens with |value| ~ 3e4 in one dimension
        x[[0, 7, 40], 3] = 3e4
        y[[0, 7], 3] = -2.5e4
    return x, y


def _streamed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make one row block hold 5 rows' worth, so N^2 never fits one block."""
    monkeypatch.setattr(hsic_mod, "_BLOCK_ENTRIES", 5 * 150)


@pytest.mark.parametrize("kind", ["plain", "ties", "massive"])
@pytest.mark.parametrize("median", ["offdiag", "all"])
def test_fast_path_matches_streamed_path(
    kind: str, median: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = _data(kind)
    sx, sy = CkaStats.from_matrix(x, name="x"), CkaStats.from_matrix(y, name="y")
    fast = rbf_cka_prepared(sx, sy, median=median)  # type: ignore[arg-type]
    assert sx.small_sq_dists() is not None and sy.small_sq_dists() is not None
    fast_med = [sx.sigma2(1.0, median), sy.sigma2(1.0, median)]

    _streamed(monkeypatch)
    tx, ty = CkaStats.from_matrix(x, name="x"), CkaStats.from_matrix(y, name="y")
    assert tx.small_sq_dists() is None and ty.small_sq_dists() is None
    slow = rbf_cka_prepared(tx, ty, median=median)  # type: ignore[arg-type]
    slow_med = [tx.sigma2(1.0, median), ty.sigma2(1.0, median)]
    plain = rbf_cka(x, y, median=median, chunk_size=7)  # type: ignore[arg-type]

    tol = rbf_rounding_tol(x, y)
    assert (tol == TOL) == (kind != "massive")  # only massive rows loosen it
    assert fast == pytest.approx(slow, rel=TOL, abs=tol)
    assert fast == pytest.approx(plain, rel=TOL, abs=tol)
    assert fast_med == pytest.approx(slow_med, rel=TOL)
    for m2, z in zip(fast_med, (x, y), strict=True):
        streamed = median_pairwise_distance(z, median=median, chunk_size=7, max_exact=500)  # type: ignore[arg-type]
        assert m2 == pytest.approx(streamed**2, rel=TOL)


@pytest.mark.parametrize("median", ["offdiag", "all"])
def test_fast_path_median_matches_numpy(median: str) -> None:
    """The cached matrix's median is numpy's median of the same pair distances."""
    x, _ = _data("ties", n=151)  # odd N: an even number of pairs for "offdiag"
    s = CkaStats.from_matrix(x)
    d2 = s.small_sq_dists()
    assert d2 is not None
    a = d2.numpy().copy()
    np.fill_diagonal(a, 0.0)
    vals = a[np.triu_indices(a.shape[0], 1)] if median == "offdiag" else a.reshape(-1)
    assert s.sigma2(1.0, median) == float(np.median(vals))


def test_small_sq_dists_is_one_block_and_cached() -> None:
    x, _ = _data("massive")
    s = CkaStats.from_matrix(x)
    d2 = s.small_sq_dists()
    assert d2 is not None and d2 is s.small_sq_dists()
    assert torch.equal(d2, _sq_dist_block(s.xc, s.r, 0, s.n))
    rbf_cka_prepared(s, s)
    assert torch.equal(d2, _sq_dist_block(s.xc, s.r, 0, s.n))  # kernel left it untouched


def test_gram_form_stats_do_not_cache_distances() -> None:
    x, _ = _data("plain", n=12, d=32)  # N <= D: Gram form
    s = CkaStats.from_matrix(x)
    assert s.gram is not None and s.small_sq_dists() is None


def test_sq_dist_block_matches_out_of_place_formula() -> None:
    x, _ = _data("massive")
    xc = x - x.mean(0)
    r = (xc * xc).sum(1)
    for a, b, c0 in [(0, 150, 0), (10, 40, 10), (5, 9, 0)]:
        ref = (r[a:b, None] + r[None, c0:] - 2.0 * (xc[a:b] @ xc[c0:].T)).clamp_min(0.0)
        assert torch.equal(_sq_dist_block(xc, r, a, b, c0), ref)


def test_upper_values_is_triu_mask_order() -> None:
    d2 = torch.arange(49, dtype=torch.float64).reshape(7, 7)
    mask = torch.ones(7, 7, dtype=torch.bool).triu_(1)
    assert torch.equal(upper_values(d2), d2[mask])


def test_kth_matches_kthvalue_with_ties_and_nan() -> None:
    g = torch.Generator().manual_seed(3)
    v = torch.randint(0, 20, (1001,), generator=g).to(torch.float64)
    v[[3, 500]] = float("inf")
    for q in [0, 17, 500, 999]:
        first, nxt = _kth(v, q, with_next=True)
        assert first == float(torch.kthvalue(v, q + 1).values)
        assert nxt == float(torch.kthvalue(v, q + 2).values)
    w = v.clone()
    w[10] = float("nan")
    assert np.isnan(_kth(w, 1000)[0]) and np.isnan(float(torch.kthvalue(w, 1001).values))
    assert _kth(w, 999)[0] == float(torch.kthvalue(w, 1000).values)


def test_upper_values_large_matrix_uses_mask_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from reasondiff.metrics import _median

    monkeypatch.setattr(_median, "_BLOCK_ENTRIES", 10)
    d2 = torch.arange(36, dtype=torch.float64).reshape(6, 6)
    mask = torch.ones(6, 6, dtype=torch.bool).triu_(1)
    assert torch.equal(upper_values(d2), d2[mask])
