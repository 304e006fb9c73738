"""RBF CKA: golden value, bandwidth median conventions, chunking, invariances."""

from __future__ import annotations

import numpy as np
import pytest

from reasondiff.metrics import median_pairwise_distance, rbf_cka


def sq_dists(x: np.ndarray) -> np.ndarray:
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)


def u_center(k: np.ndarray) -> np.ndarray:
    n = k.shape[0]
    k = k.copy()
    np.fill_diagonal(k, 0.0)
    out = k - k.sum(1, keepdims=True) / (n - 2) - k.sum(0, keepdims=True) / (n - 2)
    out += k.sum() / ((n - 1) * (n - 2))
    np.fill_diagonal(out, 0.0)
    return out


def rbf_reference(x: np.ndarray, y: np.ndarray, scale: float, median: str) -> float:
    """Unbiased RBF CKA with full N x N kernels, sigma^2 = scale^2 x median squared distance."""

    def gram(z: np.ndarray) -> np.ndarray:
        d2 = sq_dists(z)
        vals = d2.ravel() if median == "all" else d2[~np.eye(len(z), dtype=bool)]
        return np.exp(-d2 / (2 * scale**2 * np.median(vals)))

    k, l = u_center(gram(x)), u_center(gram(y))  # noqa: E741
    return float((k * l).sum() / np.sqrt((k * k).sum() * (l * l).sum()))


def test_golden_value_reference_demo_with_reference_median() -> None:
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    assert rbf_cka(x, y, scale=0.5, debiased=False, median="all") == pytest.approx(
        0.654831, abs=5e-7
    )
    # our default convention (median over i != j) gives a visibly different value
    assert rbf_cka(x, y, scale=0.5, debiased=False) == pytest.approx(0.654006, abs=5e-7)


@pytest.mark.parametrize("median", ["offdiag", "all"])
def test_matches_full_matrix_reference(median: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((45, 6))
    y = np.sin(x @ rng.standard_normal((6, 4)))
    assert rbf_cka(x, y, median=median) == pytest.approx(
        rbf_reference(x, y, 0.8, median), abs=1e-12
    )


def test_chunked_equals_unchunked() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((70, 5))
    y = x**2 + 0.1 * rng.standard_normal((70, 5))
    whole = rbf_cka(x, y, chunk_size=70)
    assert rbf_cka(x, y, chunk_size=1) == pytest.approx(whole, abs=1e-13)
    assert rbf_cka(x, y, chunk_size=9) == pytest.approx(whole, abs=1e-13)
    assert rbf_cka(x, y) == pytest.approx(whole, abs=1e-13)


def test_self_one_and_invariances_with_per_representation_sigma() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 7))
    y = np.tanh(x @ rng.standard_normal((7, 7)))
    q, _ = np.linalg.qr(rng.standard_normal((7, 7)))
    base = rbf_cka(x, y)
    assert rbf_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert base < 0.99
    assert rbf_cka(x @ q, y) == pytest.approx(base, abs=1e-10)
    assert rbf_cka(3.0 * x, y / 40.0) == pytest.approx(base, abs=1e-10)  # each sigma scales along


def test_independent_pair_near_zero() -> None:
    rng = np.random.default_rng(3)
    assert abs(rbf_cka(rng.standard_normal((300, 5)), rng.standard_normal((300, 5)))) < 0.02


@pytest.mark.parametrize("n", [30, 31])
def test_median_conventions_match_numpy(n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 4))
    d2 = sq_dists(x)
    off = d2[~np.eye(n, dtype=bool)]
    assert median_pairwise_distance(x) == pytest.approx(np.sqrt(np.median(off)), rel=1e-12)
    assert median_pairwise_distance(x, median="all") == pytest.approx(
        np.sqrt(np.median(d2.ravel())), rel=1e-12
    )
    # including the diagonal zeros lowers the median
    assert median_pairwise_distance(x, median="all") < median_pairwise_distance(x)


@pytest.mark.parametrize("median", ["offdiag", "all"])
@pytest.mark.parametrize("max_exact", [1, 50, 1000])
def test_streamed_exact_median_equals_direct(median: str, max_exact: int) -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((120, 3))
    x[:5, 0] = 1.0e4  # a few far-away tokens stretch the range (massive activations)
    direct = median_pairwise_distance(x, median=median)
    streamed = median_pairwise_distance(x, median=median, max_exact=max_exact, chunk_size=13)
    assert streamed == direct


def test_streamed_median_with_heavy_ties() -> None:
    rng = np.random.default_rng(8)
    x = np.repeat(rng.standard_normal((6, 2)), 20, axis=0)  # 6 distinct points, 20 copies
    d2 = sq_dists(x)
    want = np.sqrt(np.median(d2[~np.eye(len(x), dtype=bool)]))
    got = median_pairwise_distance(x, max_exact=10, chunk_size=17)
    assert got == pytest.approx(want, rel=1e-12)
