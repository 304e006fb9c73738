"""Bad input: every public metric raises MetricInputError (a ValueError) saying what is wrong."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from reasondiff import metrics as m
from reasondiff.errors import MetricInputError

RNG = np.random.default_rng(0)
X = RNG.standard_normal((20, 5))
Y = RNG.standard_normal((20, 3))
NAN = X.copy()
NAN[3, 2] = np.nan
NAN[4, 0] = np.inf
CONST = np.ones((20, 5))
SHORT = X[:19]
CUBE = np.zeros((2, 3, 4))
TINY = X[:3]

PAIR_FUNCS: dict[str, Callable[..., Any]] = {
    "linear_cka": m.linear_cka,
    "linear_cka_gram": m.linear_cka_gram,
    "linear_cka_features": m.linear_cka_features,
    "rbf_cka": m.rbf_cka,
    "pca_form_cka": m.pca_form_cka,
    "pc1_carried_share": m.pc1_carried_share,
    "dominant_datapoints": lambda x, y: m.dominant_datapoints(x, y, k=2),
    "cka_without": lambda x, y: m.cka_without(x, y, [0]),
    "linear_cka_prepared": m.linear_cka_prepared,
    "rbf_cka_prepared": m.rbf_cka_prepared,
    "linear_cka_many": lambda x, y: m.linear_cka_many(x, [y]),
}
SINGLE_FUNCS: dict[str, Callable[..., Any]] = {
    "pc1_projection": m.pc1_projection,
    "pc1_share": m.pc1_share,
    "top_norm_overlap": lambda x: m.top_norm_overlap(x, k=2),
    "projection_norm_correlation": m.projection_norm_correlation,
    "median_pairwise_distance": m.median_pairwise_distance,
    "CkaStats.from_matrix": m.CkaStats.from_matrix,
}
BAD_PAIRS = {
    "mismatched_n": (X, SHORT, "same number of rows"),
    "not_2d": (CUBE, Y, "must be 2-D"),
    "nan": (NAN, Y, "2 non-finite value(s) (NaN/Inf); first at row 3, col 2"),
    "constant": (X, CONST[:, :3], "zero variance"),
    "list_input": (X.tolist(), Y, "must be a torch.Tensor or numpy.ndarray"),
}


@pytest.mark.parametrize("func", PAIR_FUNCS.values(), ids=list(PAIR_FUNCS))
@pytest.mark.parametrize(("x", "y", "fragment"), BAD_PAIRS.values(), ids=list(BAD_PAIRS))
def test_pair_functions_reject_bad_input(
    func: Callable[..., Any], x: Any, y: Any, fragment: str
) -> None:
    with pytest.raises(MetricInputError) as info:
        func(x, y)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("func", SINGLE_FUNCS.values(), ids=list(SINGLE_FUNCS))
@pytest.mark.parametrize(
    ("x", "fragment"),
    [(CUBE, "got shape (2, 3, 4)"), (NAN, "first at row 3"), (np.zeros((20, 0)), "no features")],
    ids=["not_2d", "nan", "no_features"],
)
def test_single_functions_reject_bad_input(func: Callable[..., Any], x: Any, fragment: str) -> None:
    with pytest.raises(MetricInputError, match=None) as info:
        func(x)
    assert fragment in str(info.value)


def test_too_few_rows_for_unbiased_estimator() -> None:
    with pytest.raises(MetricInputError, match=r"N=3 rows \(shape \(3, 5\)\).*N >= 4"):
        m.linear_cka(TINY, TINY)
    assert m.linear_cka(TINY, TINY[:, ::-1], debiased=False) == pytest.approx(1.0)


ARG_CASES: dict[str, tuple[Callable[[], Any], str]] = {
    "form": (lambda: m.linear_cka(X, Y, form="dense"), "form must be"),  # type: ignore[arg-type]
    "scale": (lambda: m.rbf_cka(X, Y, scale=0.0), "scale must be a positive"),
    "median_name": (lambda: m.rbf_cka(X, Y, median="mean"), "median must be"),  # type: ignore[arg-type]
    "chunk_size": (lambda: m.rbf_cka(X, Y, chunk_size=0), "chunk_size must be"),
    "zero_bandwidth": (
        lambda: m.rbf_cka(np.vstack([np.repeat(X[:1], 18, 0), X[1:3]]), Y),
        "median pairwise distance (offdiag) is 0",
    ),
    "k_zero": (lambda: m.dominant_datapoints(X, Y, k=0), "k=0 must be in [1, N]"),
    "k_too_big": (lambda: m.dominant_datapoints(X, Y, k=21), "k=21 must be in [1, N]"),
    "dup_index": (lambda: m.cka_without(X, Y, [0, 0]), "1 duplicate index"),
    "index_too_big": (lambda: m.cka_without(X, Y, [25]), "outside [0, 20)"),
    "negative_index": (lambda: m.cka_without(X, Y, [-1]), "outside [0, 20)"),
    "float_index": (lambda: m.cka_without(X, Y, [0.5]), "integer row indices"),
    "bool_mask": (lambda: m.cka_without(X, Y, np.ones(20, bool)), "boolean mask is not accepted"),
    "index_2d": (lambda: m.cka_without(X, Y, [[0, 1]]), "1-D index vector"),
    "kernel": (lambda: m.cka_without(X, Y, [0], kernel="cosine"), "kernel must be"),  # type: ignore[arg-type]
    "proj_idx_len": (lambda: m.top_norm_overlap(X, [0, 1], k=3), "expected k=3"),
    "hsic_small_n": (lambda: m.hsic_unbiased(torch.eye(3), torch.eye(3)), "N >= 4"),
    "hsic_shapes": (lambda: m.hsic_unbiased(torch.eye(4), torch.eye(5)), "same shape"),
    "hsic_not_square": (
        lambda: m.hsic_unbiased(torch.ones(4, 3), torch.ones(4, 3)),
        "square N x N",
    ),
    "hsic_biased_shapes": (lambda: m.hsic_biased(torch.eye(4), torch.eye(5)), "same shape"),
    "massive_3d": (lambda: m.massive_activations(CUBE), "must be 2-D"),
    "massive_nan": (lambda: m.massive_activations(NAN), "non-finite"),
    "massive_threshold": (lambda: m.massive_activations(X, threshold=-1.0), "threshold must be"),
    "massive_ratio": (lambda: m.massive_activations(X, ratio=float("nan")), "ratio must be"),
    "weights_shape": (lambda: m.weight_diff_metrics(X, Y), "same shape: a (20, 5) vs b (20, 3)"),
    "weights_empty": (lambda: m.weight_diff_metrics(np.zeros(0), np.zeros(0)), "empty"),
    "weights_nan_a": (
        lambda: m.weight_diff_metrics(NAN, X),
        "a (shape (20, 5)) has 2 non-finite value(s); first at index (3, 2)",
    ),
    "weights_nan_b": (lambda: m.weight_diff_metrics(X, NAN), "b (shape (20, 5))"),
    "weights_chunk": (lambda: m.weight_diff_metrics(X, X, chunk_elems=0), "chunk_elems must be"),
    "normalized_shape": (lambda: m.normalized_weight_diff(X, X[:, :2]), "same shape"),
    "relative_type": (lambda: m.relative_weight_diff(X, "w"), "must be a torch.Tensor"),
    "mean_abs_bool": (lambda: m.mean_abs_weight_diff(X, X.astype(bool)), "dtype bool"),
    "complex": (lambda: m.linear_cka(X.astype(complex), X), "complex"),
    "carried_constant": (
        lambda: m.pc1_carried_share(X[:, :1] * 0 + np.arange(20)[:, None], X[:, :1] * 0),
        "zero variance",
    ),
}


@pytest.mark.parametrize(("call", "fragment"), ARG_CASES.values(), ids=list(ARG_CASES))
def test_argument_errors(call: Callable[[], Any], fragment: str) -> None:
    with pytest.raises(MetricInputError) as info:
        call()
    assert fragment in str(info.value)


@pytest.mark.parametrize("n", [4, 5, 9])
def test_undefined_cka_is_an_error_not_nan(n: int) -> None:
    # every token identical but one: the unbiased estimator sees no variation at all
    x = np.zeros((n, 2))
    x[-1] = [3.0, -1.0]
    for func in (m.linear_cka_features, m.linear_cka_gram, m.linear_cka_prepared):
        with pytest.raises(MetricInputError, match="CKA is undefined"):
            func(x, X[:n])
    assert np.isfinite(m.linear_cka(x, X[:n], debiased=False))  # the biased one is defined
