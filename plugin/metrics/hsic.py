"""HSIC estimators and the term machinery every CKA path shares (METHODS.md §2).

- :func:`hsic_unbiased` / :func:`hsic_biased` on explicit N x N Gram matrices: the
  definitions, used as references and in tests.
- :class:`_Terms` (the sufficient statistics of a kernel pair), :func:`_hsic_terms` and
  :func:`_cka_from_terms` (CKA from them, with the "HSIC(K, K) = 0" check), and the two
  term builders: :func:`_feature_terms` (linear kernels, from X^T Y, no N x N matrix) and
  :func:`_gram_terms` (any kernel, from row blocks of K and L).
- Centring and chunk-size helpers shared by the linear, RBF and prepared paths.

Not here: kernels and bandwidths (:mod:`.rbf`, :mod:`._median`), input validation
(:mod:`._validate`), public CKA entry points (:mod:`.cka`, :mod:`.prepared`).

Numerics: every path works in float64 on column-centred data. Linear HSIC_u is invariant
to translating the rows (the U-centring removes additive row/column effects of the Gram
matrix), so centring changes no value but removes the large common offsets that would
otherwise cancel in ||X^T Y||^2 - sum r_i s_i.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import MetricInputError
from ._validate import check_finite, shape_str, to_tensor

Tensor = torch.Tensor
#: How linear CKA gets its terms: from Gram row blocks, from feature products, or by shape.
Form = Literal["auto", "gram", "features"]

_F64 = torch.float64
#: Gram-row blocks hold about this many float64 entries (32 MiB) unless chunk_size is given.
_BLOCK_ENTRIES = 1 << 22


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


def _debiased_hsics(terms: _Terms) -> tuple[float, float, float, float, float]:
    """(HSIC_u(K, L), HSIC_u(K, K), its largest term, HSIC_u(L, L), its largest term).

    :func:`_hsic_terms` three times, with each sum and dot product taken once and all
    eight scalars read back at once (one ``tolist``, not ~20 scalar reads); the same
    float64 operations in the same order, so the same values bit for bit.
    """
    n = terms.n
    rx, ry = terms.rows_x, terms.rows_y
    scalars = torch.stack(
        [
            terms.t_xy,
            terms.t_xx,
            terms.t_yy,
            rx.sum(),
            ry.sum(),
            torch.dot(rx, ry),
            torch.dot(rx, rx),
            torch.dot(ry, ry),
        ]
    )
    t_xy, t_xx, t_yy, sx, sy, dxy, dxx, dyy = scalars.tolist()
    c2, norm = -2.0 / (n - 2), n * (n - 3)

    def hsic(t: float, a: float, b: float, dot: float) -> tuple[float, float]:
        parts = (t, a * b / ((n - 1) * (n - 2)), c2 * dot)
        return (parts[0] + parts[1] + parts[2]) / norm, max(abs(p) for p in parts) / norm

    hxy, _ = hsic(t_xy, sx, sy, dxy)
    hxx, mx = hsic(t_xx, sx, sx, dxx)
    hyy, my = hsic(t_yy, sy, sy, dyy)
    return hxy, hxx, mx, hyy, my


def _cka_from_terms(terms: _Terms, debiased: bool, what: str) -> float:
    """CKA from the terms; an HSIC(K, K) that is 0 up to round-off is an error, not NaN.

    HSIC_u(K, K) = 0 happens for real data: e.g. every token identical but one (the
    unbiased estimator ignores the Gram diagonal, METHODS §10).
    """
    n = terms.n
    if debiased:
        hxy, hxx, mx, hyy, my = _debiased_hsics(terms)
    else:
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
