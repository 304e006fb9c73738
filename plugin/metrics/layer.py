"""Every CKA metric and diagnostic of one layer of one trace, base prepared once (METHODS §2-§6, §11).

A base with k descendants is compared k times per (trace, layer). Everything that
depends on the base alone - its centred matrix, Gram matrix, RBF kernel and bandwidth,
HSIC(K, K), PC1 projection, massive activations and per-side diagnostics - is computed
once in :func:`prepare_base_layer`; :func:`score_layer` then costs one Gram matrix, one
kernel and the cross terms per descendant. Tensors stay on the device they come on
(float64 for Grams and HSIC: massive activations of ~1e4 cancel catastrophically in
float32).

``form`` chooses how the statistics are held: ``"auto"`` (the CPU choice: the feature
form X^T Y when N > D, no N x N matrix) or ``"gram"`` (the GPU choice: N x N Grams, so the
base's RBF kernel is built once and every descendant's kernel comes from its own Gram
without a second O(N^2 D) product). Both give the same values to float64 round-off
(tests compare them at 1e-9 on data with massive activations).

Pure: tensors in, plain dicts out. No pytest, no I/O, no models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..records import CKA_METRICS, DIAGNOSTIC_METRICS
from ._validate import Matrix
from .dominant import dominant_datapoints, projection_norm_correlation, top_norm_overlap
from .massive import MassiveActivations, massive_activations
from .pca import pc1_carried_share, pc1_share
from .prepared import CkaStats, linear_cka_and_ablated, rbf_cka_prepared

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
    use_gram = form == "gram" and int(x.shape[0]) <= GRAM_ROWS_MAX
    stats = CkaStats.from_matrix(x, name=name, form="gram" if use_gram else "auto")
    return PreparedSide(
        stats=stats,
        massive=massive_activations(x),
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
    rbf_median: Literal["offdiag", "all"] = "offdiag",
    form: Form = "auto",
) -> dict[str, Any]:
    """All metrics of one (pair, trace, layer) as a JSON-able cache entry.

    Returns ``{"metrics": {name: float}, "massive": {"base": [positions, max_abs],
    "descendant": [...]}}``; the metric names are :data:`LAYER_METRICS`.
    """
    side = (
        y
        if isinstance(y, PreparedSide)
        else prepare_side(y, name=name, k=k, form="gram" if base.stats.gram is not None else form)
    )
    sx, sy = base.stats, side.stats
    u = dominant_datapoints(sx, sy, k=k)
    linear, without = linear_cka_and_ablated(sx, sy, u)
    values: dict[str, float] = {
        "linear": linear,
        "rbf": rbf_cka_prepared(sx, sy, median=rbf_median),
        "linear_without_dominant": without,
        "pc1_share_base": base.pc1_share,
        "pc1_share_descendant": side.pc1_share,
        "pc1_carried": pc1_carried_share(sx, sy),
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
    }


def score_pair_layer(
    x: Matrix,
    y: Matrix,
    *,
    k: int,
    names: tuple[str, str] = ("base", "descendant"),
    rbf_median: Literal["offdiag", "all"] = "offdiag",
    form: Form = "auto",
) -> dict[str, Any]:
    """:func:`score_layer` for a single pair (nothing shared): the one-shot form."""
    base = prepare_base_layer(x, name=names[0], k=k, form=form)
    return score_layer(base, y, k=k, name=names[1], rbf_median=rbf_median, form=form)
