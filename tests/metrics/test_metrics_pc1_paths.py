"""Size-dependent fast paths give the values of the paths they replace (1e-9).

PC1 of a Gram-form layer: Lanczos up to ``PC1_LANCZOS_MAX_N`` tokens, block subspace
iteration above it (``eigh`` when neither settles); the Gram matrix from its upper block
triangle (:func:`~reasondiff.metrics.prepared.symmetric_gram`) instead of one product;
massive activations searched in the rows that hold one; the finiteness check by a sum.
Each is compared with the other branch on the same data, massive activations included.
"""

from __future__ import annotations

import pytest
import torch

from reasondiff.errors import MetricInputError
from reasondiff.metrics import pca
from reasondiff.metrics._validate import as_matrix
from reasondiff.metrics.layer import prepare_base_layer, score_layer
from reasondiff.metrics.massive import massive_activations
from reasondiff.metrics.prepared import CkaStats, symmetric_gram


def layer_data(kind: str, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A base and a descendant: massive tokens (PC1 dominates), a flat low-rank top (a
    cluster of 16 similar eigenvalues, where the block iteration hands over to ``eigh``),
    or plain noise with a gently decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    if kind == "massive":
        x = torch.randn(n, d, generator=g)
        x[0, 3], x[7, 11] = 1.0e4, -3.0e3
        y = x + 0.2 * torch.randn(n, d, generator=g)
        y[n // 2, 3] = 5.0e3
    elif kind == "flat":
        f = torch.randn(n, 16, generator=g)
        x = f @ torch.randn(16, d, generator=g) + 0.5 * torch.randn(n, d, generator=g)
        y = x + 0.1 * torch.randn(n, d, generator=g)
    else:
        scale = torch.linspace(3.0, 0.5, d)
        x = torch.randn(n, d, generator=g) * scale
        y = x + 0.3 * torch.randn(n, d, generator=g)
    return x, y


def _score(x: torch.Tensor, y: torch.Tensor) -> dict[str, object]:
    entry: dict[str, object] = score_layer(
        prepare_base_layer(x, name="b", k=10), y, k=10, rbf_median="all"
    )
    return entry


def _assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    ma, mb = a["metrics"], b["metrics"]
    assert isinstance(ma, dict) and isinstance(mb, dict)
    for name, value in ma.items():
        assert value == pytest.approx(mb[name], rel=1e-9, abs=1e-9), name
    assert a["massive"] == b["massive"]
    da, db = a["dominant"], b["dominant"]
    assert isinstance(da, dict) and isinstance(db, dict)
    for side in ("base", "descendant"):
        assert [p for p, _ in da[side]] == [p for p, _ in db[side]]
        assert [v for _, v in da[side]] == pytest.approx([v for _, v in db[side]], rel=1e-9)


@pytest.mark.parametrize("kind", ["massive", "flat", "decay"])
@pytest.mark.parametrize(("n", "d"), [(256, 512), (160, 96)])
def test_lanczos_and_block_iteration_give_the_same_layer(
    kind: str, n: int, d: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = layer_data(kind, n, d, seed=n + d)
    monkeypatch.setattr(pca, "PC1_LANCZOS_MAX_N", 1 << 30)
    lanczos = _score(x, y)
    monkeypatch.setattr(pca, "PC1_LANCZOS_MAX_N", 0)
    block = _score(x, y)
    _assert_same(lanczos, block)


@pytest.mark.parametrize("kind", ["massive", "flat", "decay"])
def test_lanczos_pc1_equals_eigh(kind: str) -> None:
    x, _ = layer_data(kind, 200, 300, seed=3)
    s = CkaStats.from_matrix(x.double(), form="gram")
    assert s.gram is not None
    top = pca._lanczos_top(s.gram, s.r)
    assert top is not None
    evals, evecs = torch.linalg.eigh(s.gram + torch.diag(s.r))
    lam, v = top
    assert lam == pytest.approx(float(evals[-1]), rel=1e-12)
    u = evecs[:, -1] * torch.sign(torch.dot(evecs[:, -1], v))
    assert float((v - u).abs().max()) < 1e-9


def test_lanczos_at_a_tie_returns_a_top_eigenpair() -> None:
    """Two equal top eigenvalues: PC1 is not unique; any unit vector of that eigenspace
    is one valid choice (as with ``eigh``), and the eigenvalue is exact."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(200, 200, generator=gen, dtype=torch.float64))
    lam = torch.linspace(1.0, 0.1, 200, dtype=torch.float64)
    lam[1] = lam[0]
    a = (q * lam) @ q.T
    diag = a.diagonal().clone()
    top = pca._lanczos_top(a - torch.diag(diag), diag)
    assert top is not None
    theta, v = top
    assert theta == pytest.approx(1.0, rel=1e-12)
    assert float(torch.linalg.vector_norm(a @ v - theta * v)) < 1e-10
    assert float(torch.linalg.vector_norm(q[:, 2:].T @ v)) < 1e-10  # inside the eigenspace


@pytest.mark.parametrize("n", [3, 64, 127, 128, 255, 256, 777])
def test_symmetric_gram_equals_one_product(n: int) -> None:
    x = torch.randn(n, 40, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    x[0, 3] = 1.0e4  # a massive token: entries ~1e8 next to ~40
    xc = x - x.mean(0)
    g = symmetric_gram(xc)
    ref = xc @ xc.T
    assert float((g - ref).abs().max()) <= 1e-14 * float(ref.abs().max())


def test_massive_search_in_hit_rows_equals_the_full_mask() -> None:
    x, _ = layer_data("massive", 300, 64, seed=5)
    x[200, 50] = 2.0e4
    got = massive_activations(x)
    a = x.abs()
    hit = a > got.cutoff
    assert torch.equal(got.indices, torch.nonzero(hit))
    assert torch.equal(got.values, x[hit])
    assert got.positions == (0, 7, 200)
    assert got.max_abs == float(a.max())
    none = massive_activations(torch.randn(50, 20, generator=torch.Generator().manual_seed(1)))
    assert none.positions == () and none.indices.shape == (0, 2) and none.count == 0


def test_finite_values_whose_sum_overflows_pass_validation() -> None:
    x = torch.full((6, 4), 3.0e38, dtype=torch.float32)
    x[0, 0] = 1.0  # not constant
    assert torch.isinf(x.sum())
    assert as_matrix(x, "x", dtype=None) is not None
    x[2, 1] = float("nan")
    with pytest.raises(MetricInputError, match="1 non-finite value"):
        as_matrix(x, "x", dtype=None)
