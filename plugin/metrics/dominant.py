"""Dominant datapoints (METHODS.md §5): which tokens drive linear CKA, and CKA without them.

The dominant datapoints U of a pair are the union of each side's top-k tokens by
|projection on PC1|. :func:`cka_without` removes exactly those rows with a boolean
keep-mask (the reference code's ``X[~top_indices]`` with integer indices kept |U| rows near
the end of the trace instead). :func:`top_norm_overlap` and
:func:`projection_norm_correlation` say whether the dominant tokens are simply the tokens
with the largest norm (massive activations). Inputs are N x D matrices or
:class:`~reasondiff.metrics.prepared.CkaStats`; with stats, the linear ablation downdates the
statistics instead of recomputing them.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from ..errors import MetricInputError
from ._validate import Indices, Matrix, as_indices, as_pair, check_k
from .cka import linear_cka
from .defaults import MIN_ROWS_LEFT
from .pca import pc1_projection
from .prepared import CkaStats, linear_cka_prepared
from .rbf import rbf_cka

Tensor = torch.Tensor

__all__ = [
    "MIN_ROWS_LEFT",
    "cka_without",
    "dominant_datapoints",
    "projection_norm_correlation",
    "top_norm_overlap",
]


def _top(p: Tensor, k: int) -> Tensor:
    """Indices of the k largest values; ties broken by position (stable, deterministic)."""
    return torch.sort(p, descending=True, stable=True).indices[:k]


def _stats(x: Matrix | CkaStats, name: str) -> CkaStats:
    return CkaStats.from_matrix(x, name=name)


def dominant_datapoints(x: Matrix | CkaStats, y: Matrix | CkaStats, *, k: int = 10) -> Tensor:
    """Sorted union U of the top-k tokens of x and of y by |projection on PC1| (int64).

    |U| is between k and 2k. Flipping the sign of a principal direction (e.g. negating
    the data) leaves U unchanged, because the ranking uses |projection|.
    """
    sx, sy = _stats(x, "x"), _stats(y, "y")
    if sx.n != sy.n:
        raise MetricInputError(
            f"x and y must have the same number of rows (tokens): {sx.describe()} vs {sy.describe()}"
        )
    k = check_k(k, sx.n)
    both = torch.cat([_top(pc1_projection(sx), k), _top(pc1_projection(sy), k).to(sx.xc.device)])
    return torch.sort(torch.unique(both)).values.to(torch.int64)  # type: ignore[no-untyped-call]


def cka_without(
    x: Matrix | CkaStats,
    y: Matrix | CkaStats,
    drop: Indices,
    *,
    kernel: Literal["linear", "rbf"] = "linear",
    **kw: Any,
) -> float:
    """CKA of x and y with the rows in ``drop`` removed (a boolean keep-mask).

    ``drop`` holds unique row indices in [0, N); negative indices are rejected (that is
    how ``~indices`` silently selects other rows). ``kw`` goes to :func:`linear_cka`
    (``debiased``, ``form``) or :func:`rbf_cka` (``scale``, ``median``, ...). RBF
    bandwidths are recomputed on the kept rows, as if the dropped tokens never existed.
    With :class:`CkaStats` inputs and the linear kernel the statistics are downdated.

    Raises:
        MetricInputError: bad indices, or fewer than 4 rows would remain.
    """
    if kernel not in ("linear", "rbf"):
        raise MetricInputError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
    if kernel == "linear" and (isinstance(x, CkaStats) or isinstance(y, CkaStats)):
        return linear_cka_prepared(x, y, drop=drop, **kw)
    xt = x.xc if isinstance(x, CkaStats) else x
    yt = y.xc if isinstance(y, CkaStats) else y
    xm, ym = as_pair(xt, yt, min_rows=MIN_ROWS_LEFT)
    n = xm.shape[0]
    idx = as_indices(drop, n, "drop")
    keep = torch.ones(n, dtype=torch.bool, device=xm.device)
    keep[idx.to(xm.device)] = False
    left = int(keep.sum())
    if left < MIN_ROWS_LEFT:
        raise MetricInputError(
            f"dropping {idx.numel()} of N={n} rows leaves {left}; CKA needs at least {MIN_ROWS_LEFT}"
        )
    if kernel == "linear":
        return linear_cka(xm[keep], ym[keep], **kw)
    return rbf_cka(xm[keep], ym[keep], **kw)


def top_norm_overlap(x: Matrix | CkaStats, proj_idx: Indices | None = None, k: int = 10) -> float:
    """|top-k tokens by |PC1 projection| intersect top-k by token norm ||x_i||| / k.

    ``proj_idx`` may pass the top-k by projection already computed (k unique indices);
    by default they are computed here. Token norms are of the raw (uncentred) rows.
    """
    s = _stats(x, "x")
    k = check_k(k, s.n)
    if proj_idx is None:
        top_p = _top(pc1_projection(s), k)
    else:
        top_p = as_indices(proj_idx, s.n, "proj_idx")
        if top_p.numel() != k:
            raise MetricInputError(f"proj_idx has {top_p.numel()} indices; expected k={k}")
    top_n = _top(s.row_norms(), k)
    common = torch.isin(top_p.to(top_n.device), top_n)
    return float(common.sum()) / k


def projection_norm_correlation(x: Matrix | CkaStats) -> float:
    """Pearson correlation of |PC1 projection| with the token norms ||x_i|| (raw rows).

    Raises:
        MetricInputError: either vector is constant (correlation undefined).
    """
    s = _stats(x, "x")
    p = pc1_projection(s)
    q = s.row_norms()
    pc, qc = p - p.mean(), q - q.mean()
    den = float(torch.linalg.vector_norm(pc) * torch.linalg.vector_norm(qc))
    if not den > 0.0:
        which = (
            "the |PC1 projection|"
            if float(torch.linalg.vector_norm(pc)) == 0.0
            else "the token norm"
        )
        raise MetricInputError(
            f"projection_norm_correlation: {which} is constant over the N={s.n} tokens of "
            f"{s.describe()}, so the correlation is undefined"
        )
    val = float(torch.dot(pc, qc)) / den
    return max(-1.0, min(1.0, val)) if math.isfinite(val) else val
