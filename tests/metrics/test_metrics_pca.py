"""PCA views: PC1 projection and share against numpy SVD; the PC form of biased CKA."""

from __future__ import annotations

import numpy as np
import pytest

from reasondiff.metrics import (
    CkaStats,
    linear_cka,
    pc1_carried_share,
    pc1_projection,
    pc1_share,
    pca_form_cka,
    pca_form_terms,
)


def svd_pc1(x: np.ndarray) -> tuple[np.ndarray, float]:
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    return np.abs(xc @ vt[0]), float(s[0] ** 2 / (s**2).sum())


@pytest.mark.parametrize(("n", "d"), [(150, 20), (40, 90)])
def test_pc1_projection_and_share_match_svd(n: int, d: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, d)) * np.linspace(3.0, 0.5, d)  # a clear PC1
    proj, share = svd_pc1(x)
    assert np.asarray(pc1_projection(x)) == pytest.approx(proj, rel=1e-8, abs=1e-9)
    assert pc1_share(x) == pytest.approx(share, rel=1e-10)
    assert pc1_share(CkaStats.from_matrix(x, form="gram")) == pytest.approx(share, rel=1e-10)


def test_pc1_of_nearly_isotropic_data_still_exact() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 80))  # small eigengap: the iteration falls back to eigh
    assert pc1_share(x) == pytest.approx(svd_pc1(x)[1], rel=1e-9)


@pytest.mark.parametrize(("n", "d"), [(60, 8), (30, 50)])
def test_pca_form_equals_biased_linear_cka(n: int, d: int) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, d))
    y = x @ rng.standard_normal((d, 6)) + rng.standard_normal((n, 6))
    assert pca_form_cka(x, y) == pytest.approx(linear_cka(x, y, debiased=False), abs=1e-12)
    assert pca_form_cka(x, y) != pytest.approx(linear_cka(x, y), abs=1e-3)  # not the unbiased one


def test_pc1_carried_share_is_the_first_term_and_in_unit_interval() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((80, 10)) * np.linspace(2.0, 1.0, 10)
    y = x @ rng.standard_normal((10, 10)) + rng.standard_normal((80, 10))
    terms = pca_form_terms(x, y)
    share = pc1_carried_share(x, y)
    assert 0.0 <= share <= 1.0
    assert share == pytest.approx(float(terms[0, 0] / terms.sum()), abs=1e-10)
    assert share < 0.5  # spread over many directions here


def test_pc1_carried_share_near_one_when_one_direction_dominates() -> None:
    rng = np.random.default_rng(4)
    z = rng.standard_normal((100, 1))
    x = rng.standard_normal((100, 12)) + 200.0 * z @ rng.standard_normal((1, 12))
    y = rng.standard_normal((100, 9)) + 200.0 * z @ rng.standard_normal((1, 9))
    share = pc1_carried_share(x, y)
    assert share > 0.99
    assert share == pytest.approx(
        pc1_carried_share(CkaStats.from_matrix(x), CkaStats.from_matrix(y))
    )
