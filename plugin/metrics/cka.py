"""Linear CKA with the unbiased HSIC estimator (METHODS.md §2), in Gram and feature form.

- :func:`linear_cka` (``form="auto" | "gram" | "features"``), with the two forms also
  exposed as :func:`linear_cka_gram` (chunked Gram rows, O(N^2 D), memory O(chunk x N))
  and :func:`linear_cka_features` (one D_x x D_y product, O(N D_x D_y), no N x N matrix).

Not here (each has its module; ``reasondiff.metrics`` exports them all): the HSIC term
machinery (:mod:`.hsic`), RBF kernels (:mod:`.rbf`), medians (:mod:`._median`),
prepared statistics reused across pairs (:mod:`.prepared`).
"""

from __future__ import annotations

from ..errors import MetricInputError
from ._validate import Matrix, as_pair, shape_str
from .hsic import (
    Form,
    _center,
    _chunk,
    _cka_from_terms,
    _feature_terms,
    _gram_terms,
    _min_rows,
)

__all__ = ["linear_cka", "linear_cka_features", "linear_cka_gram"]


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
