"""Principal-component views of CKA (METHODS.md §4-§5): what the first PC carries.

- :func:`pc1_projection` |(x_i - mean) . v1| per token, :func:`pc1_share` PC1's
  explained-variance share;
- :func:`pca_form_terms` / :func:`pca_form_cka`: the biased linear CKA written as
  sum_ij lambda_X^i lambda_Y^j <u_X^i, u_Y^j>^2 / (||lambda_X|| ||lambda_Y||) (the study's
  Appendix B.1), an explanation tool;
- :func:`pc1_carried_share`: the share of that sum carried by the PC1 x PC1 term.

Every function accepts an N x D matrix or a :class:`~reasondiff.metrics.prepared.CkaStats`
(whose PC1 is computed once and cached). PC1 is the top eigenpair of the
smaller of the centred Gram matrix (N x N) and the covariance (D x D), in float64, found
by Lanczos on a CPU Gram (:func:`_lanczos_top`, N <= :data:`PC1_LANCZOS_MAX_N`) or
block subspace iteration (see :func:`_top_eigenpair`), ``eigh`` when neither settles. When
the top eigenvalue is repeated, PC1 is not unique and the projection is one valid choice.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import MetricInputError
from ._validate import Matrix, as_pair
from .defaults import PC1_LANCZOS_MAX_N
from .prepared import CkaStats

Tensor = torch.Tensor


#: Ritz-value ratio lambda_2 / lambda_1 above which the subspace iteration hands over to
#: ``eigh`` (its convergence goes as that ratio per step; the dominant-datapoint case,
#: where PC1 carries most of the variance, is far below it).
_SMALL_GAP = 0.9


def _top_eigenpair(
    a: Tensor, *, diag: Tensor | None = None, tol: float = 1e-12, max_iter: int = 150
) -> tuple[float, Tensor]:
    """Largest eigenvalue and its unit eigenvector of a symmetric PSD matrix (float64).

    The matrix is ``a + diag(diag)`` when ``diag`` is given (an off-diagonal Gram and its
    diagonal: the iteration multiplies by the two parts, so no N x N sum is built
    unless ``eigh`` is needed). :func:`_iterate_top` first, ``eigh`` if it does not settle.
    """
    top = _iterate_top(a, diag=diag, tol=tol, max_iter=max_iter)
    if top is not None:
        return top
    evals, evecs = torch.linalg.eigh(a if diag is None else a + torch.diag(diag))
    return max(float(evals[-1]), 0.0), evecs[:, -1]


def _iterate_top(
    a: Tensor,
    *,
    diag: Tensor | None = None,
    tol: float = 1e-12,
    max_iter: int = 150,
    columns: bool = False,
) -> tuple[float, Tensor] | None:
    """The top eigenpair of ``a (+ diag(diag))`` by block subspace iteration, or ``None``.

    Block subspace iteration (16 vectors, fixed seed, so deterministic) with a
    Rayleigh-Ritz step, stopped when the residual ||A v - theta v|| <= tol x theta; costs a
    few m^2 x 16 products instead of a full O(m^3) eigendecomposition, which matters
    for m ~ 2000 tokens on a CPU and for every layer on a GPU. ``None`` (use ``eigh``)
    for small m, for a zero matrix, when the gap between the first two eigenvalues is
    small (ratio > ``_SMALL_GAP`` after a few steps: ill-conditioned, slow to converge)
    or when the iteration does not converge. ``columns``: start from the matrix's own
    columns at the 16 largest diagonal entries (a Gram's largest-norm tokens), which
    is one power step already taken, with no product.
    """
    m = a.shape[0]

    def times(v: Tensor) -> Tensor:
        return a @ v if diag is None else torch.addcmul(a @ v, diag[:, None], v)

    if m > 64:
        if columns:
            d = a.diagonal() if diag is None else diag
            idx = torch.sort(d, descending=True, stable=True).indices[:16]
            block = a[:, idx].clone()
            if diag is not None:
                block[idx, torch.arange(idx.numel(), device=a.device)] += diag[idx]
        else:
            gen = torch.Generator().manual_seed(0)
            block = torch.randn(m, min(16, m), generator=gen, dtype=a.dtype).to(a.device)
            block = times(block)
        for step in range(max_iter):
            q, _ = torch.linalg.qr(block)
            aq = times(q)
            t = q.T @ aq
            w, s = torch.linalg.eigh(0.5 * (t + t.T))
            theta = float(w[-1])
            if not theta > 0.0:
                break
            if step >= 4 and float(w[-2]) > _SMALL_GAP * theta:
                break  # PC1 barely dominates: iteration would crawl, eigh is exact now
            v = q @ s[:, -1]
            res = float(torch.linalg.vector_norm(aq @ s[:, -1] - theta * v))
            if res <= tol * theta:
                return theta, v
            block = aq
    return None


#: Most Lanczos steps before handing over (to the block iteration, then ``eigh``).
_LANCZOS_STEPS = 96
#: Lanczos checks convergence (a small tridiagonal ``eigh``, ~as costly as a step) every
#: this many steps.
_LANCZOS_CHECK = 2


def _lanczos_top(a: Tensor, diag: Tensor, *, tol: float = 1e-12) -> tuple[float, Tensor] | None:
    """Top eigenpair of ``a + diag(diag)`` (symmetric PSD, float64) by Lanczos, or ``None``.

    On a CPU one matrix-vector product per step beats the block iteration's 16-column
    product, QR and ``eigh`` per step at every Gram size measured (one thread: N 256
    1.3 vs 2.1 ms, N 4096 59 vs 225 ms, N 8192 0.19 vs 0.70 s with PC1 dominating), and
    a flat top (a cluster of similar signal eigenvalues, where the block iteration hands
    over to a full ``eigh``: ~19 ms at N 256) takes about as many steps as the cluster is
    wide. Full re-orthogonalisation (twice), so the basis stays orthonormal to round-off.
    Start: one product with the largest-norm token's unit vector plus a fixed-seed
    random vector (deterministic; not orthogonal to PC1 in practice). Stops when the
    Ritz residual ||A v - theta v|| <= tol x (theta - theta_2) - the eigenvector error
    bound (residual / gap) is then <= tol - and checks that residual with one product.
    ``None`` when it does not converge within :data:`_LANCZOS_STEPS` (a near-tie at the top).
    """
    m = a.shape[0]
    steps = min(m, _LANCZOS_STEPS)

    def times(v: Tensor) -> Tensor:
        return torch.addcmul(torch.mv(a, v), diag, v)

    gen = torch.Generator().manual_seed(0)
    u = torch.randn(m, generator=gen, dtype=a.dtype).to(a.device)
    u /= torch.linalg.vector_norm(u)
    u[int(torch.argmax(diag))] += 1.0
    q = times(u)
    norm = float(torch.linalg.vector_norm(q))
    if not norm > 0.0:
        return None
    q /= norm
    basis = torch.empty(steps + 1, m, dtype=a.dtype, device=a.device)
    basis[0] = q
    alpha = np.zeros(steps)
    beta = np.zeros(steps)
    for j in range(steps):
        qj = basis[: j + 1]
        w = times(basis[j])
        h = torch.mv(qj, w)
        alpha[j] = h[j].item()
        w = torch.addmv(w, qj.T, h, alpha=-1.0)  # twice: "twice is enough" (Kahan)
        w = torch.addmv(w, qj.T, torch.mv(qj, w), alpha=-1.0)
        beta[j] = b = float(torch.linalg.vector_norm(w))
        if j % _LANCZOS_CHECK == _LANCZOS_CHECK - 1 or j == steps - 1 or not b > 0.0:
            top = _lanczos_ritz(a, diag, qj, alpha[: j + 1], beta[:j], b, tol)
            if top is not None:
                return top if top[0] > 0.0 else None
        if not b > 0.0:
            return None
        torch.div(w, b, out=basis[j + 1])
    return None


def _lanczos_ritz(
    a: Tensor, diag: Tensor, qj: Tensor, alpha: np.ndarray, beta: np.ndarray, b: float, tol: float
) -> tuple[float, Tensor] | None:
    """The top Ritz pair of a Lanczos basis if converged (residual checked with one product)."""
    k = alpha.size
    t = np.zeros((k, k))
    t.flat[:: k + 1] = alpha
    t.flat[1 :: k + 1] = beta
    t.flat[k :: k + 1] = beta
    evals, evecs = np.linalg.eigh(t)
    theta = float(evals[-1])
    gap = theta - float(evals[-2]) if k > 1 else theta
    if not (theta > 0.0 and b * abs(float(evecs[-1, -1])) <= tol * gap):
        return None
    v = torch.mv(qj.T, torch.from_numpy(np.ascontiguousarray(evecs[:, -1])).to(a.device))
    v /= torch.linalg.vector_norm(v)
    res = torch.addcmul(torch.mv(a, v), diag, v).sub_(v, alpha=theta)
    return (theta, v) if float(torch.linalg.vector_norm(res)) <= 1e3 * tol * theta else None


def _pc1(s: CkaStats) -> tuple[Tensor, float, float]:
    """(signed projections Xc v1, top eigenvalue sigma_1^2, total variance ||Xc||_F^2)."""
    if s.pc1_cache is None:
        n, d = s.shape
        top: tuple[float, Tensor] | None = None
        if s.gram is not None and n <= PC1_LANCZOS_MAX_N and not s.gram.is_cuda:
            top = _lanczos_top(s.gram, s.r)
        if top is None and s.gram is not None:  # iterate on the Gram, no D x D product
            top = _iterate_top(s.gram, diag=s.r, columns=True)
            if top is None and n <= d:
                top = _top_eigenpair(s.gram, diag=s.r)
        if top is not None:
            lam, u = top
            p = u * lam**0.5
        else:  # the smaller of N x N and D x D, by eigh if the iteration did not settle
            lam, v = _top_eigenpair(s.cov)
            p = s.xc @ v
        # fix the arbitrary sign (largest |p| positive) so results are reproducible
        if float(p[int(torch.argmax(p.abs()))]) < 0:
            p = -p
        s.pc1_cache = (p, lam, float(s.r.sum()))
    return s.pc1_cache


def _stats(x: Matrix | CkaStats, name: str = "x") -> CkaStats:
    return CkaStats.from_matrix(x, name=name)


def pc1_projection(x: Matrix | CkaStats) -> Tensor:
    """p_i = |(x_i - mean) . v1| for each token (float64, length N).

    Absolute value because the sign of a principal direction is arbitrary (the reference
    code ranked by the signed projection, so a sign flip changed its dominant tokens).
    """
    return _pc1(_stats(x))[0].abs()


def pc1_share(x: Matrix | CkaStats) -> float:
    """Explained-variance share of PC1: sigma_1^2 / sum_i sigma_i^2 = lambda_1 / tr(Xc^T Xc)."""
    _, lam, total = _pc1(_stats(x))
    return lam / total


def pca_form_terms(x: Matrix, y: Matrix) -> Tensor:
    """The matrix of terms lambda_X^i lambda_Y^j <u_X^i, u_Y^j>^2 / (||lambda_X|| ||lambda_Y||).

    u are unit principal components in sample space (left singular vectors of the
    centred matrices), lambda the explained-variance fractions sigma_i^2 / sum sigma^2.
    The terms sum to the biased linear CKA; entry [0, 0] is the PC1 x PC1 term.
    Shape min(N, D_x) x min(N, D_y), float64. Cost: two thin SVDs.
    """
    xt, yt = as_pair(x, y, min_rows=2)
    ux, sx, _ = torch.linalg.svd(xt - xt.mean(0), full_matrices=False)
    uy, sy, _ = torch.linalg.svd(yt - yt.mean(0), full_matrices=False)
    lx = sx**2 / (sx**2).sum()
    ly = sy**2 / (sy**2).sum()
    overlap = (ux.T @ uy) ** 2
    norm = float(lx.square().sum().sqrt() * ly.square().sum().sqrt())
    terms: Tensor = lx[:, None] * ly[None, :] * overlap / norm
    return terms


def pca_form_cka(x: Matrix, y: Matrix) -> float:
    """Biased linear CKA in its principal-component form (METHODS §4).

    CKA_biased(X, Y) = sum_ij lambda_X^i lambda_Y^j <u_X^i, u_Y^j>^2 / (||lambda_X|| ||lambda_Y||);
    equals ``linear_cka(x, y, debiased=False)`` to round-off.
    """
    return float(pca_form_terms(x, y).sum())


def pc1_carried_share(x: Matrix | CkaStats, y: Matrix | CkaStats) -> float:
    """Share of the biased linear CKA carried by its PC1 x PC1 term, in [0, 1].

    With C = Xc^T Yc the term over the total is (v_X1^T C v_Y1)^2 / ||C||_F^2
    = ((Xc v_X1) . (Yc v_Y1))^2 / ||Xc^T Yc||_F^2, so no full PCA is needed. Near 1 when
    one direction (e.g. a massive-activation token) dominates both representations.

    Raises:
        MetricInputError: shapes disagree, or Xc^T Yc = 0 (biased CKA is 0, no share).
    """
    sx, sy = _stats(x, "x"), _stats(y, "y")
    if sx.n != sy.n:
        raise MetricInputError(
            f"x and y must have the same number of rows (tokens): {sx.describe()} vs {sy.describe()}"
        )
    if sx.gram is not None and sy.gram is not None:
        total = torch.dot(sx.gram.reshape(-1), sy.gram.reshape(-1)) + torch.dot(sx.r, sy.r)
    else:
        c = sx.xc.T @ sy.xc
        total = torch.dot(c.reshape(-1), c.reshape(-1))
    return carried_share_of(sx, sy, total)


def carried_share_of(sx: CkaStats, sy: CkaStats, total: Tensor) -> float:
    """:func:`pc1_carried_share` given ||Xc^T Yc||_F^2 = tr(K~ L~) + r . s, known already."""
    px, py = _pc1(sx)[0], _pc1(sy)[0]
    if not float(total) > 0.0:
        raise MetricInputError(
            f"pc1_carried_share: Xc^T Yc is 0 for {sx.describe()} and {sy.describe()} "
            "(biased CKA = 0), so no share of it can be carried"
        )
    return min(1.0, float(torch.dot(px, py) ** 2 / total))
