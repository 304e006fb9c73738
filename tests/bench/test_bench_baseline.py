"""The benchmark baseline is a faithful reference: check it against the METHODS formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import baseline_reference as ref
from benchmarks import synthetic


def _hsic_u(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """HSIC_u exactly as METHODS §2 writes it (independent of the U-centring code)."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    return float(
        (
            np.trace(kt @ lt)
            + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * one @ kt @ lt @ one
        )
        / (n * (n - 3))
    )


def _cka_u(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    return _hsic_u(k, l) / np.sqrt(_hsic_u(k, k) * _hsic_u(l, l))


@pytest.fixture
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 12, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(12, 9, generator=gen, dtype=torch.float64) + torch.randn(
        60, 9, generator=gen, dtype=torch.float64
    )
    return x, y


def test_u_centring_equals_the_hsic_u_formula(xy: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = xy
    k, l = x @ x.T, y @ y.T  # noqa: E741
    assert ref.cka_from_grams(k, l) == pytest.approx(_cka_u(k.numpy(), l.numpy()), abs=1e-10)


def test_float32_gram_path_stays_close_to_float64(xy: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = xy
    expected = _cka_u((x @ x.T).numpy(), (y @ y.T).numpy())
    assert ref.linear_cka(x, y) == pytest.approx(expected, abs=1e-5)
    assert ref.linear_cka(x, x) == pytest.approx(1.0, abs=1e-6)


def test_linear_cka_is_invariant_to_rotation_and_scale(
    xy: tuple[torch.Tensor, torch.Tensor],
) -> None:
    x, y = xy
    q, _ = torch.linalg.qr(
        torch.randn(9, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )
    assert ref.linear_cka(x, 3.0 * y @ q) == pytest.approx(ref.linear_cka(x, y), abs=1e-5)


def test_asymmetric_gram_is_refused() -> None:
    g = torch.eye(5)
    g[0, 1] = 1.0
    with pytest.raises(ValueError, match="symmetric"):
        ref.center_gram_unbiased(g)


def test_rbf_median_conventions() -> None:
    # Rows at 0, 1, 3 on a line: squared distances {1, 9, 4} each twice, plus 3 zeros.
    x = torch.tensor([[0.0], [1.0], [3.0]])
    sq = torch.tensor([[0.0, 1, 9], [1, 0, 4], [9, 4, 0]])
    # "all": median of 9 entries {0,0,0,1,1,4,4,9,9} is 1; "offdiag": of {1,1,4,4,9,9} is 4.
    assert torch.allclose(ref.rbf_gram(x, scale=1.0, median="all"), torch.exp(-sq / 2.0))
    assert torch.allclose(ref.rbf_gram(x, scale=1.0, median="offdiag"), torch.exp(-sq / 8.0))
    with pytest.raises(ValueError, match="median"):
        ref.rbf_gram(x, median="mean")


def test_pca1_matches_an_eigendecomposition() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200, 6, generator=gen) * torch.tensor([5.0, 1, 1, 1, 1, 1])
    pc = ref.pca1(x)
    xc = (x - x.mean(0)).double()
    evals, evecs = torch.linalg.eigh(xc.T @ xc)
    assert pc.share == pytest.approx(float(evals[-1] / evals.sum()), rel=1e-5)
    assert torch.allclose(pc.projection.double(), (xc @ evecs[:, -1]).abs(), atol=1e-3)


def test_ablation_removes_the_dominant_rows_not_the_bitwise_not_rows() -> None:
    base, descs = synthetic.trace_group(seed=3, n=64, d=24, layers=3, descendants=2)
    x, y = base[2], descs[0][2]
    values = ref.analyse_layer(x, y, k=3)
    drop = ref.dominant_union(ref.pca1(x).projection, ref.pca1(y).projection, k=3)
    assert synthetic.MASSIVE_POSITIONS[0] in drop.tolist()
    keep = torch.ones(64, dtype=torch.bool)
    keep[drop] = False
    assert values.linear_without_dominant == pytest.approx(
        ref.linear_cka(x[keep], y[keep]), abs=1e-9
    )
    # the reference bug, X[~idx], keeps |U| rows near the end instead: a different value
    buggy = ref.linear_cka(x[~drop], y[~drop]) if drop.numel() >= 4 else float("nan")
    assert values.linear_without_dominant != pytest.approx(buggy, abs=1e-3)
    assert values.dominant_count == drop.numel()


def test_analyse_group_shape_and_identity() -> None:
    base, descs = synthetic.trace_group(seed=4, n=32, d=16, layers=2, descendants=2)
    out = ref.analyse_group([base], [[d] for d in descs], k=2)
    assert [len(out), len(out[0]), len(out[0][0])] == [2, 1, 2]
    same = ref.analyse_layer(base[1], base[1], k=2)
    assert same.linear == pytest.approx(1.0, abs=1e-6)
    assert same.rbf == pytest.approx(1.0, abs=1e-6)


def test_synthetic_data_is_seeded_and_has_massive_activations() -> None:
    a, da = synthetic.trace_group(seed=5, n=40, d=16, layers=3, descendants=2)
    b, db = synthetic.trace_group(seed=5, n=40, d=16, layers=3, descendants=2)
    c, _ = synthetic.trace_group(seed=6, n=40, d=16, layers=3, descendants=2)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert torch.equal(da[1][2], db[1][2])
    assert not torch.equal(a[1], c[1])
    assert float(a[0].abs().max()) < 1e3  # embedding layer: no massive activations yet
    assert float(a[1].abs().max()) == pytest.approx(synthetic.MASSIVE_VALUE)
    with pytest.raises(ValueError, match="need n"):
        synthetic.trace_group(seed=0, n=5, d=16, layers=1, descendants=1)
