"""Statistics the findings and the aggregation share: bootstrap, rank test, Gini, checks.

Pure numpy, no torch, no pytest. :mod:`~reasondiff.metrics.aggregate` (curves, tables)
and :mod:`~reasondiff.metrics.findings` (verdicts) both build on this module; neither
imports the other for its statistics.

- :func:`bootstrap_interval` (percentile bootstrap over traces) -> (mean, lo, hi)
- :func:`median_interval` (percentile bootstrap of a median) -> (lo, hi, draws)
- :func:`mann_whitney_greater` (one-sided rank test) -> :class:`RankTestResult`
- :func:`gini` and :func:`layer_shares` (how a total is shared out over layers)
- :func:`as_vector` (a finite 1-D curve, or an error naming the layer)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import MetricInputError
from .defaults import BOOTSTRAP

FloatArray = NDArray[np.float64]

__all__ = [
    "LayerShares",
    "RankTestResult",
    "as_vector",
    "bootstrap_interval",
    "gini",
    "layer_shares",
    "mann_whitney_greater",
    "median_interval",
]


def as_vector(values: ArrayLike, name: str, layers: Sequence[int] | None = None) -> FloatArray:
    """Validate a 1-D float curve; NaN/Inf is an error naming the layer it sits at."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise MetricInputError(f"{name}: expected a 1-D curve, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise MetricInputError(f"{name}: the curve is empty (no layers)")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        i = int(bad[0])
        where = f"layer {layers[i]}" if layers is not None else f"position {i}"
        raise MetricInputError(
            f"{name}: value at {where} is {arr[i]!r}; curves must be finite "
            f"({bad.size} non-finite value(s) in total)"
        )
    return arr


def bootstrap_interval(
    per_trace: ArrayLike,
    *,
    n_boot: int = BOOTSTRAP,
    level: float = 0.95,
    seed: int = 0,
    layers: Sequence[int] | None = None,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Mean over traces and a percentile bootstrap interval, per layer.

    ``per_trace`` is T x L (one row per trace). Each draw resamples whole traces with
    replacement -- the same traces for every layer, so the interval respects that one
    trace's layers move together. Deterministic for a given ``seed``. With T = 1 there is
    nothing to resample and lo = hi = mean. ``layers`` only names columns in errors.
    """
    arr = np.asarray(per_trace, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise MetricInputError(
            f"bootstrap: expected a non-empty traces x layers array, got shape {tuple(arr.shape)}"
        )
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
        t, c = (int(i) for i in bad[0])
        layer = layers[c] if layers is not None else c
        raise MetricInputError(
            f"bootstrap: value for trace #{t} at layer {layer} is {arr[t, c]!r}; values must be finite"
        )
    if not 0.0 < level < 1.0:
        raise MetricInputError(f"bootstrap: level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise MetricInputError(f"bootstrap: n_boot must be >= 1, got {n_boot}")
    mean = arr.mean(axis=0)
    n_traces = arr.shape[0]
    if n_traces == 1:
        return mean, mean.copy(), mean.copy()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_traces, size=(n_boot, n_traces))
    draws = arr[idx].mean(axis=1)  # n_boot x L
    alpha = (1.0 - level) / 2.0
    lo = np.quantile(draws, alpha, axis=0)
    hi = np.quantile(draws, 1.0 - alpha, axis=0)
    # Clip so that lo <= mean <= hi always holds (a constant column would otherwise
    # differ from its mean in the last bit; reports draw the mean inside the band).
    return mean, np.minimum(lo, mean), np.maximum(hi, mean)


def median_interval(
    x: FloatArray, *, n_boot: int, level: float, rng: np.random.Generator
) -> tuple[float, float, FloatArray]:
    """(lo, hi, draws): percentile bootstrap of the median over the entries of x."""
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    draws = np.median(x[idx], axis=1)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(draws, alpha)), float(np.quantile(draws, 1.0 - alpha)), draws


@dataclass(frozen=True)
class RankTestResult:
    """One-sided Mann-Whitney U test of "x tends to exceed y"."""

    u: float  # U statistic of x: #(x > y) + 0.5 #(x == y) over all pairs
    z: float
    p_value: float
    effect: float  # rank-biserial correlation = Cliff's delta = 2U/(n_x n_y) - 1
    n_x: int
    n_y: int


def _average_ranks(values: FloatArray) -> tuple[FloatArray, float]:
    """Ranks 1..n with ties sharing their average rank, and sum(t^3 - t) over tie groups."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    ranks = np.empty(values.size, dtype=np.float64)
    tie_term = 0.0
    i = 0
    while i < values.size:
        j = i
        while j + 1 < values.size and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        t = j - i + 1
        tie_term += float(t**3 - t)
        i = j + 1
    return ranks, tie_term


def mann_whitney_greater(x: Sequence[float], y: Sequence[float]) -> RankTestResult:
    """One-sided Mann-Whitney U test (alternative: x stochastically greater than y).

    Average ranks for ties; normal approximation with the tie-corrected variance
    ``n_x n_y / 12 * ((n + 1) - sum(t^3 - t) / (n (n - 1)))`` and a 0.5 continuity
    correction -- the same numbers as ``scipy.stats.mannwhitneyu(x, y,
    alternative="greater", method="asymptotic")``. With zero variance (all values tied)
    there is no evidence either way and p = 1.
    """
    xa = as_vector(x, "rank test, first sample")
    ya = as_vector(y, "rank test, second sample")
    nx, ny = xa.size, ya.size
    n = nx + ny
    ranks, tie_term = _average_ranks(np.concatenate([xa, ya]))
    u = float(ranks[:nx].sum() - nx * (nx + 1) / 2.0)
    mu = nx * ny / 2.0
    var = nx * ny / 12.0 * ((n + 1) - tie_term / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:
        z, p = 0.0, 1.0
    else:
        z = (u - mu - 0.5) / math.sqrt(var)
        p = 0.5 * math.erfc(z / math.sqrt(2.0))
    effect = 2.0 * u / (nx * ny) - 1.0
    return RankTestResult(u=u, z=z, p_value=p, effect=effect, n_x=nx, n_y=ny)


def gini(x: FloatArray) -> float:
    """Gini coefficient of non-negative values: 0 = even, (n-1)/n = all in one entry."""
    n = x.size
    if n == 0 or x.sum() == 0:
        return 0.0
    s = np.sort(x)
    idx = np.arange(1, n + 1, dtype=np.float64)
    return float((2.0 * np.sum(idx * s)) / (n * s.sum()) - (n + 1) / n)


@dataclass(frozen=True)
class LayerShares:
    """How non-negative per-layer totals are shared out: the localization index's numbers."""

    shares: tuple[float, ...]
    gini: float
    max_layer: int
    max_share_ratio: float  # largest share / the uniform share 1/L


def layer_shares(totals: FloatArray) -> LayerShares:
    """Shares = totals / their sum (which must be > 0), their Gini and the largest share."""
    shares = totals / totals.sum()
    k = int(np.argmax(shares))
    return LayerShares(
        shares=tuple(float(x) for x in shares),
        gini=gini(totals),
        max_layer=k,
        max_share_ratio=float(shares[k] * totals.size),
    )
