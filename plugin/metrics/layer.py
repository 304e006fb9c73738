"""Every CKA metric and diagnostic of one layer of one trace, base prepared once (METHODS §2-§6, §11).

A base with k descendants is compared k times per (trace, layer). Everything that
depends on the base alone - its centred matrix, Gram matrix, RBF kernel and bandwidth,
HSIC(K, K), PC1 projection, massive activations and per-side diagnostics - is computed
once in :func:`prepare_base_layer`; :func:`score_layer` then costs one Gram matrix, one
kernel and the cross terms per descendant. Tensors stay on the device they come on
(float64 for Grams and HSIC: massive activations of ~1e4 cancel catastrophically in
float32).

Up to :data:`GRAM_ROWS_MAX` tokens both sides hold their N x N Gram matrix, whatever
``form`` says, on CPU and CUDA alike: the RBF kernel needs the descendant's squared
distances, i.e. its Gram, anyway, so that one O(N^2 D) product is all a descendant
costs, and the O(N^2) rest runs in cache-sized passes (:mod:`.fused`). Beyond
:data:`GRAM_ROWS_MAX`, ``form="auto"`` keeps the feature form X^T Y (no N x N matrix).
The Gram form sums the off-diagonal terms directly; the feature form subtracts the
diagonal mass, so the two agree to the round-off that cancellation allows (tests
compare them at 1e-9 on data with massive activations).

Pure: tensors in, plain dicts out. No pytest, no I/O, no models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..records import CKA_METRICS, DIAGNOSTIC_METRICS
from ._validate import Matrix, as_matrix
from .defaults import MASSIVE_RATIO, MASSIVE_THRESHOLD, RBF_MEDIAN
from .dominant import (
    _top,
    dominant_datapoints,
    projection_norm_correlation,
    top_norm_overlap,
)
from .fused import score_fused
from .massive import MassiveActivations, massive_of_checked
from .pca import carried_share_of, pc1_carried_share, pc1_projection, pc1_share
from .prepared import CkaStats, _checked_drop, linear_cka_and_ablated, rbf_cka_prepared

Form = Literal["auto", "gram"]

#: The per-layer metric names, in the order they are stored (cache entries, bundles):
#: the three CKA curves (their ``*_prenorm`` forms are added at the last layer) and the
#: diagnostics, as :mod:`reasondiff.records` defines them.
LAYER_METRICS = (*CKA_METRICS[:3], *DIAGNOSTIC_METRICS)


#: Largest N held as N x N Gram matrices under ``form="gram"`` (5 x 512 MiB float64 at 8192).
GRAM_ROWS_MAX = 8192


@dataclass
class PreparedSide:
    """One representation's statistics plus its side-only diagnostics (computed once)."""

    stats: CkaStats
    massive: MassiveActivations
    pc1_share: float
    top_norm_overlap: float
    proj_norm_corr: float


def prepare_side(x: Matrix, *, name: str, k: int, form: Form = "auto") -> PreparedSide:
    """Statistics and side-only diagnostics of one N x D representation.

    ``x`` may be in any floating dtype on any device: the massive-activation search runs
    in that dtype (|a| is exact there), the CKA statistics in float64 on the same device.
    """
    use_gram = form in ("auto", "gram") and int(x.shape[0]) <= GRAM_ROWS_MAX
    xt = as_matrix(x, name, dtype=None)  # validated once for every statistic below
    stats = CkaStats.from_matrix(
        xt.to(torch.float64), name=name, form="gram" if use_gram else "auto", checked=True
    )
    return PreparedSide(
        stats=stats,
        massive=massive_of_checked(xt, MASSIVE_THRESHOLD, MASSIVE_RATIO),
        pc1_share=pc1_share(stats),
        top_norm_overlap=top_norm_overlap(stats, k=k),
        proj_norm_corr=projection_norm_correlation(stats),
    )


def prepare_base_layer(x: Matrix, *, name: str, k: int, form: Form = "auto") -> PreparedSide:
    """The base side of a (trace, layer): shared by every descendant of that base."""
    return prepare_side(x, name=name, k=k, form=form)


def score_layer(
    base: PreparedSide,
    y: Matrix | PreparedSide,
    *,
    k: int,
    name: str = "descendant",
    rbf_median: Literal["offdiag", "all"] = RBF_MEDIAN,
    form: Form = "auto",
) -> dict[str, Any]:
    """All metrics of one (pair, trace, layer) as a JSON-able cache entry.

    Returns ``{"metrics": {name: float}, "massive": {"base": [positions, max_abs],
    "descendant": [...]}, "dominant": {"base": [[position, |pc1 projection|], ...],
    "descendant": [...]}}``; the metric names are :data:`LAYER_METRICS`, and each
    side's ``dominant`` list is its top-k tokens by |PC1 projection|, largest first.
    """
    side = (
        y
        if isinstance(y, PreparedSide)
        else prepare_side(y, name=name, k=k, form="gram" if base.stats.gram is not None else form)
    )
    sx, sy = base.stats, side.stats
    u = dominant_datapoints(sx, sy, k=k)
    if sx.gram is not None and sy.gram is not None:
        drop = _checked_drop(u, sx.n, True)
        assert drop is not None
        fused = score_fused(sx, sy, drop, median=rbf_median)
        linear, without, rbf = fused.linear, fused.linear_without, fused.rbf
        carried = carried_share_of(sx, sy, fused.t_xy + torch.dot(sx.r, sy.r))
    else:
        linear, without = linear_cka_and_ablated(sx, sy, u)
        rbf = rbf_cka_prepared(sx, sy, median=rbf_median)
        carried = pc1_carried_share(sx, sy)
    values: dict[str, float] = {
        "linear": linear,
        "rbf": rbf,
        "linear_without_dominant": without,
        "pc1_share_base": base.pc1_share,
        "pc1_share_descendant": side.pc1_share,
        "pc1_carried": carried,
        "dominant_count": int(u.numel()),
        "top_norm_overlap_base": base.top_norm_overlap,
        "top_norm_overlap_descendant": side.top_norm_overlap,
        "proj_norm_corr_base": base.proj_norm_corr,
        "proj_norm_corr_descendant": side.proj_norm_corr,
        "massive_count_base": len(base.massive.positions),
        "massive_count_descendant": len(side.massive.positions),
    }
    return {
        "metrics": {m: float(values[m]) for m in LAYER_METRICS},
        "massive": {
            "base": [list(base.massive.positions), float(base.massive.max_abs)],
            "descendant": [list(side.massive.positions), float(side.massive.max_abs)],
        },
        "dominant": {"base": top_tokens(sx, k), "descendant": top_tokens(sy, k)},
    }


def top_tokens(stats: CkaStats, k: int) -> list[list[float]]:
    """[[position, |PC1 projection|], ...] of the k tokens with the largest |projection|,
    largest first (ties by position), as :func:`~.dominant.dominant_datapoints` ranks them."""
    p = pc1_projection(stats)
    return [[int(i), float(p[i])] for i in _top(p, min(k, stats.n)).tolist()]


def score_pair_layer(
    x: Matrix,
    y: Matrix,
    *,
    k: int,
    names: tuple[str, str] = ("base", "descendant"),
    rbf_median: Literal["offdiag", "all"] = RBF_MEDIAN,
    form: Form = "auto",
) -> dict[str, Any]:
    """:func:`score_layer` for a single pair (nothing shared): the one-shot form."""
    base = prepare_base_layer(x, name=names[0], k=k, form=form)
    return score_layer(base, y, k=k, name=names[1], rbf_median=rbf_median, form=form)
