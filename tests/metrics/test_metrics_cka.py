"""Linear CKA: golden values, independent HSIC references, forms and invariances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from reasondiff.metrics import (
    hsic_biased,
    hsic_unbiased,
    linear_cka,
    linear_cka_features,
    linear_cka_gram,
)


def kornblith_xy() -> tuple[np.ndarray, np.ndarray]:
    """The reference demo's data (Kornblith et al.'s CKA colab)."""
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return x, y


def hsic_u_brute(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """HSIC_1 of Song et al. (2012) written as its U-statistic over distinct indices.

    HSIC_1 = E_{i!=j}[k_ij l_ij] + E_{i,j,q,r distinct}[k_ij l_qr] - 2 E_{i,j,q distinct}[k_ij l_iq]
    """
    n = k.shape[0]
    t1 = np.mean([k[i, j] * l[i, j] for i, j in itertools.permutations(range(n), 2)])
    t2 = np.mean([k[i, j] * l[q, r] for i, j, q, r in itertools.permutations(range(n), 4)])
    t3 = np.mean([k[i, j] * l[i, q] for i, j, q in itertools.permutations(range(n), 3)])
    return float(t1 + t2 - 2 * t3)


def u_center(k: np.ndarray) -> np.ndarray:
    """Szekely & Rizzo (2014) U-centring of a Gram matrix."""
    n = k.shape[0]
    k = k.copy()
    np.fill_diagonal(k, 0.0)
    row = k.sum(1, keepdims=True) / (n - 2)
    col = k.sum(0, keepdims=True) / (n - 2)
    out = k - row - col + k.sum() / ((n - 1) * (n - 2))
    np.fill_diagonal(out, 0.0)
    return out


def hsic_u_center(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    n = k.shape[0]
    return float((u_center(k) * u_center(l)).sum() / (n * (n - 3)))


def cka_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased linear CKA from explicit Gram matrices and U-centring, float64."""
    k, l = x @ x.T, y @ y.T  # noqa: E741
    return hsic_u_center(k, l) / np.sqrt(hsic_u_center(k, k) * hsic_u_center(l, l))


def test_golden_values_reference_demo() -> None:
    x, y = kornblith_xy()
    assert linear_cka(x, y, debiased=False) == pytest.approx(0.557613, abs=5e-7)
    assert linear_cka(x, y) == pytest.approx(0.513456, abs=5e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unbiased_hsic_equals_brute_force_u_statistic(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((7, 2))
    k, l = x @ x.T, (y @ y.T) ** 2  # noqa: E741 - any symmetric kernels will do
    brute = hsic_u_brute(k, l)
    assert hsic_unbiased(torch.from_numpy(k), torch.from_numpy(l)) == pytest.approx(
        brute, abs=1e-10
    )
    assert hsic_u_center(k, l) == pytest.approx(brute, abs=1e-10)


@pytest.mark.parametrize("debiased", [True, False])
def test_feature_form_equals_gram_form_and_reference(debiased: bool) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 12)) + 3.0
    y = x @ rng.standard_normal((12, 7)) + 0.5 * rng.standard_normal((40, 7))
    feat = linear_cka_features(x, y, debiased=debiased)
    gram = linear_cka_gram(x, y, debiased=debiased, chunk_size=7)
    assert feat == pytest.approx(gram, abs=1e-12)
    if debiased:
        assert feat == pytest.approx(cka_reference(x, y), abs=1e-12)
    else:
        k, l = x @ x.T, y @ y.T  # noqa: E741
        ref = hsic_biased(torch.from_numpy(k), torch.from_numpy(l)) / np.sqrt(
            hsic_biased(torch.from_numpy(k), torch.from_numpy(k))
            * hsic_biased(torch.from_numpy(l), torch.from_numpy(l))
        )
        assert feat == pytest.approx(ref, abs=1e-12)
    for form in ("auto", "gram", "features"):
        assert linear_cka(x, y, debiased=debiased, form=form) == pytest.approx(feat, abs=1e-12)


def test_self_similarity_is_one() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 8))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x, debiased=False) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [True, False])
def test_invariant_to_orthogonal_maps_scaling_and_translation(debiased: bool) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((60, 10))
    y = np.tanh(x @ rng.standard_normal((10, 10))) + 0.3 * rng.standard_normal((60, 10))
    q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    base = linear_cka(x, y, debiased=debiased)
    assert base < 0.99  # not trivially 1
    assert linear_cka(x @ q, y, debiased=debiased) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, 7.5 * y, debiased=debiased) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x + 100.0, y - 3.0, debiased=debiased) == pytest.approx(base, abs=1e-10)


def test_independent_pair_is_near_zero_when_debiased() -> None:
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((400, 50)), rng.standard_normal((400, 50))
    unbiased = linear_cka(x, y)
    biased = linear_cka(x, y, debiased=False)
    assert abs(unbiased) < 0.02
    assert biased > 0.1  # the biased estimator's known positive bias (D/N large)


def test_torch_and_numpy_inputs_agree() -> None:
    x, y = kornblith_xy()
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(y)) == linear_cka(x, y)
