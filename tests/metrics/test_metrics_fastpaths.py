"""Prepared statistics, downdated ablation and float32 inputs against a float64 Gram reference.

The data carries planted massive activations (|value| ~ 1e4 on a few tokens, ~1 elsewhere),
where the terms of the feature-space form cancel heavily.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _conditioning import downdate_tol

from reasondiff.metrics import (
    CkaStats,
    cka_without,
    dominant_datapoints,
    linear_cka,
    linear_cka_and_ablated,
    linear_cka_features,
    linear_cka_gram,
    linear_cka_many,
    linear_cka_prepared,
    rbf_cka,
    rbf_cka_prepared,
)

TOL = 1e-6


def u_center(k: np.ndarray) -> np.ndarray:
    n = k.shape[0]
    k = k.copy()
    np.fill_diagonal(k, 0.0)
    out = k - k.sum(1, keepdims=True) / (n - 2) - k.sum(0, keepdims=True) / (n - 2)
    out += k.sum() / ((n - 1) * (n - 2))
    np.fill_diagonal(out, 0.0)
    return out


def gram_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Float64 Gram-form unbiased linear CKA on the raw (uncentred) data."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    k, l = u_center(x @ x.T), u_center(y @ y.T)  # noqa: E741
    return float((k * l).sum() / np.sqrt((k * k).sum() * (l * l).sum()))


def massive_pair(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x and a descendant y: shared signal, massive tokens that y damps, moves and adds.

    Rows 0 and n // 2 share massive dimension 3 (their Gram entry is ~1e8, the case where a
    naive downdate cancels catastrophically).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) + 0.5
    x[0, 3] = 1.0e4
    x[7, 1] = -3.0e3
    x[n // 2, 3] = 8.0e3
    y = x + 0.5 * rng.standard_normal((n, d))
    y[0, 3] *= 0.05
    y[7, 1] = 0.0
    y[n // 2, 3] = 0.0
    y[n - 3, 2] = 6.0e3
    return x, y


SHAPES = [(60, 128), (200, 16)]  # N < D (Gram path) and N > D (feature path)


@pytest.mark.parametrize(("n", "d"), SHAPES)
def test_every_linear_path_matches_float64_gram_reference(n: int, d: int) -> None:
    x, y = massive_pair(n, d, seed=n)
    ref = gram_reference(x, y)
    assert ref < 0.9  # the massive tokens really do pull CKA down
    sx, sy = CkaStats.from_matrix(x), CkaStats.from_matrix(y)
    assert (sx.gram is not None) == (n <= d)
    values = {
        "auto": linear_cka(x, y),
        "features": linear_cka_features(x, y),
        "gram": linear_cka_gram(x, y, chunk_size=11),
        "prepared": linear_cka_prepared(sx, sy),
        "prepared_gram": linear_cka_prepared(
            CkaStats.from_matrix(x, form="gram"), CkaStats.from_matrix(y, form="gram")
        ),
        "prepared_features": linear_cka_prepared(
            CkaStats.from_matrix(x, form="features"), CkaStats.from_matrix(y, form="features")
        ),
        "many": linear_cka_many(sx, [y, sy])[1],
    }
    for name, val in values.items():
        assert abs(val - ref) < TOL, name


@pytest.mark.parametrize(("n", "d"), SHAPES)
@pytest.mark.parametrize("form", ["gram", "features"])
def test_downdated_ablation_equals_explicit_deletion(n: int, d: int, form: str) -> None:
    x, y = massive_pair(n, d, seed=n + 1)
    sx = CkaStats.from_matrix(x, form=form)  # type: ignore[arg-type]
    sy = CkaStats.from_matrix(y, form=form)  # type: ignore[arg-type]
    drop = dominant_datapoints(sx, sy, k=5)
    assert {0, 7, n // 2, n - 3} <= set(drop.tolist())
    ref = gram_reference(np.delete(x, drop.numpy(), 0), np.delete(y, drop.numpy(), 0))
    full, ablated = linear_cka_and_ablated(sx, sy, drop)
    assert abs(full - gram_reference(x, y)) < TOL
    assert abs(ablated - ref) < TOL
    assert abs(linear_cka_prepared(sx, sy, drop=drop) - ref) < TOL
    assert abs(cka_without(sx, sy, drop) - ref) < TOL
    assert abs(cka_without(x, y, drop) - ref) < TOL
    assert ablated > full + 0.05  # removing the dominant tokens changes the score


def test_biased_prepared_equals_plain() -> None:
    x, y = massive_pair(80, 40, seed=3)
    sx, sy = CkaStats.from_matrix(x), CkaStats.from_matrix(y)
    want = linear_cka_gram(x, y, debiased=False)
    assert linear_cka_prepared(sx, sy, debiased=False) == pytest.approx(want, abs=1e-10)
    keep = np.ones(80, bool)
    keep[[0, 7, 40]] = False
    # the downdate subtracts ~1e8-sized outer products: tolerance from that cancellation
    tol = downdate_tol(x, [0, 7, 40]) + downdate_tol(y, [0, 7, 40])
    assert linear_cka_prepared(sx, sy, debiased=False, drop=[0, 7, 40]) == pytest.approx(
        linear_cka_gram(x[keep], y[keep], debiased=False), abs=tol
    )


@pytest.mark.parametrize(("n", "d"), SHAPES)
def test_float32_inputs_stay_within_tolerance(n: int, d: int) -> None:
    x, y = massive_pair(n, d, seed=5)
    x32, y32 = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    ref = gram_reference(x32.double().numpy(), y32.double().numpy())
    assert abs(linear_cka(x32, y32) - ref) < TOL
    assert (
        abs(linear_cka_prepared(CkaStats.from_matrix(x32), CkaStats.from_matrix(y32)) - ref) < TOL
    )
    # and the float32 rounding of the inputs themselves moves the score by less than TOL
    assert abs(linear_cka(x32, y32) - gram_reference(x, y)) < TOL


@pytest.mark.parametrize(("n", "d"), SHAPES)
@pytest.mark.parametrize("median", ["offdiag", "all"])
def test_rbf_prepared_equals_plain(n: int, d: int, median: str) -> None:
    x, y = massive_pair(n, d, seed=9)
    sx, sy = CkaStats.from_matrix(x), CkaStats.from_matrix(y)
    for debiased in (True, False):
        want = rbf_cka(x, y, median=median, debiased=debiased)  # type: ignore[arg-type]
        got = rbf_cka_prepared(sx, sy, median=median, debiased=debiased)  # type: ignore[arg-type]
        assert got == pytest.approx(want, abs=1e-10)


def test_many_equals_pairwise() -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((30, 40))
    ys = [x + s * rng.standard_normal((30, 40)) for s in (0.1, 1.0, 5.0)]
    got = linear_cka_many(x, ys)
    want = [linear_cka(x, y) for y in ys]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[0] > got[1] > got[2]
