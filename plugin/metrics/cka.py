"""Linear and RBF CKA with the unbiased HSIC estimator (METHODS.md §2-§3).

Plain functions
---------------
- :func:`linear_cka` (``form="auto" | "gram" | "features"``), with the two forms also
  exposed as :func:`linear_cka_gram` (chunked Gram rows, O(N^2 D), memory O(chunk x N))
  and :func:`linear_cka_features` (one D_x x D_y product, O(N D_x D_y), no N x N matrix).
- :func:`rbf_cka` (chunked; both kernels built row-block by row-block) and
  :func:`median_pairwise_distance` (its exact bandwidth median).
- :func:`hsic_unbiased` / :func:`hsic_biased` on explicit Gram matrices (the definition).

Reusing a representation across pairs (speed)
---------------------------------------------
:class:`CkaStats` holds one representation's statistics: the column-centred float64
matrix, its squared row norms, and either its off-diagonal Gram matrix (N <= D) or its
covariance X^T X (N > D), plus lazily cached PC1 and RBF kernels. Build it once per base
layer and score every descendant against it:

    sb = CkaStats.from_matrix(base_layer, name="base")
    for y in descendants:
        sd = CkaStats.from_matrix(y, name="descendant")
        lin, ablated = linear_cka_and_ablated(sb, sd, dominant_datapoints(sb, sd))
        rbf = rbf_cka_prepared(sb, sd)

:func:`linear_cka_prepared` scores two stats (optionally with rows dropped) and
:func:`linear_cka_many` scores one base against several descendants. Dropping rows
*downdates* the statistics (subtracts the dropped rows' contributions to X^T Y, X^T X /
the Gram sums, column sums and norms): O(|U| N) on the Gram path, O(|U| D^2) on the
feature path, instead of recomputing on the reduced matrices. The results equal the
plain functions' to float64 round-off (tests check 1e-10 / 1e-6 with massive activations).

Numerics: every path works in float64 on column-centred data. Linear HSIC_u is invariant
to translating the rows (the U-centring removes additive row/column effects of the Gram
matrix), so centring changes no value but removes the large common offsets that would
otherwise cancel in ||X^T Y||^2 - sum r_i s_i.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import MetricInputError
from ._validate import (
    Indices,
    Matrix,
    as_indices,
    as_matrix,
    as_pair,
    check_finite,
    shape_str,
    to_tensor,
)

Tensor = torch.Tensor
Form = Literal["auto", "gram", "features"]
Median = Literal["offdiag", "all"]

_F64 = torch.float64
#: Gram-row blocks hold about this many float64 entries (32 MiB) unless chunk_size is given.
_BLOCK_ENTRIES = 1 << 22
#: Exact medians sort at most this many distances in one go (128 MiB of float64).
_MAX_EXACT = 1 << 24


# ----------------------------------------------------------------------------- HSIC
def hsic_unbiased(k: Tensor, l: Tensor) -> float:  # noqa: E741
    """Unbiased HSIC estimator of Song et al. (2012) on two N x N Gram matrices.

    HSIC_u = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((N-1)(N-2)) - 2/(N-2) 1^T K~ L~ 1]
             / (N (N-3)),  with K~, L~ the Gram matrices with zeroed diagonals.

    This is the definition, O(N^2) memory; the CKA functions never build N x N matrices
    unless asked to. Needs N >= 4.
    """
    kt = _square(k, "K")
    lt = _square(l, "L")
    if kt.shape != lt.shape:
        raise MetricInputError(
            f"K and L must have the same shape, got {shape_str(kt)} and {shape_str(lt)}"
        )
    n = kt.shape[0]
    if n < 4:
        raise MetricInputError(
            f"the unbiased HSIC needs N >= 4, got N={n} (K shape {shape_str(kt)})"
        )
    kt = kt.clone().fill_diagonal_(0.0)
    lt = lt.clone().fill_diagonal_(0.0)
    rk, rl = kt.sum(1), lt.sum(1)
    val = (
        (kt * lt).sum()
        + rk.sum() * rl.sum() / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * torch.dot(rk, rl)
    ) / (n * (n - 3))
    return float(val)


def hsic_biased(k: Tensor, l: Tensor) -> float:  # noqa: E741
    """Biased (centred) HSIC: tr(K H L H) / (N-1)^2 with H = I - 11^T / N."""
    kt = _square(k, "K")
    lt = _square(l, "L")
    if kt.shape != lt.shape:
        raise MetricInputError(
            f"K and L must have the same shape, got {shape_str(kt)} and {shape_str(lt)}"
        )
    n = kt.shape[0]
    if n < 2:
        raise MetricInputError(f"HSIC needs N >= 2, got N={n}")
    h = torch.eye(n, dtype=_F64) - 1.0 / n
    return float(torch.trace(kt @ h @ lt @ h) / (n - 1) ** 2)


def _square(m: Tensor, name: str) -> Tensor:
    t = to_tensor(m, name)
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise MetricInputError(
            f"{name} must be a square N x N Gram matrix, got shape {shape_str(t)}"
        )
    t = t.to(_F64)
    check_finite(t, name)
    return t


@dataclass(frozen=True)
class _Terms:
    """Sufficient statistics of a kernel pair for HSIC_u and biased HSIC.

    ``t_*`` are sums over i != j of K_ij L_ij (K K, L L); ``rows_*`` the off-diagonal
    row sums K~ 1, L~ 1; ``diag_*`` the diagonals (needed only by the biased form).
    """

    n: int
    t_xy: Tensor
    t_xx: Tensor
    t_yy: Tensor
    rows_x: Tensor
    rows_y: Tensor
    diag_x: Tensor
    diag_y: Tensor


def _hsic_terms(
    n: int, t: Tensor, rk: Tensor, rl: Tensor, dk: Tensor, dl: Tensor, debiased: bool
) -> tuple[float, float]:
    """(HSIC value, magnitude of its largest term) - the latter to tell 0 from round-off."""
    if debiased:
        parts = (
            t,
            rk.sum() * rl.sum() / ((n - 1) * (n - 2)),
            -2.0 / (n - 2) * torch.dot(rk, rl),
        )
        norm = n * (n - 3)
    else:  # tr(K H L H) / (n-1)^2 with the diagonals put back
        fk, fl = rk + dk, rl + dl
        parts = (t + torch.dot(dk, dl), -2.0 / n * torch.dot(fk, fl), fk.sum() * fl.sum() / n**2)
        norm = (n - 1) ** 2
    return float(sum(parts)) / norm, max(abs(float(p)) for p in parts) / norm


def _cka_from_terms(terms: _Terms, debiased: bool, what: str) -> float:
    """CKA from the terms; an HSIC(K, K) that is 0 up to round-off is an error, not NaN.

    HSIC_u(K, K) = 0 happens for real data: e.g. every token identical but one (the
    unbiased estimator ignores the Gram diagonal, METHODS §10).
    """
    n = terms.n
    hxy, _ = _hsic_terms(
        n, terms.t_xy, terms.rows_x, terms.rows_y, terms.diag_x, terms.diag_y, debiased
    )
    hxx, mx = _hsic_terms(
        n, terms.t_xx, terms.rows_x, terms.rows_x, terms.diag_x, terms.diag_x, debiased
    )
    hyy, my = _hsic_terms(
        n, terms.t_yy, terms.rows_y, terms.rows_y, terms.diag_y, terms.diag_y, debiased
    )
    if not (hxx > 1e-12 * mx and hyy > 1e-12 * my):
        est = "HSIC_u" if debiased else "HSIC"
        raise MetricInputError(
            f"{what}: CKA is undefined: {est}(K, K) = {hxx:.3g}, {est}(L, L) = {hyy:.3g} "
            f"(N={n}); a representation has no variation the estimator can see "
            "(e.g. all tokens identical but one)"
        )
    val = hxy / math.sqrt(hxx * hyy)
    if not math.isfinite(val):  # pragma: no cover - guarded above; belt and braces
        raise MetricInputError(f"{what}: CKA evaluated to {val}")
    return val


def _min_rows(debiased: bool) -> int:
    return 4 if debiased else 2


def _center(x: Tensor) -> Tensor:
    return x - x.mean(dim=0, keepdim=True)


# ------------------------------------------------------------------ linear, two forms
def _feature_terms(xc: Tensor, yc: Tensor) -> _Terms:
    r = (xc * xc).sum(1)
    s = (yc * yc).sum(1)
    c = xc.T @ yc
    gx = xc.T @ xc
    gy = yc.T @ yc
    return _Terms(
        n=xc.shape[0],
        t_xy=_sqnorm(c) - torch.dot(r, s),
        t_xx=_sqnorm(gx) - torch.dot(r, r),
        t_yy=_sqnorm(gy) - torch.dot(s, s),
        rows_x=xc @ xc.sum(0) - r,
        rows_y=yc @ yc.sum(0) - s,
        diag_x=r,
        diag_y=s,
    )


def _sqnorm(m: Tensor) -> Tensor:
    v = m.reshape(-1)
    return torch.dot(v, v)


RowBlock = Callable[[int, int], Tensor]


def _gram_terms(kx: RowBlock, ky: RowBlock, n: int, chunk: int, device: torch.device) -> _Terms:
    """Accumulate the HSIC terms from row blocks K[a:b, :], L[a:b, :] (never N x N)."""
    t_xy, t_xx, t_yy = (torch.zeros((), dtype=_F64, device=device) for _ in range(3))
    rows_x, rows_y, diag_x, diag_y = (torch.empty(n, dtype=_F64, device=device) for _ in range(4))
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        kb, lb = kx(a, b), ky(a, b)
        i = torch.arange(b - a, device=device)
        diag_x[a:b] = kb[i, i + a]
        diag_y[a:b] = lb[i, i + a]
        kb[i, i + a] = 0.0
        lb[i, i + a] = 0.0
        kv, lv = kb.reshape(-1), lb.reshape(-1)
        t_xy += torch.dot(kv, lv)
        t_xx += torch.dot(kv, kv)
        t_yy += torch.dot(lv, lv)
        rows_x[a:b] = kb.sum(1)
        rows_y[a:b] = lb.sum(1)
    return _Terms(n, t_xy, t_xx, t_yy, rows_x, rows_y, diag_x, diag_y)


def _chunk(n: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return max(1, min(n, _BLOCK_ENTRIES // max(n, 1)))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise MetricInputError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def linear_cka_gram(
    x: Matrix, y: Matrix, *, debiased: bool = True, chunk_size: int | None = None
) -> float:
    """Linear CKA from the Gram matrices K = X X^T, L = Y Y^T, built in row blocks.

    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC unbiased (default) or biased.
    Cost O(N^2 (D_x + D_y)); memory O(chunk_size x N). Cheaper than the feature form
    when N < D.
    """
    xt, yt = as_pair(x, y, min_rows=_min_rows(debiased))
    xc, yc = _center(xt), _center(yt)
    n = xc.shape[0]
    terms = _gram_terms(
        lambda a, b: xc[a:b] @ xc.T,
        lambda a, b: yc[a:b] @ yc.T,
        n,
        _chunk(n, chunk_size),
        xc.device,
    )
    return _cka_from_terms(
        terms, debiased, f"linear CKA of x {shape_str(xt)} and y {shape_str(yt)}"
    )


def linear_cka_features(x: Matrix, y: Matrix, *, debiased: bool = True) -> float:
    """Linear CKA in feature space, without any N x N matrix (METHODS §2).

    With r_i = ||x_i||^2, s_i = ||y_i||^2:
    tr(K~ L~) = ||X^T Y||_F^2 - sum_i r_i s_i,  1^T K~ 1 = ||X^T 1||^2 - sum_i r_i,
    K~ 1 = X (X^T 1) - r.  Cost O(N (D_x D_y + D_x^2 + D_y^2)).
    """
    xt, yt = as_pair(x, y, min_rows=_min_rows(debiased))
    terms = _feature_terms(_center(xt), _center(yt))
    return _cka_from_terms(
        terms, debiased, f"linear CKA of x {shape_str(xt)} and y {shape_str(yt)}"
    )


def _prefer_gram(n: int, dx: int, dy: int) -> bool:
    return n * n * (dx + dy + 3) < n * (dx * dy + dx * dx + dy * dy)


def linear_cka(x: Matrix, y: Matrix, *, debiased: bool = True, form: Form = "auto") -> float:
    """Linear CKA of two representations of the same N tokens (METHODS §2).

    CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = X X^T, L = Y Y^T, with the
    unbiased HSIC_u (``debiased=True``, needs N >= 4) or the biased centred HSIC.
    ``form="auto"`` picks the cheaper of the Gram form (O(N^2 D)) and the feature form
    (O(N D^2)) by shape; both accumulate in float64 and agree to round-off.

    Raises:
        MetricInputError: see :func:`~reasondiff.metrics._validate.as_matrix`; also when
            HSIC(K, K) <= 0 (CKA undefined).
    """
    if form == "gram":
        return linear_cka_gram(x, y, debiased=debiased)
    if form == "features":
        return linear_cka_features(x, y, debiased=debiased)
    if form != "auto":
        raise MetricInputError(f"form must be 'auto', 'gram' or 'features', got {form!r}")
    xt, yt = as_pair(x, y, min_rows=_min_rows(debiased))
    if _prefer_gram(xt.shape[0], xt.shape[1], yt.shape[1]):
        return linear_cka_gram(xt, yt, debiased=debiased)
    return linear_cka_features(xt, yt, debiased=debiased)


# ------------------------------------------------------------------------------ RBF
def _sq_dist_block(xc: Tensor, r: Tensor, a: int, b: int, c0: int = 0) -> Tensor:
    """Squared distances of rows a:b to rows c0:, from the Gram identity, clamped >= 0."""
    d2 = r[a:b, None] + r[None, c0:] - 2.0 * (xc[a:b] @ xc[c0:].T)
    return d2.clamp_min_(0.0)


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


def _kth(v: Tensor, q: int) -> float:
    """The value of 0-based rank q of a 1-D tensor (O(len) selection)."""
    return float(torch.kthvalue(v.cpu(), q + 1).values)


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
        return _kth(vals, q), (_kth(vals, q + 1) if with_next else math.nan)
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
    first = _kth(vals, q - below)
    if not with_next:
        return first, math.nan
    nxt = _kth(vals, q + 1 - below) if q + 1 - below < vals.numel() else above
    return first, nxt


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
        i = torch.arange(b - a, device=d2.device)
        d2[i, i + a] = 0.0
        return torch.exp_(d2.mul_(-0.5 / sigma2))

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


# -------------------------------------------------------------------- prepared stats
class CkaStats:
    """One representation's CKA statistics, computed once and reused across pairs.

    Holds the column-centred float64 matrix ``xc``, its squared row norms ``r``, column
    sums, and either the off-diagonal Gram matrix (``gram``, N x N, when N <= D and N <=
    ``max_gram_rows``) or, lazily, the covariance X^T X (D x D). PC1 (see
    :mod:`.pca`) and RBF kernels (per scale/median) are cached on first use. Memory:
    N*D + N^2 (Gram) or D^2 float64 values, plus N^2 per cached RBF kernel.
    Not thread-safe (lazy caches); treat instances as read-only.
    """

    def __init__(self, xt: Tensor, *, name: str, form: Form, max_gram_rows: int) -> None:
        self.name = name
        self.shape: tuple[int, int] = (int(xt.shape[0]), int(xt.shape[1]))
        self.mean = xt.mean(dim=0)
        self.xc = xt - self.mean
        self.r = (self.xc * self.xc).sum(1)
        self.colsum = self.xc.sum(0)
        n, d = self.shape
        if form not in ("auto", "gram", "features"):
            raise MetricInputError(f"form must be 'auto', 'gram' or 'features', got {form!r}")
        use_gram = form == "gram" or (form == "auto" and n <= d and n <= max_gram_rows)
        self.gram: Tensor | None = None
        self._cov: Tensor | None = None
        self.pc1_cache: tuple[Tensor, float, float] | None = None  # filled by pca.py
        self._rbf: dict[tuple[float, str], tuple[Tensor, Tensor, Tensor]] = {}
        self._sq_median: dict[str, float] = {}
        if use_gram:
            g = self.xc @ self.xc.T
            g.fill_diagonal_(0.0)
            self.gram = g
            self.rows = g.sum(1)
            gv = g.reshape(-1)
            self.t_self = torch.dot(gv, gv)
        else:
            self.rows = self.xc @ self.colsum - self.r
            self.t_self = _sqnorm(self.cov) - torch.dot(self.r, self.r)

    @classmethod
    def from_matrix(
        cls,
        x: Matrix | CkaStats,
        *,
        name: str = "x",
        form: Form = "auto",
        max_gram_rows: int = 8192,
    ) -> CkaStats:
        """Validate x (N >= 4, finite, not constant) and compute its statistics."""
        if isinstance(x, CkaStats):
            return x
        return cls(as_matrix(x, name), name=name, form=form, max_gram_rows=max_gram_rows)

    @property
    def n(self) -> int:
        return self.shape[0]

    def row_norms(self) -> Tensor:
        """Token norms ||x_i|| of the raw (uncentred) rows."""
        return (self.xc + self.mean).square().sum(1).sqrt()

    @property
    def cov(self) -> Tensor:
        """X^T X of the centred matrix (D x D), computed on first use."""
        if self._cov is None:
            self._cov = self.xc.T @ self.xc
        return self._cov

    def describe(self) -> str:
        return f"{self.name} {self.shape}"

    def sigma2(self, scale: float, median: str) -> float:
        """RBF bandwidth squared, scale^2 x median squared distance; cached per median."""
        if median not in self._sq_median:
            if self.gram is not None:
                d2 = self._sq_dists()
                mask = torch.ones_like(d2, dtype=torch.bool).triu_(1)
                self._sq_median[median] = _sq_median_stream(
                    lambda: [d2[mask]],
                    self.n,
                    median,
                    _MAX_EXACT,
                    lambda: _sample_edges(self.xc, self.r),
                )
            else:
                self._sq_median[median] = _sq_median(
                    self.xc, self.r, median, _chunk(self.n, None), _MAX_EXACT
                )
        med2 = self._sq_median[median]
        _check_bandwidth(med2, self.r, self.describe(), median)
        return scale * scale * med2

    def _sq_dists(self) -> Tensor:
        assert self.gram is not None
        d2 = (self.r[:, None] + self.r[None, :] - 2.0 * self.gram).clamp_min_(0.0)
        return d2.fill_diagonal_(0.0)

    def rbf_kernel(self, scale: float, median: str) -> tuple[Tensor, Tensor, Tensor]:
        """(off-diagonal RBF Gram, its row sums, tr(K~ K~)), cached; needs the Gram."""
        key = (scale, median)
        if key not in self._rbf:
            s2 = self.sigma2(scale, median)
            k = torch.exp_(self._sq_dists().mul_(-0.5 / s2))
            k.fill_diagonal_(0.0)
            kv = k.reshape(-1)
            self._rbf[key] = (k, k.sum(1), torch.dot(kv, kv))
        return self._rbf[key]


def _stats_pair(x: Matrix | CkaStats, y: Matrix | CkaStats) -> tuple[CkaStats, CkaStats]:
    sx = CkaStats.from_matrix(x, name="x")
    sy = CkaStats.from_matrix(y, name="y")
    if sx.n != sy.n:
        raise MetricInputError(
            f"{sx.name} and {sy.name} must have the same number of rows (tokens): "
            f"{sx.describe()} vs {sy.describe()}"
        )
    return sx, sy


def _prepared_terms(
    sx: CkaStats, sy: CkaStats, drop: Tensor | None, cross: Tensor | None = None
) -> _Terms:
    """HSIC terms of a prepared pair, optionally without the rows in ``drop``.

    Gram path: the kept rows' terms are re-summed from the stored Gram matrices and
    re-centred (O(N^2), no new O(N^2 D) product). Subtracting the dropped rows'
    contributions from the totals instead (an O(|U| N) downdate) is *not* used: when two
    tokens carry massive activations in the same dimension their Gram entry is ~1e8 and
    its square ~1e16 swamps the kept rows' terms (measured error 1e-5 in CKA).
    Feature path: X^T Y, X^T X, Y^T Y and the column sums are downdated by the dropped
    rows (O(|U| D^2)) and then re-centred on the kept rows (a rank-one correction), which
    keeps the cancellation at the scale of the centred data. ``cross`` is X^T Y if known.
    """
    n = sx.n
    if sx.gram is not None and sy.gram is not None:
        if drop is None or drop.numel() == 0:
            t_xy = torch.dot(sx.gram.reshape(-1), sy.gram.reshape(-1))
            return _Terms(n, t_xy, sx.t_self, sy.t_self, sx.rows, sy.rows, sx.r, sy.r)
        keep = _keep_mask(n, drop, sx.gram.device)
        k, dk = _recentred_sub_gram(sx.gram, sx.r, keep)
        l, dl = _recentred_sub_gram(sy.gram, sy.r, keep)  # noqa: E741
        kv, lv = k.reshape(-1), l.reshape(-1)
        return _Terms(
            k.shape[0],
            torch.dot(kv, lv),
            torch.dot(kv, kv),
            torch.dot(lv, lv),
            k.sum(1),
            l.sum(1),
            dk,
            dl,
        )
    c = sx.xc.T @ sy.xc if cross is None else cross
    if drop is None or drop.numel() == 0:
        rows_x = sx.xc @ sx.colsum - sx.r
        rows_y = sy.xc @ sy.colsum - sy.r
        t_xx = sx.t_self if sx.gram is None else _sqnorm(sx.cov) - torch.dot(sx.r, sx.r)
        t_yy = sy.t_self if sy.gram is None else _sqnorm(sy.cov) - torch.dot(sy.r, sy.r)
        return _Terms(n, _sqnorm(c) - torch.dot(sx.r, sy.r), t_xx, t_yy, rows_x, rows_y, sx.r, sy.r)
    keep = _keep_mask(n, drop, c.device)
    m = n - drop.numel()
    xu, yu = sx.xc[drop], sy.xc[drop]
    mx = (sx.colsum - xu.sum(0)) / m  # mean of the kept rows
    my = (sy.colsum - yu.sum(0)) / m
    # sum_S (x - mx)(y - my)^T = (X^T Y - Xu^T Yu) - m mx my^T
    c_s = c - xu.T @ yu - m * torch.outer(mx, my)
    gx_s = sx.cov - xu.T @ xu - m * torch.outer(mx, mx)
    gy_s = sy.cov - yu.T @ yu - m * torch.outer(my, my)
    r = (sx.xc[keep] - mx).square().sum(1)
    s = (sy.xc[keep] - my).square().sum(1)
    return _Terms(
        m,
        _sqnorm(c_s) - torch.dot(r, s),
        _sqnorm(gx_s) - torch.dot(r, r),
        _sqnorm(gy_s) - torch.dot(s, s),
        -r,  # K~ 1 = X'(X'^T 1) - r with X'^T 1 = 0 once re-centred
        -s,
        r,
        s,
    )


def _recentred_sub_gram(gram_off: Tensor, r: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Off-diagonal part and diagonal of H K_SS H, the Gram of the re-centred kept rows."""
    k = gram_off[keep][:, keep]
    k.diagonal().copy_(r[keep])
    row = k.mean(1)
    k -= row[:, None]
    k -= row[None, :]
    k += row.mean()
    diag = k.diagonal().clone()
    k.fill_diagonal_(0.0)
    return k, diag


def _keep_mask(n: int, drop: Tensor, device: torch.device) -> Tensor:
    keep = torch.ones(n, dtype=torch.bool, device=device)
    keep[drop.to(device)] = False
    return keep


def _checked_drop(drop: Indices | None, n: int, debiased: bool) -> Tensor | None:
    if drop is None:
        return None
    idx = as_indices(drop, n, "drop")
    left = n - idx.numel()
    need = 4
    if left < need:
        raise MetricInputError(
            f"dropping {idx.numel()} of N={n} rows leaves {left}; CKA needs at least {need}"
        )
    return idx


def linear_cka_prepared(
    sx: CkaStats | Matrix,
    sy: CkaStats | Matrix,
    *,
    debiased: bool = True,
    drop: Indices | None = None,
) -> float:
    """Linear CKA from prepared statistics; equals :func:`linear_cka` (on x[keep], y[keep]).

    ``drop`` removes those rows by downdating the statistics (no recomputation).
    """
    px, py = _stats_pair(sx, sy)
    idx = _checked_drop(drop, px.n, debiased)
    terms = _prepared_terms(px, py, idx)
    return _cka_from_terms(terms, debiased, f"linear CKA of {px.describe()} and {py.describe()}")


def linear_cka_and_ablated(
    sx: CkaStats | Matrix, sy: CkaStats | Matrix, drop: Indices, *, debiased: bool = True
) -> tuple[float, float]:
    """(linear CKA, linear CKA without the rows in ``drop``) sharing one cross product."""
    px, py = _stats_pair(sx, sy)
    idx = _checked_drop(drop, px.n, debiased)
    what = f"linear CKA of {px.describe()} and {py.describe()}"
    cross = None if px.gram is not None and py.gram is not None else px.xc.T @ py.xc
    return (
        _cka_from_terms(_prepared_terms(px, py, None, cross), debiased, what),
        _cka_from_terms(
            _prepared_terms(px, py, idx, cross), debiased, what + " without dropped rows"
        ),
    )


def linear_cka_many(
    x: CkaStats | Matrix, ys: Sequence[CkaStats | Matrix], *, debiased: bool = True
) -> list[float]:
    """Linear CKA of one base representation against several, reusing the base's stats."""
    sx = CkaStats.from_matrix(x, name="x")
    return [
        linear_cka_prepared(sx, CkaStats.from_matrix(y, name=f"ys[{i}]"), debiased=debiased)
        for i, y in enumerate(ys)
    ]


def rbf_cka_prepared(
    sx: CkaStats | Matrix,
    sy: CkaStats | Matrix,
    *,
    scale: float = 0.8,
    debiased: bool = True,
    median: Median = "offdiag",
) -> float:
    """RBF CKA from prepared statistics; equals :func:`rbf_cka`.

    With stored Gram matrices the RBF kernels are derived from them (no new O(N^2 D)
    product) and cached per (scale, median); otherwise falls back to the chunked path.
    """
    sc = _check_scale(scale)
    _median_ranks(4, median)  # validates the name
    px, py = _stats_pair(sx, sy)
    what = f"RBF CKA of {px.describe()} and {py.describe()}"
    if px.gram is None or py.gram is None:
        n = px.n
        chunk = _chunk(n, None)
        sx2, sy2 = px.sigma2(sc, median), py.sigma2(sc, median)
        terms = _gram_terms(
            _rbf_block(px.xc, px.r, sx2), _rbf_block(py.xc, py.r, sy2), n, chunk, px.xc.device
        )
        return _cka_from_terms(terms, debiased, what)
    k, rk, tk = px.rbf_kernel(sc, median)
    l, rl, tl = py.rbf_kernel(sc, median)  # noqa: E741
    ones_x = torch.ones(px.n, dtype=_F64, device=k.device)
    ones_y = torch.ones(py.n, dtype=_F64, device=l.device)
    terms = _Terms(px.n, torch.dot(k.reshape(-1), l.reshape(-1)), tk, tl, rk, rl, ones_x, ones_y)
    return _cka_from_terms(terms, debiased, what)
