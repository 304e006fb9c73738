"""RBF (Gaussian-kernel) CKA with the unbiased HSIC estimator (METHODS.md §3).

:func:`rbf_cka` builds both kernels row block by row block (never an N x N matrix) with
bandwidth sigma = scale x median pairwise distance per representation (the median comes
from :mod:`._median`); the bandwidth helpers here validate scale and reject a zero
median. Not here: the median selection itself, linear CKA (:mod:`.cka`), or reuse of
one representation across pairs (:func:`~reasondiff.metrics.prepared.rbf_cka_prepared`).
"""

from __future__ import annotations

import math

import torch

from ..errors import MetricInputError
from ._median import _MAX_EXACT, Median, _sq_dist_block, _sq_median
from ._validate import Matrix, as_pair, shape_str
from .hsic import RowBlock, _center, _chunk, _cka_from_terms, _gram_terms, _min_rows

Tensor = torch.Tensor


def _rbf_sigma2(
    xc: Tensor,
    r: Tensor,
    name: str,
    shape: str,
    scale: float,
    median: str,
    chunk: int,
    max_exact: int,
) -> float:
    med2 = _sq_median(xc, r, median, chunk, max_exact)
    _check_bandwidth(med2, r, f"{name} (shape {shape})", median)
    return scale * scale * med2


def _check_bandwidth(med2: float, r: Tensor, what: str, median: str) -> None:
    """A median squared distance at round-off level (vs 2 x mean ||x_i - mean||^2) is 0."""
    if not med2 > 1e-10 * 2.0 * float(r.mean()):
        raise MetricInputError(
            f"{what}: the median pairwise distance ({median}) is 0 (up to round-off) - more "
            "than half of the token pairs are identical - so the RBF bandwidth is 0"
        )


def _rbf_block(xc: Tensor, r: Tensor, sigma2: float) -> RowBlock:
    def rows(a: int, b: int) -> Tensor:
        d2 = _sq_dist_block(xc, r, a, b)
        d2.diagonal(a).fill_(0.0)  # entries (i, a + i): the block's part of the diagonal
        return torch.exp_(d2.mul_(-0.5 / sigma2))

    return rows


def _rbf_full(d2: Tensor, sigma2: float) -> RowBlock:
    """Row blocks of the RBF kernel from a stored N x N squared-distance matrix.

    Same operations, in the same order, as :func:`_rbf_block` (scale, zero diagonal,
    exp), so the kernel is bitwise the one built from ``_sq_dist_block`` rows; ``d2`` is
    left untouched (it may be cached for other bandwidths).
    """

    def rows(a: int, b: int) -> Tensor:
        k = d2[a:b] * (-0.5 / sigma2)
        k.diagonal(a).fill_(0.0)
        return torch.exp_(k)

    return rows


def _check_scale(scale: float) -> float:
    if (
        isinstance(scale, bool)
        or not isinstance(scale, int | float)
        or not (math.isfinite(scale) and scale > 0)
    ):
        raise MetricInputError(f"scale must be a positive finite number, got {scale!r}")
    return float(scale)


def rbf_cka(
    x: Matrix,
    y: Matrix,
    *,
    scale: float = 0.8,
    debiased: bool = True,
    median: Median = "offdiag",
    chunk_size: int | None = None,
    max_exact: int = _MAX_EXACT,
) -> float:
    """CKA with Gaussian kernels K_ij = exp(-||x_i - x_j||^2 / (2 sigma_x^2)) (METHODS §3).

    sigma = scale x median pairwise distance, per representation (see
    :func:`median_pairwise_distance` for ``median`` and ``max_exact``). Kernel rows are
    built in blocks of ``chunk_size`` rows (default: ~4M entries per block) and the HSIC
    terms tr(K~ L~), tr(K~ K~), tr(L~ L~), K~ 1, L~ 1 accumulated block by block, so no
    N x N matrix exists; cost O(N^2 (D_x + D_y)) plus the median passes.
    """
    sc = _check_scale(scale)
    xt, yt = as_pair(x, y, min_rows=_min_rows(debiased))
    n = xt.shape[0]
    chunk = _chunk(n, chunk_size)
    xc, yc = _center(xt), _center(yt)
    r, s = (xc * xc).sum(1), (yc * yc).sum(1)
    sx2 = _rbf_sigma2(xc, r, "x", shape_str(xt), sc, median, chunk, max_exact)
    sy2 = _rbf_sigma2(yc, s, "y", shape_str(yt), sc, median, chunk, max_exact)
    terms = _gram_terms(_rbf_block(xc, r, sx2), _rbf_block(yc, s, sy2), n, chunk, xc.device)
    return _cka_from_terms(terms, debiased, f"RBF CKA of x {shape_str(xt)} and y {shape_str(yt)}")
