"""Exact median of the pairwise (squared) distances between rows, streamed.

:func:`median_pairwise_distance` is the RBF bandwidth base (METHODS §3); the private
helpers compute the median of the squared distances without holding all N(N-1)/2 of
them: up to ``max_exact`` values are selected directly, beyond that an exact
histogram-refinement selection streams them in row blocks (:func:`_select_rank`).
Also the squared-distance row blocks the RBF kernels are built from.

Not here: kernels, bandwidth checks or CKA (:mod:`.rbf`); no approximation anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from typing import Literal

import numpy as np
import torch

from ..errors import MetricInputError
from ._validate import Matrix, as_matrix
from .hsic import _BLOCK_ENTRIES, _F64, _center, _chunk

Tensor = torch.Tensor
Median = Literal["offdiag", "all"]

#: Exact medians sort at most this many distances in one go (128 MiB of float64).
_MAX_EXACT = 1 << 24


def _sq_dist_block(xc: Tensor, r: Tensor, a: int, b: int, c0: int = 0) -> Tensor:
    """Squared distances of rows a:b to rows c0:, from the Gram identity, clamped >= 0.

    (r_i + r_j) - 2 g_ij, in place on one buffer (bitwise what the out-of-place
    expression gives: 2 g is exact, so ``sub_(alpha=2)`` rounds once, the same way).
    """
    d2 = r[a:b, None] + r[None, c0:]
    return d2.sub_(xc[a:b] @ xc[c0:].T, alpha=2.0).clamp_min_(0.0)


@lru_cache(maxsize=2)
def _triu_flat(n: int, device: torch.device) -> Tensor:
    """Flat indices of the pairs i < j of an N x N matrix, row-major (cached: both sides
    of a pair share N; used for N^2 <= 4M only, so at most 16 MiB)."""
    iu = torch.triu_indices(n, n, 1, device=device)
    return iu[0] * n + iu[1]


def upper_values(d2: Tensor) -> Tensor:
    """The strictly-upper-triangle entries of a square matrix, row-major (= ``d2[triu
    mask]``, the order :func:`_upper_blocks` yields them in).

    Up to one row block (N^2 <= 4M) through a cached flat index, ~3x faster than the
    boolean mask; beyond that the mask (N^2 bytes, nothing cached) bounds memory.
    """
    n = d2.shape[0]
    if n * n <= _BLOCK_ENTRIES:
        return d2.reshape(-1)[_triu_flat(n, d2.device)]
    return d2[torch.ones(n, n, dtype=torch.bool, device=d2.device).triu_(1)]


def _median_ranks(n: int, median: str) -> list[int]:
    """Ranks (into the sorted unordered pair distances) whose mean is the median.

    For ``"offdiag"`` the M = N(N-1)/2 pair distances (each pair once: the median over
    ordered pairs i != j is the same). For ``"all"`` the N^2 multiset holds N diagonal
    zeros and every pair twice; its rank q maps to pair rank (q - N) // 2, or to a
    diagonal zero (encoded -1) when q < N. At most two ranks, and they are adjacent.
    """
    m = n * (n - 1) // 2
    if median == "offdiag":
        return sorted({(m - 1) // 2, m // 2})
    if median == "all":
        t = n * n
        return sorted({(q - n) // 2 if q >= n else -1 for q in ((t - 1) // 2, t // 2)})
    raise MetricInputError(f"median must be 'offdiag' or 'all', got {median!r}")


Stream = Callable[[], Iterable[Tensor]]


_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def kth_by_counting(v: Tensor, q: int, with_next: bool = False) -> tuple[float, float]:
    """Exact 0-based order statistics q (and q + 1) of non-negative floats, by counting.

    Non-negative IEEE floats order like their integer bit patterns, so the q-th smallest
    is the smallest bit pattern b with #{bits <= b} > q: a bisection over the pattern
    with one ``(bits <= mid).sum()`` per step (at most 64 steps, no sort, no host copy).
    Bit-identical to a sort. This is the GPU's selection (METHODS §11): a generic sort
    of the ~8.4 M distances of N = 4096 tokens costs ~170 ms on an H200, this a few ms;
    on a CPU ``numpy.partition`` is faster, so :func:`_kth` uses this on CUDA only.

    Raises:
        MetricInputError: a negative or NaN value, or an unsupported dtype.
    """
    flat = v.detach().reshape(-1)
    if flat.dtype not in _BITS:
        raise MetricInputError(f"kth_by_counting: unsupported dtype {flat.dtype}")
    if not 0 <= q < flat.numel() - (1 if with_next else 0):
        raise MetricInputError(f"kth_by_counting: rank {q} out of range for {flat.numel()} values")
    flat = flat + 0.0  # -0.0 -> +0.0 (its pattern would sort first as a negative integer)
    bits = flat.view(_BITS[flat.dtype])
    if not bool((bits >= 0).all()):  # a negative value or a NaN with the sign bit
        raise MetricInputError("kth_by_counting needs non-negative, non-NaN values")
    lo, hi = 0, int(bits.max())
    while lo < hi:
        mid = (lo + hi) // 2
        if int((bits <= mid).sum()) > q:
            hi = mid
        else:
            lo = mid + 1
    first = _bits_value(lo, flat)
    if not with_next:
        return first, math.nan
    if int((bits <= lo).sum()) > q + 1:
        return first, first
    return first, float(flat[bits > lo].min())


def _bits_value(pattern: int, like: Tensor) -> float:
    """The float whose bit pattern is ``pattern`` (in ``like``'s dtype)."""
    t = torch.tensor([pattern], dtype=_BITS[like.dtype], device=like.device)
    return float(t.view(like.dtype)[0])


def order_stats(a: np.ndarray, ranks: list[int]) -> list[float]:
    """Exact 0-based order statistics of a 1-D array at sorted, unique ``ranks``:
    ``numpy.partition(a, ranks)[ranks]``, faster for a median's two adjacent ranks.

    ``numpy.partition`` with two kth values costs ~3x one (measured: 32k float64 0.52 vs
    0.17 ms), so for ranks q, q + 1 it partitions at q and takes the minimum of the part
    above it, which is rank q + 1. A NaN there (NaN sorts last in a partition, but
    poisons a minimum) takes the two-rank partition.
    """
    if len(ranks) == 2 and ranks[1] == ranks[0] + 1:
        q = ranks[0]
        part = np.partition(a, q)
        nxt = float(part[q + 1 :].min())
        if not math.isnan(nxt):
            return [float(part[q]), nxt]
    part = np.partition(a, ranks)
    return [float(part[q]) for q in ranks]


def _kth(v: Tensor, q: int, with_next: bool = False) -> tuple[float, float]:
    """Values of 0-based ranks q and (if ``with_next``) q + 1 of a 1-D tensor.

    On CUDA, exact selection by counting on the device (:func:`kth_by_counting`; the
    values here are squared distances, never negative). Elsewhere one O(len)
    ``numpy.partition`` (introselect) for both ranks: the same order statistics as
    ``torch.kthvalue`` (NaN sorts last in both), ~2-3x faster on CPU.
    """
    if v.is_cuda:
        return kth_by_counting(v, q, with_next)
    a = v.detach().cpu().numpy()
    if not with_next:
        return float(np.partition(a, q)[q]), math.nan
    lo, nxt = order_stats(a, [q, q + 1])
    return lo, nxt


def _select_rank(
    stream: Stream, total: int, q: int, with_next: bool, max_exact: int, edges: Tensor
) -> tuple[float, float]:
    """Exact order statistics q (and q + 1) of a stream too large to hold at once.

    ``stream()`` yields the same float64 values, in the same order, on every call. If
    they fit in ``max_exact`` values they are concatenated and selected directly.
    Otherwise each pass histograms the values inside a bracket [lo, hi] that holds rank
    q (bins given by ``edges`` first - e.g. quantiles of a sample - then uniform, with
    per-bin min / max), narrows the bracket to the actual values of q's bin, and stops
    when the bracket holds one distinct value or <= max_exact values (then one more
    pass collects and selects them, and finds the next value above the bracket). The
    bracket shrinks strictly on every pass, so the loop ends; no approximation.
    """
    if total <= max_exact:
        vals = torch.cat([v.reshape(-1) for v in stream()])
        return _kth(vals, q, with_next)
    lo, hi = -math.inf, math.inf
    for _ in range(256):
        nb = edges.numel() + 1
        counts = torch.zeros(nb, dtype=torch.int64)
        bmin = torch.full((nb,), math.inf, dtype=_F64)
        bmax = torch.full((nb,), -math.inf, dtype=_F64)
        below = 0
        for v in stream():
            v = v.reshape(-1)
            below += int((v < lo).sum())
            inside = v[(v >= lo) & (v <= hi)]
            idx = torch.bucketize(inside, edges.to(inside.device), right=True)
            counts += torch.bincount(idx, minlength=nb).cpu()
            bmin = torch.minimum(bmin, _scatter(inside, idx, nb, "amin", math.inf))
            bmax = torch.maximum(bmax, _scatter(inside, idx, nb, "amax", -math.inf))
        cum = torch.cumsum(counts, 0)
        b = int(torch.searchsorted(cum, torch.tensor(q - below), right=True))
        lo, hi, inside_count = float(bmin[b]), float(bmax[b]), int(counts[b])
        if lo == hi or inside_count <= max_exact:
            break
        edges = torch.linspace(lo, hi, 4097, dtype=_F64)[1:-1]
    else:  # pragma: no cover - the bracket shrinks strictly on every pass
        raise AssertionError("median selection did not converge")
    below, kept, above = 0, [], math.inf
    for v in stream():
        v = v.reshape(-1)
        below += int((v < lo).sum())
        kept.append(v[(v >= lo) & (v <= hi)])
        rest = v[v > hi]
        if rest.numel():
            above = min(above, float(rest.min()))
    vals = torch.cat(kept)
    inner = q + 1 - below < vals.numel()
    first, nxt = _kth(vals, q - below, with_next and inner)
    if not with_next:
        return first, math.nan
    return first, (nxt if inner else above)


def _scatter(v: Tensor, idx: Tensor, nb: int, how: str, fill: float) -> Tensor:
    out = torch.full((nb,), fill, dtype=_F64, device=v.device)
    return out.scatter_reduce_(0, idx, v, reduce=how).cpu()


def _upper_blocks(xc: Tensor, r: Tensor, chunk: int) -> Iterator[Tensor]:
    """Strictly-upper-triangle squared distances (pairs i < j), one row block at a time."""
    n = xc.shape[0]
    for a in range(0, n - 1, chunk):
        b = min(n, a + chunk)
        d2 = _sq_dist_block(xc, r, a, b, a)
        mask = torch.ones(b - a, n - a, dtype=torch.bool, device=d2.device).triu_(1)
        yield d2[mask]


def _sample_edges(xc: Tensor, r: Tensor, bins: int = 4096, rows: int = 2048) -> Tensor:
    """Bin edges at quantiles of the distances among a strided (deterministic) row sample."""
    n = xc.shape[0]
    idx = torch.linspace(0, n - 1, min(n, rows), dtype=_F64).round().long().to(xc.device)
    idx = idx[torch.cat([idx.new_ones(1, dtype=torch.bool), idx[1:] != idx[:-1]])]
    xs, rs = xc[idx], r[idx]
    vals = torch.sort(
        torch.cat(list(_upper_blocks(xs, rs, max(1, _BLOCK_ENTRIES // xs.shape[0]))))
    ).values
    pos = torch.linspace(0, vals.numel() - 1, bins + 1, dtype=_F64)[1:-1].round().long()
    return vals[pos.to(vals.device)].cpu()


def _sq_median_stream(
    stream: Stream, n: int, median: str, max_exact: int, edges: Callable[[], Tensor]
) -> float:
    """Median of the squared pairwise distances (convention of ``median``); exact."""
    ranks = _median_ranks(n, median)
    pair = [q for q in ranks if q >= 0]
    m = n * (n - 1) // 2
    got: dict[int, float] = {}
    if pair:
        e = edges() if m > max_exact else torch.empty(0, dtype=_F64)
        first, nxt = _select_rank(stream, m, pair[0], len(pair) > 1, max_exact, e)
        got = {pair[0]: first, pair[0] + 1: nxt}
    vals = [0.0 if q < 0 else got[q] for q in ranks]
    return sum(vals) / len(vals)


def _sq_median(xc: Tensor, r: Tensor, median: str, chunk: int, max_exact: int) -> float:
    return _sq_median_stream(
        lambda: _upper_blocks(xc, r, chunk),
        xc.shape[0],
        median,
        max_exact,
        lambda: _sample_edges(xc, r),
    )


def median_pairwise_distance(
    x: Matrix,
    *,
    median: Median = "offdiag",
    chunk_size: int | None = None,
    max_exact: int = _MAX_EXACT,
) -> float:
    """The median Euclidean distance between the rows of x (the RBF bandwidth base).

    ``median="offdiag"`` (our default, METHODS §3) takes it over pairs i != j;
    ``median="all"`` over all N^2 entries, the N zero diagonal entries included, which
    is the reference code's convention (Kornblith et al.'s ``gram_rbf``) and gives a
    smaller bandwidth. For an even count the two middle values are combined as the
    reference does, in squared form: sqrt(mean of the two middle squared distances)
    (differs from the mean of the two middle distances by <= (d_b - d_a)^2 / (8 d_a)).

    The result is exact (the median of the float64 distances as computed). Up to
    ``max_exact`` pair distances are sorted at once; beyond that (N >~ 5800) an exact
    histogram-refinement selection streams the distances in row blocks with bounded
    memory (2-3 passes of O(N^2 D)).
    """
    xt = as_matrix(x, "x", min_rows=2, require_variance=False)
    xc = _center(xt)
    r = (xc * xc).sum(1)
    return math.sqrt(_sq_median(xc, r, median, _chunk(xc.shape[0], chunk_size), max_exact))
