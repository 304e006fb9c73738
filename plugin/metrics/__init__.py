"""Pure metric functions: CKA, PCA views, dominant datapoints, massive activations, weights.

Tensors or numpy arrays in (N x D representations, N tokens), Python floats or tensors
out; no pytest, no I/O, no globals. Bad input raises
:class:`reasondiff.errors.MetricInputError` naming the argument, shape and problem.
Definitions follow docs METHODS.md §2-§7. ``findings`` (verdict math) and ``aggregate``
(curves over traces) are separate modules and are imported from there.

The names below are loaded lazily (PEP 562): importing ``reasondiff.metrics.findings``
or ``.aggregate`` (pure Python) must not import torch, so that ``--from-results`` replays a
bundle without torch.

To reuse one base representation across several descendants, build
:class:`CkaStats` once (see :mod:`reasondiff.metrics.prepared`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> submodule that defines it
_WHERE = {
    "median_pairwise_distance": "_median",
    "linear_cka": "cka",
    "linear_cka_features": "cka",
    "linear_cka_gram": "cka",
    "cka_without": "dominant",
    "dominant_datapoints": "dominant",
    "projection_norm_correlation": "dominant",
    "top_norm_overlap": "dominant",
    "hsic_biased": "hsic",
    "hsic_unbiased": "hsic",
    "MassiveActivations": "massive",
    "massive_activations": "massive",
    "pc1_carried_share": "pca",
    "pc1_projection": "pca",
    "pc1_share": "pca",
    "pca_form_cka": "pca",
    "pca_form_terms": "pca",
    "CkaStats": "prepared",
    "linear_cka_and_ablated": "prepared",
    "linear_cka_many": "prepared",
    "linear_cka_prepared": "prepared",
    "rbf_cka_prepared": "prepared",
    "rbf_cka": "rbf",
    "mean_abs_weight_diff": "weights",
    "normalized_weight_diff": "weights",
    "relative_weight_diff": "weights",
    "weight_diff_metrics": "weights",
}
__all__ = [
    "CkaStats",
    "MassiveActivations",
    "cka_without",
    "dominant_datapoints",
    "hsic_biased",
    "hsic_unbiased",
    "linear_cka",
    "linear_cka_and_ablated",
    "linear_cka_features",
    "linear_cka_gram",
    "linear_cka_many",
    "linear_cka_prepared",
    "massive_activations",
    "mean_abs_weight_diff",
    "median_pairwise_distance",
    "normalized_weight_diff",
    "pc1_carried_share",
    "pc1_projection",
    "pc1_share",
    "pca_form_cka",
    "pca_form_terms",
    "projection_norm_correlation",
    "rbf_cka",
    "rbf_cka_prepared",
    "relative_weight_diff",
    "top_norm_overlap",
    "weight_diff_metrics",
]

if TYPE_CHECKING:
    from ._median import median_pairwise_distance
    from .cka import linear_cka, linear_cka_features, linear_cka_gram
    from .dominant import (
        cka_without,
        dominant_datapoints,
        projection_norm_correlation,
        top_norm_overlap,
    )
    from .hsic import hsic_biased, hsic_unbiased
    from .massive import MassiveActivations, massive_activations
    from .pca import pc1_carried_share, pc1_projection, pc1_share, pca_form_cka, pca_form_terms
    from .prepared import (
        CkaStats,
        linear_cka_and_ablated,
        linear_cka_many,
        linear_cka_prepared,
        rbf_cka_prepared,
    )
    from .rbf import rbf_cka
    from .weights import (
        mean_abs_weight_diff,
        normalized_weight_diff,
        relative_weight_diff,
        weight_diff_metrics,
    )


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
