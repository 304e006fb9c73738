"""The reference CKA analysis, re-implemented as the study's code did it (the baseline).

This is what ``cka_group`` measures the project against, so it must stay *faithful to the
reference approach*, not clever: per (base, descendant) pair and per layer it builds both
N x N Gram matrices in float32, centres them in float64 after an ``allclose(K, K.T)``
symmetry check (the Szekely-Rizzo U-centring of the Kornblith et al. code), takes the
unbiased HSIC as the dot product of the centred matrices, builds the RBF Gram with a
median over all N^2 squared distances (diagonal zeros included: the reference
convention), and recomputes the ablated CKA from scratch on the reduced rows. Nothing is
shared between pairs: the base's statistics are recomputed for every descendant.

Deliberate departures, each so that values can be compared with the project's to 1e-6:
- the ablation uses a correct boolean keep-mask (the reference's ``X[~idx]`` bug kept the
  wrong rows; we benchmark speed, not the bug);
- dominant datapoints rank tokens by |projection| on PC1 (the reference used the signed
  projection; the sign of a PC is arbitrary), and PC1 comes from a float64
  eigendecomposition (see :func:`pca1`);
- the RBF bandwidth convention is a parameter (``median="all"`` reproduces the reference);
  see :func:`rbf_gram`.

It deliberately imports nothing from reasondiff.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

Tensor = torch.Tensor


def linear_gram(x: Tensor) -> Tensor:
    """K = X X^T in float32, as the reference built it."""
    x32 = x.to(torch.float32)
    return x32 @ x32.T


def rbf_gram(x: Tensor, *, scale: float = 0.8, median: str = "all") -> Tensor:
    """RBF Gram in float32 with sigma = scale x median pairwise distance.

    ``median="all"`` is the reference: the median of the squared distances over all N^2
    entries (zeros on the diagonal included), sigma^2 = scale^2 x that median
    (Kornblith et al.'s ``gram_rbf``). ``median="offdiag"`` takes it over i != j only.
    Squared distances come from the Gram matrix (||a||^2 + ||b||^2 - 2 a.b), clamped >= 0.
    """
    gram = linear_gram(x)
    sq_norms = torch.diagonal(gram)
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram).clamp_min_(0.0)
    if median == "all":
        med = _np_median(sq_dist.reshape(-1))
    elif median == "offdiag":
        n = sq_dist.shape[0]
        off = ~torch.eye(n, dtype=torch.bool)
        med = _np_median(sq_dist[off])
    else:
        raise ValueError(f"median must be 'all' or 'offdiag', got {median!r}")
    return torch.exp(-sq_dist / (2.0 * scale**2 * med))


def _np_median(values: Tensor) -> float:
    """numpy's median (mean of the two middle values), the reference's convention."""
    return float(np.median(values.numpy()))


def center_gram_unbiased(gram: Tensor) -> Tensor:
    """U-centre a Gram matrix in float64 (Szekely & Rizzo 2014), after a symmetry check."""
    if not torch.allclose(gram, gram.T):
        raise ValueError("Gram matrix is not symmetric")
    g = gram.to(torch.float64).clone()
    n = g.shape[0]
    g.fill_diagonal_(0.0)
    means = g.sum(dim=0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    g -= means[:, None]
    g -= means[None, :]
    g.fill_diagonal_(0.0)
    return g


def cka_from_grams(gram_x: Tensor, gram_y: Tensor) -> float:
    """Unbiased CKA of two Gram matrices: <Kc, Lc> / (||Kc|| ||Lc||)."""
    kc = center_gram_unbiased(gram_x)
    lc = center_gram_unbiased(gram_y)
    hsic = torch.dot(kc.reshape(-1), lc.reshape(-1))
    return float(hsic / (torch.linalg.norm(kc) * torch.linalg.norm(lc)))


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Reference linear CKA: two float32 Gram matrices, float64 U-centring."""
    return cka_from_grams(linear_gram(x), linear_gram(y))


def rbf_cka(x: Tensor, y: Tensor, *, scale: float = 0.8, median: str = "all") -> float:
    """Reference RBF CKA: two N x N RBF Gram matrices, each with its own bandwidth."""
    return cka_from_grams(
        rbf_gram(x, scale=scale, median=median), rbf_gram(y, scale=scale, median=median)
    )


@dataclass(frozen=True)
class Pca1:
    """PC1 of one representation: |projection| per token and explained-variance share."""

    projection: Tensor  # N, |(x_i - mean) . v1|
    share: float


def pca1(x: Tensor) -> Pca1:
    """PC1 by an eigendecomposition of the smaller of Xc^T Xc and Xc Xc^T, in float64.

    A conservative stand-in for the reference's PCA: as exact as a full SVD and cheaper
    for these shapes, so the baseline is not slowed down by its choice of PCA solver.
    """
    xc = x.to(torch.float64)
    xc = xc - xc.mean(dim=0, keepdim=True)
    n, d = xc.shape
    if n <= d:
        evals, evecs = torch.linalg.eigh(xc @ xc.T)
        lam = evals[-1].clamp_min(0.0)
        projection = evecs[:, -1].abs() * lam.sqrt()
    else:
        evals, evecs = torch.linalg.eigh(xc.T @ xc)
        lam = evals[-1].clamp_min(0.0)
        projection = (xc @ evecs[:, -1]).abs()
    return Pca1(projection=projection, share=float(lam / evals.clamp_min(0.0).sum()))


def dominant_union(px: Tensor, py: Tensor, *, k: int = 10) -> Tensor:
    """Sorted union of the top-k tokens of each side by |projection on PC1|."""
    top = torch.cat([torch.topk(px, k).indices, torch.topk(py, k).indices])
    return torch.unique(top)


@dataclass(frozen=True)
class LayerValues:
    """Everything the reference computes for one (pair, trace, layer)."""

    linear: float
    rbf: float
    linear_without_dominant: float
    pc1_share_base: float
    pc1_share_descendant: float
    dominant_count: int

    def as_dict(self) -> dict[str, float]:
        return {
            "linear": self.linear,
            "rbf": self.rbf,
            "linear_without_dominant": self.linear_without_dominant,
            "pc1_share_base": self.pc1_share_base,
            "pc1_share_descendant": self.pc1_share_descendant,
            "dominant_count": float(self.dominant_count),
        }


def analyse_layer(
    x: Tensor, y: Tensor, *, k: int = 10, scale: float = 0.8, median: str = "all"
) -> LayerValues:
    """The reference per-layer analysis of one pair, recomputing everything from scratch."""
    lin = linear_cka(x, y)
    rbf = rbf_cka(x, y, scale=scale, median=median)
    pcx, pcy = pca1(x), pca1(y)
    drop = dominant_union(pcx.projection, pcy.projection, k=k)
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    keep[drop] = False
    ablated = linear_cka(x[keep], y[keep])
    return LayerValues(lin, rbf, ablated, pcx.share, pcy.share, int(drop.numel()))


def analyse_group(
    base: list[list[Tensor]],
    descendants: list[list[list[Tensor]]],
    *,
    k: int = 10,
    scale: float = 0.8,
    median: str = "all",
) -> list[list[list[LayerValues]]]:
    """Reference analysis of one base against k descendants: [desc][trace][layer].

    ``base[t][l]`` is the base's N x D activation of trace t at layer l;
    ``descendants[d][t][l]`` the same for descendant d. Each pair is analysed on its own.
    """
    return [
        [
            [
                analyse_layer(bx, dx, k=k, scale=scale, median=median)
                for bx, dx in zip(bt, dt, strict=True)
            ]
            for bt, dt in zip(base, desc, strict=True)
        ]
        for desc in descendants
    ]
