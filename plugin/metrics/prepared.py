"""Prepared CKA statistics: reuse one representation across many pairs (speed).

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
*downdates* the statistics (see :func:`_prepared_terms` for which path does what)
instead of recomputing on the reduced matrices. The results equal the plain functions'
(:mod:`.cka`, :mod:`.rbf`) to float64 round-off (tests check 1e-10 / 1e-6 with massive
activations). Not here: the plain one-shot functions or the HSIC term math
(:mod:`.hsic`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from ..errors import MetricInputError
from ._median import (
    _MAX_EXACT,
    Median,
    _median_ranks,
    _sample_edges,
    _sq_dist_block,
    _sq_median,
    _sq_median_stream,
    upper_values,
)
from ._validate import Indices, Matrix, as_indices, as_matrix
from .hsic import (
    _F64,
    Form,
    RowBlock,
    _chunk,
    _cka_from_terms,
    _gram_terms,
    _sqnorm,
    _Terms,
)
from .rbf import _check_bandwidth, _check_scale, _rbf_block, _rbf_full

Tensor = torch.Tensor


class CkaStats:
    """One representation's CKA statistics, computed once and reused across pairs.

    Holds the column-centred float64 matrix ``xc``, its squared row norms ``r``, column
    sums, and either the off-diagonal Gram matrix (``gram``, N x N, when N <= D and N <=
    ``max_gram_rows``) or, lazily, the covariance X^T X (D x D). PC1 (see
    :mod:`.pca`) and RBF kernels (per scale/median) are cached on first use. Memory:
    N*D + N^2 (Gram) or D^2 float64 values, plus N^2 per cached RBF kernel (Gram form)
    or, without a Gram and N <= 2048, N^2 for the squared distances cached on the first
    RBF use (:meth:`small_sq_dists`).
    Not thread-safe (lazy caches); treat instances as read-only.
    """

    def __init__(self, xt: Tensor, *, name: str, form: Form, max_gram_rows: int) -> None:
        self.name = name
        self.shape: tuple[int, int] = (int(xt.shape[0]), int(xt.shape[1]))
        n, d = self.shape
        if form not in ("auto", "gram", "features"):
            raise MetricInputError(f"form must be 'auto', 'gram' or 'features', got {form!r}")
        use_gram = form == "gram" or (form == "auto" and n <= d and n <= max_gram_rows)
        self.mean = xt.mean(dim=0)
        self.xc = xt - self.mean
        self.colsum = self.xc.sum(0)
        self.gram: Tensor | None = None
        self._cov: Tensor | None = None
        self.pc1_cache: tuple[Tensor, float, float] | None = None  # filled by pca.py
        self._rbf: dict[tuple[float, str], tuple[Tensor, Tensor, Tensor]] = {}
        self._sq_median: dict[str, float] = {}
        self._d2: Tensor | None = None  # see small_sq_dists()
        # token norms of the raw rows, one pass while xt is at hand (see row_norms())
        self._norms: Tensor = torch.linalg.vector_norm(xt, dim=1)
        if use_gram:
            g = symmetric_gram(self.xc)
            self.r = g.diagonal().clone()  # ||xc_i||^2: the Gram's diagonal, no extra pass
            g.fill_diagonal_(0.0)
            self.gram = g
            self.rows = g.sum(1)
            gv = g.reshape(-1)
            self.t_self = torch.dot(gv, gv)
        else:
            self.r = (self.xc * self.xc).sum(1)
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
        checked: bool = False,
    ) -> CkaStats:
        """Validate x (N >= 4, finite, not constant) and compute its statistics.

        ``checked``: x is a float64 tensor the caller has validated with ``as_matrix``.
        """
        if isinstance(x, CkaStats):
            return x
        xt = x if checked and isinstance(x, Tensor) else as_matrix(x, name)
        return cls(xt, name=name, form=form, max_gram_rows=max_gram_rows)

    @property
    def n(self) -> int:
        return self.shape[0]

    def row_norms(self) -> Tensor:
        """Token norms ||x_i|| of the raw (uncentred) rows, taken from x itself at
        construction (two diagnostics use them; x + mean - mean is not bitwise x)."""
        return self._norms

    @property
    def cov(self) -> Tensor:
        """X^T X of the centred matrix (D x D), computed on first use."""
        if self._cov is None:
            self._cov = self.xc.T @ self.xc
        return self._cov

    def describe(self) -> str:
        return f"{self.name} {self.shape}"

    def small_sq_dists(self) -> Tensor | None:
        """All N x N squared distances, cached, when one streamed row block holds them.

        Without a stored Gram matrix the median selection and the RBF kernel each build
        the squared distances from the Gram identity; when N^2 fits one row block
        (:func:`~.hsic._chunk` gives N rows, N <= 2048) both would build this very matrix
        - bitwise, same single product - so it is built once and shared. ``None`` for a
        Gram-form stats object (see :meth:`_sq_dists`) or when N^2 needs several blocks
        (the streamed, bounded-memory path). Memory: N^2 float64 (<= 32 MiB).
        """
        if self.gram is not None or _chunk(self.n, None) < self.n:
            return None
        if self._d2 is None:
            self._d2 = _sq_dist_block(self.xc, self.r, 0, self.n)
        return self._d2

    def sigma2(self, scale: float, median: str) -> float:
        """RBF bandwidth squared, scale^2 x median squared distance; cached per median."""
        return scale * scale * self._median2(median)

    def _median2(self, median: str, d2: Tensor | None = None) -> float:
        """Median squared pair distance, cached per convention; ``d2`` if built already."""
        if median not in self._sq_median:
            small = self.small_sq_dists()
            if self.gram is not None or small is not None:
                d2 = d2 if d2 is not None else self._sq_dists() if small is None else small
                self._sq_median[median] = _sq_median_stream(
                    lambda: [upper_values(d2)],
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
        return med2

    def _sq_dists(self) -> Tensor:
        assert self.gram is not None
        d2 = (self.r[:, None] + self.r[None, :] - 2.0 * self.gram).clamp_min_(0.0)
        return d2.fill_diagonal_(0.0)

    def rbf_kernel(self, scale: float, median: str) -> tuple[Tensor, Tensor, Tensor]:
        """(off-diagonal RBF Gram, its row sums, tr(K~ K~)), cached; needs the Gram."""
        key = (scale, median)
        if key not in self._rbf:
            d2 = self._sq_dists()  # built once: the median and then, in place, the kernel
            s2 = scale * scale * self._median2(median, d2)
            k = torch.exp_(d2.mul_(-0.5 / s2))
            k.fill_diagonal_(0.0)
            kv = k.reshape(-1)
            self._rbf[key] = (k, k.sum(1), torch.dot(kv, kv))
        return self._rbf[key]


#: Row strips of :func:`symmetric_gram`: at most this many, of at least this many rows.
_GRAM_STRIPS, _GRAM_STRIP_ROWS = 8, 64


def symmetric_gram(xc: Tensor) -> Tensor:
    """xc xc^T from its upper block triangle: strip i times rows i: only, mirrored.

    A symmetric product needs only about half its blocks; with 4-8 row strips this is
    ~5/8 of the flops of ``xc @ xc.T`` and measured 20% (N 256, D 512) to 37% (N 4096,
    D 1536) faster on one CPU thread. Same values to round-off (each entry is one dot
    product either way, summed in another order). On CUDA the one product is kept (a
    single kernel; the GPU is not what limits a layer there).
    """
    n = int(xc.shape[0])
    strips = min(_GRAM_STRIPS, n // _GRAM_STRIP_ROWS)
    if xc.is_cuda or strips < 2:
        return xc @ xc.T
    g = torch.empty(n, n, dtype=xc.dtype, device=xc.device)
    edges = [n * i // strips for i in range(strips + 1)]
    for a, b in itertools.pairwise(edges):
        torch.mm(xc[a:b], xc[a:].T, out=g[a:b, a:])
        g[b:, a:b] = g[a:b, b:].T
    return g


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
    product) and cached per (scale, median). Otherwise, for N^2 within one row block,
    each side's squared distances are built once and give both the median and the
    kernel (bitwise the streamed path's values); larger N streams row blocks.
    """
    sc = _check_scale(scale)
    _median_ranks(4, median)  # validates the name
    px, py = _stats_pair(sx, sy)
    what = f"RBF CKA of {px.describe()} and {py.describe()}"
    if px.gram is None or py.gram is None:
        n = px.n
        chunk = _chunk(n, None)
        sx2, sy2 = px.sigma2(sc, median), py.sigma2(sc, median)
        terms = _gram_terms(_rbf_rows(px, sx2), _rbf_rows(py, sy2), n, chunk, px.xc.device)
        return _cka_from_terms(terms, debiased, what)
    k, rk, tk = px.rbf_kernel(sc, median)
    l, rl, tl = py.rbf_kernel(sc, median)  # noqa: E741
    ones_x = torch.ones(px.n, dtype=_F64, device=k.device)
    ones_y = torch.ones(py.n, dtype=_F64, device=l.device)
    terms = _Terms(px.n, torch.dot(k.reshape(-1), l.reshape(-1)), tk, tl, rk, rl, ones_x, ones_y)
    return _cka_from_terms(terms, debiased, what)


def _rbf_rows(s: CkaStats, sigma2: float) -> RowBlock:
    """Kernel row blocks: from the cached distances when small, else streamed."""
    d2 = s.small_sq_dists()
    return _rbf_block(s.xc, s.r, sigma2) if d2 is None else _rbf_full(d2, sigma2)
