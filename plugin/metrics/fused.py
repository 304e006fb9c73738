"""One descendant against a prepared base in two cache-sized passes over its Gram matrix.

A descendant-layer needs exactly one O(N^2 D) product, its Gram matrix L = Yc Yc^T; the
rest of the full analysis (linear CKA with and without the dominant tokens, the RBF
bandwidth median and kernel, RBF CKA) is O(N^2). Doing that as whole-matrix tensor ops
costs a dozen N x N passes through memory (the N x N squared distances built three
times, the exact median copying N^2 / 2 values, the ablation copying the kept sub-Gram),
which made a layer cost ~5x the Gram. Here the O(N^2) work runs over row blocks small
enough to stay in cache, in two passes:

1. :func:`_first_pass`: tr(K~ L~); the kept rows' re-centred Gram blocks H K_SS H and
   H L_SS H (formed block by block, dropped rows and columns zeroed, no sub-Gram copy;
   the centring from row sums downdated by the dropped columns) and their three
   traces; and the squared distances, written once into one N x N buffer while the
   pair distances (i < j) are counted against a bracket around the median ranks;
2. :func:`_kernel_pass`: the RBF kernel, in place in that buffer, and its terms against
   the base's cached kernel.

The median is exact (:func:`_bracketed_median`: a sample brackets the ranks, the pass
counts the values below the bracket and keeps the few inside; a missed bracket falls
back to selecting over all values). Same device code on CPU and CUDA. Values equal the
whole-matrix path's (:mod:`.prepared`) to float64 round-off; tests compare at 1e-9.
Not here: side diagnostics (:mod:`.layer`), the base's preparation (:mod:`.prepared`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._median import _median_ranks, kth_by_counting, order_stats, upper_values
from .hsic import _F64, _cka_from_terms, _Terms
from .prepared import CkaStats
from .rbf import _check_bandwidth, _check_scale

Tensor = torch.Tensor

#: Row blocks hold about this many float64 entries (2 MiB: a few blocks fit in L2/L3).
_BLOCK = 1 << 18
#: Distances sampled to bracket the median ranks, and the bracket's half-width in
#: standard deviations of a sample quantile (a miss only costs a slower exact pass).
_SAMPLE, _SIGMAS = 1 << 14, 8.0
#: Up to this many pairs (N <~ 1450) every pair distance is kept for the selection.
_WHOLE = 1 << 20


@dataclass(frozen=True)
class FusedScores:
    """What the passes give: linear CKA, linear CKA without ``drop``, RBF CKA, and the
    off-diagonal tr(K~ L~) (for the PC1-carried share)."""

    linear: float
    linear_without: float
    rbf: float
    t_xy: Tensor


def _rows_per_block(n: int) -> int:
    return max(1, min(n, _BLOCK // max(n, 1)))


def _bracket(r: Tensor, gram: Tensor, n: int, median: str) -> tuple[float, float]:
    """[lo, hi] likely to hold the median pair distances, from a fixed sample of pairs."""
    pair = [q for q in _median_ranks(n, median) if q >= 0] or [0]  # validates the name
    m = n * (n - 1) // 2
    if m <= _WHOLE:  # few pairs: keep them all (a sample would cost more than it saves)
        return -math.inf, math.inf
    gen = torch.Generator().manual_seed(0)
    i = torch.randint(n, (_SAMPLE,), generator=gen)
    j = (i + 1 + torch.randint(n - 1, (_SAMPLE,), generator=gen)) % n  # j != i
    i, j = i.to(gram.device), j.to(gram.device)
    d = torch.sort((r[i] + r[j] - 2.0 * gram[i, j]).clamp_min_(0.0)).values
    s = d.numel()
    lo_f, hi_f = pair[0] / m, pair[-1] / m
    width = _SIGMAS * math.sqrt(max(lo_f * (1 - lo_f), hi_f * (1 - hi_f), 1.0 / s) / s)
    lo = float(d[max(0, int((lo_f - width) * s))])
    hi = float(d[min(s - 1, math.ceil((hi_f + width) * s))])
    return lo, hi


def _select(vals: Tensor, ranks: list[int]) -> list[float]:
    """Exact order statistics of a 1-D float64 tensor (counting on CUDA, introselect else)."""
    if vals.is_cuda:
        return [kth_by_counting(vals, q)[0] for q in ranks]
    return order_stats(vals.detach().cpu().numpy(), ranks)


@dataclass
class _Centring:
    """One side's centring on the kept rows S: K'_ij = K_ij - a_i - a_j + c on S."""

    a: Tensor  # a_i = mean over j in S of K_ij (diagonal r included), for every row i
    v: Tensor  # c - a_j, the column part of the shift
    diag: Tensor  # diag(H K_SS H) = r_i - 2 a_i + c, for every row i


def _centring(s: CkaStats, drop: Tensor, kept: Tensor, m: int) -> _Centring:
    """From the full Gram's row sums downdated by the dropped columns (O(N |U|)).

    ``kept``: the kept rows' indices (``index_select``: the elements and order of a
    boolean-mask selection, at a fraction of its cost on a CPU)."""
    assert s.gram is not None
    a = (s.rows - s.gram.index_select(1, drop).sum(1) + s.r) / m
    c = a.index_select(0, kept).mean()
    return _Centring(a, c - a, s.r - 2.0 * a + c)


@dataclass
class _FirstPass:
    t_xy: Tensor  # tr(K~ L~) over all rows
    ablated: _Terms  # the HSIC terms of the kept rows, re-centred on them
    below: int  # pair distances (i < j) below the median bracket
    inside: list[Tensor]  # those inside it


def _centred_block(g: Tensor, c: _Centring, a: int, out: Tensor, drop: Tensor) -> Tensor:
    """Rows a: of H K_SS H (off-diagonal, dropped rows and columns zero), into ``out``."""
    b = a + out.shape[0]
    torch.add(g[a:b], c.v[None, :], out=out).sub_(c.a[a:b, None])  # K_ij + (c - a_j) - a_i
    out.diagonal(a).fill_(0.0)
    out.index_fill_(1, drop, 0.0)
    gone = drop if a == 0 and b == g.shape[0] else drop[(drop >= a) & (drop < b)] - a
    if gone.numel():
        out.index_fill_(0, gone, 0.0)
    return out


def _first_pass(
    sx: CkaStats, sy: CkaStats, drop: Tensor, d2: Tensor, lo: float, hi: float
) -> _FirstPass:
    """Linear terms (all rows; kept rows re-centred) and the squared distances, one pass.

    The kept rows' centred Gram K' = H K_SS H is formed block by block with the dropped
    rows and columns zeroed, never as a matrix: entry by entry, as the explicit sub-Gram
    would be, so no large term cancels (subtracting the dropped tokens' share from the
    totals would: with massive activations their Gram entries are ~1e8). Its
    off-diagonal row sums are minus its diagonal (a centred matrix's rows sum to 0).
    """
    assert sx.gram is not None and sy.gram is not None
    k, l, r = sx.gram, sy.gram, sy.r  # noqa: E741
    n, dev = k.shape[0], k.device
    keep = torch.ones(n, dtype=torch.bool, device=dev)
    drop = drop.to(dev)
    keep[drop] = False
    kept = torch.nonzero(keep).reshape(-1)
    m = n - int(drop.numel())
    cx, cy = _centring(sx, drop, kept, m), _centring(sy, drop, kept, m)
    rows = _rows_per_block(n)
    zero = torch.zeros((), dtype=_F64, device=dev)
    t_xy, s_xy, s_xx, s_yy = zero.clone(), zero.clone(), zero.clone(), zero.clone()
    below, inside = 0, list[Tensor]()
    bracketed = math.isfinite(lo) or math.isfinite(hi)
    kc = torch.empty(rows, n, dtype=_F64, device=dev)
    lc = torch.empty(rows, n, dtype=_F64, device=dev)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        kb, lb = k[a:b], l[a:b]
        t_xy += torch.dot(kb.reshape(-1), lb.reshape(-1))
        kv = _centred_block(k, cx, a, kc[: b - a], drop).reshape(-1)
        lv = _centred_block(l, cy, a, lc[: b - a], drop).reshape(-1)
        s_xy += torch.dot(kv, lv)
        s_xx += torch.dot(kv, kv)
        s_yy += torch.dot(lv, lv)
        db = d2[a:b]  # (r_i + r_j) - 2 g_ij, clamped, zero diagonal
        torch.add(r[a:b, None], r[None, :], out=db).sub_(lb, alpha=2.0).clamp_min_(0.0)
        db.diagonal(a).fill_(0.0)
        if bracketed:  # else every pair is selected from d2 itself, after the pass
            below, inside = _count(db, a, lo, hi, below, inside)
    dx, dy = cx.diag.index_select(0, kept), cy.diag.index_select(0, kept)
    ablated = _Terms(m, s_xy, s_xx, s_yy, -dx, -dy, dx, dy)
    return _FirstPass(t_xy, ablated, below, inside)


def _count(
    db: Tensor, a: int, lo: float, hi: float, below: int, inside: list[Tensor]
) -> tuple[int, list[Tensor]]:
    """Count the block's pair distances (i < j) below lo; keep those in [lo, hi]."""
    h = db.shape[0]
    tri = db[:, a : a + h][torch.ones(h, h, dtype=torch.bool, device=db.device).triu_(1)]
    for part in (tri, db[:, a + h :]):
        below += int(torch.count_nonzero(part < lo))
        inside.append(part[(part >= lo) & (part <= hi)])
    return below, inside


def _bracketed_median(first: _FirstPass, d2: Tensor, n: int, median: str) -> float:
    """The median squared pair distance (exact): from the bracket, else from all of d2."""
    ranks = _median_ranks(n, median)
    pair = [q for q in ranks if q >= 0]  # -1: one of the "all" convention's diagonal zeros
    vals = torch.cat(first.inside) if first.inside else d2.new_empty(0)
    if not pair:
        got: dict[int, float] = {}
    elif not first.inside:  # no bracket (few pairs): select over all of them at once
        got = dict(zip(pair, _select(upper_values(d2), pair), strict=True))
    elif first.below <= pair[0] and first.below + vals.numel() > pair[-1]:
        got = dict(zip(pair, _select(vals, [q - first.below for q in pair]), strict=True))
    else:  # the sample missed: select over every pair (exact, slower, rare)
        got = dict(zip(pair, _select(upper_values(d2), pair), strict=True))
    picked = [0.0 if q < 0 else got[q] for q in ranks]
    return sum(picked) / len(picked)


def _kernel_pass(kx: Tensor, d2: Tensor, sigma2: float) -> tuple[Tensor, Tensor, Tensor]:
    """exp(-d2 / (2 sigma^2)) in place, zero diagonal; (tr(K L), L 1, tr(L L)) off-diagonal."""
    n = d2.shape[0]
    rows = _rows_per_block(n)
    zero = torch.zeros((), dtype=_F64, device=d2.device)
    t_kl, t_ll = zero.clone(), zero.clone()
    row_sums = torch.empty(n, dtype=_F64, device=d2.device)
    coef = -0.5 / sigma2
    for a in range(0, n, rows):
        b = min(n, a + rows)
        lb = torch.exp_(d2[a:b].mul_(coef))
        lb.diagonal(a).fill_(0.0)
        row_sums[a:b] = lb.sum(1)
        t_kl += torch.dot(kx[a:b].reshape(-1), lb.reshape(-1))
        t_ll += torch.dot(lb.reshape(-1), lb.reshape(-1))
    return t_kl, row_sums, t_ll


def score_fused(
    sx: CkaStats,
    sy: CkaStats,
    drop: Tensor,
    *,
    scale: float = 0.8,
    median: str = "offdiag",
    debiased: bool = True,
) -> FusedScores:
    """Linear CKA, linear CKA without ``drop`` and RBF CKA of two Gram-form stats.

    ``sx`` is the shared base (its RBF kernel is built once and cached on it); ``sy`` the
    descendant, whose Gram matrix is read twice in cache-sized row blocks.
    """
    assert sx.gram is not None and sy.gram is not None
    sc = _check_scale(scale)
    n = sy.n
    what = f"linear CKA of {sx.describe()} and {sy.describe()}"
    kx, rk, tk = sx.rbf_kernel(sc, median)
    lo, hi = _bracket(sy.r, sy.gram, n, median)
    d2 = torch.empty(n, n, dtype=_F64, device=sy.gram.device)
    first = _first_pass(sx, sy, drop, d2, lo, hi)
    med2 = _bracketed_median(first, d2, n, median)
    _check_bandwidth(med2, sy.r, sy.describe(), median)
    full = _Terms(n, first.t_xy, sx.t_self, sy.t_self, sx.rows, sy.rows, sx.r, sy.r)
    linear = _cka_from_terms(full, debiased, what)
    without = _cka_from_terms(first.ablated, debiased, what + " without dropped rows")
    t_kl, rl, tl = _kernel_pass(kx, d2, sc * sc * med2)
    del d2
    ones = torch.ones(n, dtype=_F64, device=kx.device)
    rbf = _cka_from_terms(
        _Terms(n, t_kl, tk, tl, rk, rl, ones, ones),
        debiased,
        f"RBF CKA of {sx.describe()} and {sy.describe()}",
    )
    return FusedScores(linear, without, rbf, first.t_xy)
