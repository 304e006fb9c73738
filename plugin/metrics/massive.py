"""Massive activations (Sun et al. 2024; METHODS.md §6): which tokens carry them.

An activation a of a layer's N x D hidden states is massive when |a| > ``threshold``
(100) and |a| > ``ratio`` (1000) x the median |activation| of that whole layer. Works in
the input's own floating dtype (|a| is exact there; no float64 copy of a large layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import MetricInputError
from ._median import kth_by_counting, order_stats
from ._validate import Matrix, as_matrix
from .defaults import MASSIVE_RATIO, MASSIVE_THRESHOLD

Tensor = torch.Tensor


@dataclass(frozen=True)
class MassiveActivations:
    """Massive activations of one N x D representation.

    Attributes:
        positions: sorted unique token positions (rows) carrying at least one.
        indices: (M, 2) int64 (row, dim) of each massive activation, row-major order.
        values: (M,) their signed values, in the input's dtype.
        median_abs: median |a| over the whole N x D matrix (mean of the two middle values).
        max_abs: max |a| over the whole matrix.
        cutoff: the |a| a value had to exceed: max(threshold, ratio x median_abs).
    """

    positions: tuple[int, ...]
    indices: Tensor
    values: Tensor
    median_abs: float
    max_abs: float
    cutoff: float

    @property
    def count(self) -> int:
        """Number of massive activations (not positions)."""
        return int(self.values.numel())


def _check_nonneg(v: float, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v >= 0):
        raise MetricInputError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def _median(a: Tensor) -> float:
    """Median of the non-negative |activations| (mean of the two middle values if even)."""
    flat = a.reshape(-1)
    m = flat.numel()
    if flat.is_cuda:  # a sort-based kthvalue of ~15 M values is the slow part on a GPU
        lo, nxt = kth_by_counting(flat, (m - 1) // 2, with_next=m % 2 == 0)
        return lo if m % 2 else 0.5 * (lo + nxt)
    ranks = sorted({(m - 1) // 2, m // 2})
    if flat.dtype in (torch.bfloat16, torch.float16):  # float32 holds them exactly
        flat = flat.float()
    # one introselect at the lower rank, the upper one the minimum above it (order_stats:
    # faster than a radix selection over bincount buckets, measured at 256 x 512 and
    # 4096 x 1536 float32, and than a two-rank partition)
    vals = order_stats(flat.detach().cpu().numpy(), ranks)
    return 0.5 * (vals[0] + vals[-1])


def massive_activations(
    x: Matrix, *, threshold: float = MASSIVE_THRESHOLD, ratio: float = MASSIVE_RATIO
) -> MassiveActivations:
    """Find activations with |a| > threshold and |a| > ratio x median |a| (Sun et al.).

    Both conditions must hold: the absolute one keeps small-scale layers (median ~1e-3)
    from flagging ordinary values, the relative one keeps large-scale layers from
    flagging everything. A layer whose median |a| is 0 (mostly zeros) is judged by the
    threshold alone.

    Raises:
        MetricInputError: not 2-D, empty, NaN/Inf, or a negative / non-finite threshold
            or ratio.
    """
    thr = _check_nonneg(threshold, "threshold")
    rat = _check_nonneg(ratio, "ratio")
    xt = as_matrix(x, "x", dtype=None, min_rows=1, require_variance=False)
    return massive_of_checked(xt, thr, rat)


def massive_of_checked(xt: Tensor, threshold: float, ratio: float) -> MassiveActivations:
    """:func:`massive_activations` of a matrix the caller has validated (2-D, finite).

    For :func:`~reasondiff.metrics.layer.prepare_side`, which validates each side once
    for every statistic (a second finiteness pass cost ~5% of a small layer).
    """
    thr, rat = threshold, ratio
    a = xt.abs()
    med = _median(a)
    cutoff = max(thr, rat * med)
    row_max = a.amax(1)
    # only the rows holding a massive value are searched (a few, or none: an N x D mask
    # and its nonzero cost more than the rest of this function on a CPU)
    rows = torch.nonzero(row_max > cutoff).reshape(-1)
    sub = torch.nonzero(a[rows] > cutoff)
    idx = torch.stack([rows[sub[:, 0]], sub[:, 1]], dim=1)
    return MassiveActivations(
        positions=tuple(int(i) for i in rows.tolist()),  # ascending, each holds one or more
        indices=idx,
        values=xt[idx[:, 0], idx[:, 1]],
        median_abs=med,
        max_abs=float(row_max.max()),
        cutoff=cutoff,
    )
