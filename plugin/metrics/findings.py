"""Verdict math for the finding tests (METHODS.md §8): curves in, small frozen results out.

Every public function is pure (no pytest, no I/O, no globals), takes its thresholds as
keyword arguments with documented defaults, and returns a frozen dataclass carrying the
numbers behind the verdict plus a one-line ``summary`` that explains it with those
numbers. The pytest layer turns a result into a :class:`reasondiff.records.Verdict`
(``observed`` = the result's boolean field, ``summary`` = its summary, ``details`` =
:func:`dataclasses.asdict` of the result).

Public API
----------
- :func:`detect_bathtub` (linear CKA over layers 1..L-1) -> :class:`BathtubResult`
- :func:`bathtub_explained` (bathtub in linear CKA, gone without U) -> :class:`ExplainedResult`
- :func:`final_layer_lowest` -> :class:`FinalLayerResult`;
  :func:`final_layer_summary` joins the post-norm and pre-norm results into one line
- :func:`localization` (share of the weight change per layer) -> :class:`LocalizationResult`
- :func:`sft_vs_rl` (per-descendant medians over matrices, ratio with bootstrap interval;
  RBF CKA and the pooled rank test reported beside it) -> :class:`SftVsRlResult`
- :func:`trace_invariance` (two curves agree within atol) -> :class:`InvarianceResult`

The statistics these verdicts use (:func:`bootstrap_interval`, :func:`mann_whitney_greater`,
the median interval, the Gini coefficient) live in :mod:`reasondiff.metrics.stats`; the
first two are re-exported here for callers of the old names.

Bad input (an empty curve, NaN, mismatched lengths) raises
:class:`reasondiff.errors.MetricInputError` naming the curve and the layer; a verdict is
never computed from NaN. Layers are the ``hidden_states`` indices 0..L (METHODS §1), so
the final layer L is the largest layer number in a curve unless ``num_layers`` says so.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import MetricInputError
from ..records import Curve
from .defaults import (
    BATHTUB_BAND,
    BATHTUB_DELTA,
    BOOTSTRAP,
    FINAL_LAYER_MARGIN,
    INVARIANCE_ATOL,
    LOCALIZATION_MAX_GINI,
    LOCALIZATION_MAX_SHARE,
    SFT_RL_RATIO,
)
from .stats import (
    FloatArray,
    RankTestResult,
    as_vector,
    bootstrap_interval,
    layer_shares,
    mann_whitney_greater,
    median_interval,
)

__all__ = [
    "BathtubResult",
    "DescendantChange",
    "ExplainedResult",
    "FinalLayerResult",
    "InvarianceResult",
    "LocalizationResult",
    "RankTestResult",
    "RatioResult",
    "SftVsRlResult",
    "bathtub_explained",
    "bootstrap_interval",
    "detect_bathtub",
    "final_layer_lowest",
    "final_layer_summary",
    "localization",
    "mann_whitney_greater",
    "sft_vs_rl",
    "trace_invariance",
]


# --------------------------------------------------------------------------- input checks
def _as_curve(
    values: ArrayLike, layers: Sequence[int], name: str
) -> tuple[FloatArray, NDArray[np.int64]]:
    """Check a (values, layers) pair: same length, finite values, distinct increasing layers."""
    lay = np.asarray(list(layers), dtype=np.int64)
    vals = np.asarray(values, dtype=np.float64)
    if vals.ndim != 1 or lay.ndim != 1 or vals.shape != lay.shape:
        raise MetricInputError(
            f"{name}: {vals.size} value(s) for {lay.size} layer(s); need one value per layer"
        )
    if lay.size and np.any(np.diff(lay) <= 0):
        i = int(np.flatnonzero(np.diff(lay) <= 0)[0])
        raise MetricInputError(
            f"{name}: layers must be strictly increasing, got layer {lay[i]} "
            f"followed by layer {lay[i + 1]}"
        )
    return as_vector(vals, name, [int(x) for x in lay]), lay


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


# --------------------------------------------------------------------------- bathtub
@dataclass(frozen=True)
class BathtubResult:
    """The judged middle-layer dip of a CKA curve and the numbers that decide it.

    ``bottom`` is the layer of the judged dip (the deepest dip whose bottom lies in the
    band; if none does, the deepest dip anywhere; if the curve has no dip at all, its
    lowest layer in 1..L-1). ``start`` is the first layer of the dip and ``recover`` the
    first layer after it that is back up (the half-depth rule of :func:`detect_bathtub`).
    ``depth = min(early, late) - bottom_value`` against the dip's own context.
    ``depth_lo`` / ``depth_hi`` bound it with the per-layer bootstrap interval when one
    was given. ``deepest_*`` locate the deepest dip regardless of the band (None / 0.0
    when there is none), so a dip outside the band -- the study's layer 4 of 28 for two
    Qwen-Math descendants -- is reported even when it is not a bathtub.
    """

    present: bool
    start: int | None
    bottom: int
    recover: int | None
    depth: float
    early: float | None
    late: float | None
    bottom_value: float
    position: float  # bottom / L, the fraction of depth the bottom sits at
    num_layers: int
    delta: float
    band: tuple[float, float]
    depth_lo: float | None
    depth_hi: float | None
    in_band: bool
    deepest_bottom: int | None
    deepest_depth: float
    summary: str


def _dip_depths(v: FloatArray) -> FloatArray:
    """Per index b: min(max before b, max after b) - v[b]; -inf at either end (no side)."""
    n = v.size
    depths = np.full(n, -np.inf)
    if n >= 3:
        early = np.maximum.accumulate(v)[:-2]  # max of v[:b] for b = 1..n-2
        late = np.maximum.accumulate(v[::-1])[::-1][2:]  # max of v[b+1:] for b = 1..n-2
        depths[1:-1] = np.minimum(early, late) - v[1:-1]
    return depths


def _dip_bottoms(depths: FloatArray) -> list[int]:
    """The bottom of each dip: per maximal run of indices with depth > 0, its deepest one.

    A run is one dip; its flanks are below both sides too, but they are not dips of
    their own (else the flank of a dip outside the band could pass for one inside).
    """
    out: list[int] = []
    i = 0
    while i < depths.size:
        if depths[i] > 0:
            j = i
            while j + 1 < depths.size and depths[j + 1] > 0:
                j += 1
            out.append(i + int(np.argmax(depths[i : j + 1])))
            i = j + 1
        else:
            i += 1
    return out


def _dip_run(v: FloatArray, b: int, depth: float) -> tuple[int, int | None]:
    """(first index, index after the run or None) of the layers below half depth around b."""
    level = v[b] + depth / 2
    i = b
    while i > 0 and v[i - 1] < level:
        i -= 1
    j = b
    while j < v.size - 1 and v[j + 1] < level:
        j += 1
    return i, (j + 1 if j + 1 < v.size else None)


def detect_bathtub(
    values: ArrayLike,
    layers: Sequence[int],
    *,
    delta: float = BATHTUB_DELTA,
    band: tuple[float, float] = BATHTUB_BAND,
    lo: ArrayLike | None = None,
    hi: ArrayLike | None = None,
    num_layers: int | None = None,
    metric: str = "linear CKA",
) -> BathtubResult:
    """Decide whether a per-layer CKA curve has a middle-layer "bathtub" (METHODS §8).

    Pass the full curve with its layer numbers (``hidden_states`` indices 0..L, L =
    ``num_layers`` or, by default, the largest layer given). Only layers 1..L-1 are
    considered: layer 0 is the embedding output and the final layer has its own finding
    (``final_layer_lowest``), so a final-layer drop is not a bathtub.

    Every layer b of 1..L-1 with layers on both sides is a candidate bottom, judged
    against its *own* context: ``early`` = the highest value before b, ``late`` = the
    highest value after b (both inside 1..L-1), ``depth = min(early, late) - value(b)``.
    A dip is a maximal run of layers with depth > 0, and its bottom the run's deepest
    layer (its flanks are not dips of their own). The global minimum of the curve plays
    no part, so a low last layer or a steady decline (no layer below both sides)
    neither makes a bathtub nor hides one in the middle. The judged dip is the deepest
    one whose bottom has b / L in ``band`` (inclusive; the first on ties). Present when
    its depth >= ``delta``. ``start`` .. ``recover`` is the contiguous run of layers around b below
    the half-depth level ``value(b) + depth / 2`` and the first layer after it.

    Defaults come from :mod:`reasondiff.metrics.defaults`, the same constants as the
    ``--bathtub-delta`` / ``--bathtub-band`` options. ``lo`` / ``hi`` (the bootstrap
    interval per layer, same layers as ``values``) give a conservative interval for the
    depth at the judged bottom: ``min(max lo before b, max lo after b) - hi(b)`` to
    ``min(max hi before, max hi after) - lo(b)``. Combining marginal bounds makes it
    wider than a joint bootstrap interval, never narrower.
    """
    vals, lay = _as_curve(values, layers, metric)
    lo_arr = _as_curve(lo, layers, f"{metric} (lower bound)")[0] if lo is not None else None
    hi_arr = _as_curve(hi, layers, f"{metric} (upper bound)")[0] if hi is not None else None
    if (lo_arr is None) != (hi_arr is None):
        raise MetricInputError(f"{metric}: give both lo and hi interval bounds, or neither")
    if not 0.0 <= band[0] <= band[1] <= 1.0:
        raise MetricInputError(f"bathtub band must satisfy 0 <= low <= high <= 1, got {band}")
    big_l = int(lay[-1]) if num_layers is None else int(num_layers)
    sel = np.flatnonzero((lay >= 1) & (lay <= big_l - 1))
    if sel.size < 3:
        raise MetricInputError(
            f"{metric}: a bathtub needs at least 3 layers in 1..L-1 (L = {big_l}); "
            f"got layers {[int(x) for x in lay]}"
        )
    v, ly = vals[sel], lay[sel]
    depths = _dip_depths(v)
    band_ok = (ly / big_l >= band[0]) & (ly / big_l <= band[1])
    bottoms = _dip_bottoms(depths)
    deepest = max(bottoms, key=lambda i: (depths[i], -i)) if bottoms else None
    band_bottoms = [i for i in bottoms if band_ok[i]]
    if band_bottoms:
        b = max(band_bottoms, key=lambda i: (depths[i], -i))
    elif deepest is not None:
        b = deepest
    else:
        b = int(np.argmin(v))  # no dip: only the lowest point, for the report
    bottom_layer, bottom_value = int(ly[b]), float(v[b])
    position = bottom_layer / big_l
    early = float(v[:b].max()) if b > 0 else None
    late = float(v[b + 1 :].max()) if b < v.size - 1 else None
    depth = max(float(depths[b]), 0.0) if early is not None and late is not None else 0.0
    bottom_in_band = bool(band_ok[b])
    present = bool(bottom_in_band and depth > 0 and depth >= delta)

    start = recover = None
    if depth > 0:
        i, j = _dip_run(v, b, depth)
        start = int(ly[i])
        recover = int(ly[j]) if j is not None else None

    depth_lo = depth_hi = None
    if lo_arr is not None and hi_arr is not None and 0 < b < v.size - 1:
        lo_s, hi_s = lo_arr[sel], hi_arr[sel]
        depth_lo = float(min(lo_s[:b].max(), lo_s[b + 1 :].max()) - hi_s[b])
        depth_hi = float(min(hi_s[:b].max(), hi_s[b + 1 :].max()) - lo_s[b])

    interval = (
        f" [interval {depth_lo:.3f}..{depth_hi:.3f}]"
        if depth_lo is not None and depth_hi is not None
        else ""
    )
    elsewhere = ""
    if deepest is not None and deepest != b:
        elsewhere = (
            f"; deepest dip anywhere bottoms at layer {int(ly[deepest])} "
            f"({_pct(int(ly[deepest]) / big_l)} deep, depth {float(depths[deepest]):.3f})"
        )
    if present:
        summary = (
            f"bathtub in {metric}: drops from {early:.3f} to {bottom_value:.3f} at layer "
            f"{bottom_layer} of {big_l}, dip layers {start}..{recover}, recovers to "
            f"{late:.3f}; depth {depth:.3f}{interval} >= delta {delta:g}{elsewhere}"
        )
    elif deepest is None:
        reasons = ["no layer in 1..L-1 lies below the highest values on both its sides"]
        if late is None:
            reasons.append("no recovery after the lowest point (a decline, not a dip)")
        summary = (
            f"no bathtub in {metric}: no dip; lowest {bottom_value:.3f} at layer "
            f"{bottom_layer} of {big_l}; " + "; ".join(reasons)
        )
    else:
        where = (
            f"deepest dip {'in the band ' if bottom_in_band else ''}bottoms at layer {bottom_layer} "
            f"of {big_l} ({_pct(position)} deep), {bottom_value:.3f}, dip layers "
            f"{start}..{recover}"
        )
        reasons = []
        if not bottom_in_band:
            reasons.append(f"outside the middle band {_pct(band[0])}-{_pct(band[1])}")
        if depth < delta:
            reasons.append(
                f"depth {depth:.3f}{interval} below min(early {early:.3f}, late {late:.3f}) "
                f"is under delta {delta:g}"
            )
        summary = f"no bathtub in {metric}: {where}; " + "; ".join(reasons) + elsewhere
    return BathtubResult(
        present=present,
        start=start,
        bottom=bottom_layer,
        recover=recover,
        depth=float(depth),
        early=early,
        late=late,
        bottom_value=bottom_value,
        position=position,
        num_layers=big_l,
        delta=delta,
        band=(float(band[0]), float(band[1])),
        depth_lo=depth_lo,
        depth_hi=depth_hi,
        in_band=bottom_in_band,
        deepest_bottom=int(ly[deepest]) if deepest is not None else None,
        deepest_depth=float(depths[deepest]) if deepest is not None else 0.0,
        summary=summary,
    )


@dataclass(frozen=True)
class ExplainedResult:
    """Is the bathtub carried by the dominant datapoints U (METHODS §5)?"""

    explained: bool
    linear_present: bool
    without_present: bool
    depth_linear: float
    depth_without: float
    summary: str


def _why_absent(r: BathtubResult) -> str:
    """Why the judged dip is not a bathtub, by the rule :func:`detect_bathtub` applies."""
    if r.depth <= 0:
        return f"no dip: lowest {r.bottom_value:.3f} at layer {r.bottom}"
    reasons = [] if r.in_band else [f"its bottom, layer {r.bottom}, lies outside the band"]
    if r.depth < r.delta:
        reasons.append(f"depth {r.depth:.3f} < delta {r.delta:g}")
    return "; ".join(reasons) or f"depth {r.depth:.3f} at layer {r.bottom}"


def bathtub_explained(linear: BathtubResult, without_dominant: BathtubResult) -> ExplainedResult:
    """Explained = a bathtub in linear CKA that is absent once the rows in U are removed.

    No bathtub in linear CKA means nothing to explain, so the finding does not hold.
    """
    explained = linear.present and not without_dominant.present
    if not linear.present:
        summary = f"nothing to explain: no bathtub in linear CKA ({_why_absent(linear)})"
    elif without_dominant.present:
        summary = (
            f"not explained: the bathtub (depth {linear.depth:.3f}) remains without the "
            f"dominant datapoints (depth {without_dominant.depth:.3f} at layer "
            f"{without_dominant.bottom})"
        )
    else:
        summary = (
            f"explained by dominant datapoints: depth {linear.depth:.3f} at layer "
            f"{linear.bottom} shrinks to {without_dominant.depth:.3f} without them "
            f"(< delta {without_dominant.delta:g})"
        )
    return ExplainedResult(
        explained=explained,
        linear_present=linear.present,
        without_present=without_dominant.present,
        depth_linear=linear.depth,
        depth_without=without_dominant.depth,
        summary=summary,
    )


# --------------------------------------------------------------------------- final layer
@dataclass(frozen=True)
class FinalLayerResult:
    """Whether the final layer's CKA is the lowest of layers 1..L, with the runner-up."""

    lowest: bool
    variant: str
    final_layer: int
    final_value: float
    runner_up_layer: int
    runner_up_value: float
    margin: float
    summary: str


def final_layer_lowest(
    values: ArrayLike,
    layers: Sequence[int],
    *,
    margin: float = FINAL_LAYER_MARGIN,
    variant: str = "post-norm",
) -> FinalLayerResult:
    """The last layer's CKA is below every other layer in 1..L by more than ``margin``.

    Layer 0 (embeddings) is left out: it is identical in most descendants and says
    nothing about the blocks. The comparison is strict and the default ``margin`` of 1e-6
    sits above float noise, so a flat curve (an unchanged copy, every layer 1.0 up to
    rounding) is *not* "final layer lowest". Call it once for the post-norm
    curve (layers 1..L) and once for the pre-norm one -- pass the curve with layer L
    replaced by the ``*_prenorm`` value and ``variant="pre-norm"`` -- and join both with
    :func:`final_layer_summary`.
    """
    vals, lay = _as_curve(values, layers, f"final-layer curve ({variant})")
    sel = np.flatnonzero(lay >= 1)
    if sel.size < 2:
        raise MetricInputError(
            f"final-layer curve ({variant}): needs at least 2 layers in 1..L, "
            f"got layers {[int(x) for x in lay]}"
        )
    v, ly = vals[sel], lay[sel]
    final_value = float(v[-1])
    r = int(np.argmin(v[:-1]))
    runner_layer, runner_value = int(ly[r]), float(v[r])
    lowest = bool(runner_value - final_value > margin)
    final_layer = int(ly[-1])
    if lowest:
        summary = (
            f"{variant}: final layer {final_layer} is the lowest, CKA {final_value:.4f} < "
            f"{runner_value:.4f} at layer {runner_layer} (next lowest)"
        )
    elif final_value < runner_value:
        summary = (
            f"{variant}: final layer {final_layer} CKA {final_value:.4f} is within margin "
            f"{margin:g} of layer {runner_layer} ({runner_value:.4f}), not clearly the lowest"
        )
    else:
        summary = (
            f"{variant}: final layer {final_layer} CKA {final_value:.4f} is not the lowest; "
            f"layer {runner_layer} has {runner_value:.4f}"
        )
    return FinalLayerResult(
        lowest=lowest,
        variant=variant,
        final_layer=final_layer,
        final_value=final_value,
        runner_up_layer=runner_layer,
        runner_up_value=runner_value,
        margin=margin,
        summary=summary,
    )


def final_layer_summary(post: FinalLayerResult, pre: FinalLayerResult | None = None) -> str:
    """One line for the verdict: post-norm first, then pre-norm, and whether they agree.

    Disagreement points at the final RMSNorm (a normalization effect rather than a change
    in the last block), which is why the report shows both.
    """
    if pre is None:
        return post.summary
    note = (
        "post- and pre-norm agree"
        if post.lowest == pre.lowest
        else "post- and pre-norm disagree: the final norm makes the difference"
    )
    return f"{post.summary}; {pre.summary}; {note}"


# --------------------------------------------------------------------------- localization
@dataclass(frozen=True)
class LocalizationResult:
    """How evenly the total normalized weight change spreads over decoder layers."""

    distributed: bool | None
    shares: tuple[float, ...]
    gini: float
    max_share: float
    max_layer: int
    max_share_ratio: float  # max share / uniform share (1/L)
    total: float
    max_gini: float
    max_share_ratio_limit: float
    summary: str


def localization(
    layer_totals: Sequence[float],
    *,
    max_gini: float = LOCALIZATION_MAX_GINI,
    max_share_ratio: float = LOCALIZATION_MAX_SHARE,
) -> LocalizationResult:
    """Is the weight change distributed over layers (METHODS §8, "weight distributed")?

    ``layer_totals[l]`` is decoder layer l's summed normalized difference over its
    components (``aggregate.weight_layer_totals``). Shares are totals / their sum; the
    Gini coefficient over layers measures inequality (0 = uniform, (L-1)/L = one layer
    carries everything) and the max share ratio compares the largest share with the
    uniform share 1/L. Distributed when gini <= ``max_gini`` and the ratio <=
    ``max_share_ratio``; with no change at all it is undecidable (``distributed=None``).
    """
    t = as_vector(layer_totals, "per-layer weight-change totals", list(range(len(layer_totals))))
    neg = np.flatnonzero(t < 0)
    if neg.size:
        i = int(neg[0])
        raise MetricInputError(
            f"per-block weight-change totals: block {i} is negative ({t[i]!r}); "
            "normalized differences are >= 0"
        )
    total = float(t.sum())
    n = t.size
    if total == 0.0:
        return LocalizationResult(
            distributed=None,
            shares=tuple(0.0 for _ in range(n)),
            gini=0.0,
            max_share=0.0,
            max_layer=0,
            max_share_ratio=0.0,
            total=0.0,
            max_gini=max_gini,
            max_share_ratio_limit=max_share_ratio,
            summary=f"no weight change: every one of {n} block total(s) is 0",
        )
    sh = layer_shares(t)
    k, g, ratio = sh.max_layer, sh.gini, sh.max_share_ratio
    distributed = bool(g <= max_gini and ratio <= max_share_ratio)
    verdict = "distributed" if distributed else "localized"
    summary = (
        f"weight change {verdict}: Gini {g:.3f} ({'<=' if g <= max_gini else '>'} "
        f"{max_gini:g}) over {n} decoder blocks; largest share {sh.shares[k]:.1%} at block {k} = "
        f"{ratio:.2f}x uniform ({'<=' if ratio <= max_share_ratio else '>'} {max_share_ratio:g}x)"
    )
    return LocalizationResult(
        distributed=distributed,
        shares=sh.shares,
        gini=g,
        max_share=sh.shares[k],
        max_layer=k,
        max_share_ratio=ratio,
        total=total,
        max_gini=max_gini,
        max_share_ratio_limit=max_share_ratio,
        summary=summary,
    )


# --------------------------------------------------------------------------- SFT vs RL
@dataclass(frozen=True)
class DescendantChange:
    """One descendant's weight change: the median normalized difference over its matrices.

    ``lo`` / ``hi``: percentile bootstrap interval of the median over its matrices.
    ``rbf_mean``: its mean RBF CKA over layers 1..L when CKA rows exist, else None.
    """

    descendant: str
    method: str
    median: float
    lo: float
    hi: float
    n_matrices: int
    rbf_mean: float | None


@dataclass(frozen=True)
class RatioResult:
    """SFT median / RL median for one (SFT, RL) pair of descendants, with its interval."""

    sft: str
    rl: str
    ratio: float
    lo: float
    hi: float


@dataclass(frozen=True)
class SftVsRlResult:
    """Group finding: SFT descendants changed their base more than RL descendants.

    ``holds`` is None (undecided, reported but never failed) when a side has no
    descendant. ``min_ratio`` / ``min_ratio_lo`` are the weakest pair's ratio and the
    smallest lower bound over all pairs. ``p_value`` / ``effect``: the pooled rank test
    over matrices, a descriptive figure only (it does not decide).
    """

    holds: bool | None
    n_sft: int
    n_rl: int
    descendants: tuple[DescendantChange, ...]
    ratios: tuple[RatioResult, ...]
    min_ratio: float | None
    min_ratio_lo: float | None
    ratio_threshold: float
    sft_median: float | None  # smallest SFT median
    rl_median: float | None  # largest RL median
    sft_rbf_mean: float | None
    rl_rbf_mean: float | None
    rbf_lower_for_sft: bool | None
    p_value: float | None
    effect: float | None
    summary: str


def _ratio(a: FloatArray, b: FloatArray) -> FloatArray:
    """a / b elementwise; x / 0 = inf for x > 0 and 0 / 0 = 1 (both unchanged: equal)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.divide(a, b)
    return np.where((a == 0) & (b == 0), 1.0, r)


def sft_vs_rl(
    sft: Mapping[str, Sequence[float]],
    rl: Mapping[str, Sequence[float]],
    *,
    ratio: float = SFT_RL_RATIO,
    sft_rbf: Mapping[str, float] | None = None,
    rl_rbf: Mapping[str, float] | None = None,
    n_boot: int = BOOTSTRAP,
    level: float = 0.95,
    seed: int = 0,
) -> SftVsRlResult:
    """Do the SFT descendants of one base change it more than its RL descendants?

    The unit of evidence is the descendant, not the matrix: the ~200 matrices of one
    model are not independent samples of a training method. ``sft`` / ``rl`` map each
    descendant to its per-matrix normalized differences (``aggregate.per_matrix_diffs``).
    Per descendant: the median over its matrices with a percentile bootstrap interval
    over matrices (``n_boot`` draws, seeded per descendant name, so the numbers do not
    depend on the order of the mapping). For every (SFT, RL) pair the ratio of medians
    gets an interval from the ratio of independent bootstrap draws.

    Holds when every ratio is >= ``ratio`` and every ratio's lower bound is > 1.
    Undecided (``holds=None``) when a side has no descendant. ``sft_rbf`` / ``rl_rbf``
    (descendant -> mean RBF CKA over layers 1..L) are reported beside the verdict and
    never needed for it. The pooled one-sided Mann-Whitney test over all matrices is
    reported as a descriptive figure only.
    """
    if not ratio > 0:
        raise MetricInputError(f"SFT vs RL: the ratio threshold must be > 0, got {ratio!r}")
    changes: dict[str, list[DescendantChange]] = {"SFT": [], "RL": []}
    draws: dict[str, FloatArray] = {}
    pooled: dict[str, list[float]] = {"SFT": [], "RL": []}
    for method, side, rbf in (("SFT", sft, sft_rbf), ("RL", rl, rl_rbf)):
        for name in sorted(side):
            x = as_vector(side[name], f"normalized diffs of {method} descendant {name!r}")
            rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
            lo, hi, d = median_interval(x, n_boot=n_boot, level=level, rng=rng)
            draws[name] = d
            pooled[method].extend(float(v) for v in x)
            rbf_of = None if rbf is None or name not in rbf else float(rbf[name])
            changes[method].append(
                DescendantChange(name, method, float(np.median(x)), lo, hi, int(x.size), rbf_of)
            )
    n_sft, n_rl = len(changes["SFT"]), len(changes["RL"])
    descendants = (*changes["SFT"], *changes["RL"])

    def rbf_mean(method: str) -> float | None:
        vals = [c.rbf_mean for c in changes[method] if c.rbf_mean is not None]
        return float(np.mean(vals)) if vals and len(vals) == len(changes[method]) else None

    s_rbf, r_rbf = rbf_mean("SFT"), rbf_mean("RL")
    rbf_lower = None if s_rbf is None or r_rbf is None else s_rbf < r_rbf
    if not n_sft or not n_rl:
        missing = " and ".join(m for m in ("SFT", "RL") if not changes[m])
        return SftVsRlResult(
            holds=None,
            n_sft=n_sft,
            n_rl=n_rl,
            descendants=descendants,
            ratios=(),
            min_ratio=None,
            min_ratio_lo=None,
            ratio_threshold=ratio,
            sft_median=None,
            rl_median=None,
            sft_rbf_mean=s_rbf,
            rl_rbf_mean=r_rbf,
            rbf_lower_for_sft=rbf_lower,
            p_value=None,
            effect=None,
            summary=(
                f"undecided: no {missing} descendant of this base among the selected pairs "
                f"({n_sft} SFT, {n_rl} RL)"
            ),
        )
    alpha = (1.0 - level) / 2.0
    ratios = []
    for s in changes["SFT"]:
        for r in changes["RL"]:
            rd = _ratio(draws[s.descendant], draws[r.descendant])
            point = float(_ratio(np.array([s.median]), np.array([r.median]))[0])
            ratios.append(
                RatioResult(
                    sft=s.descendant,
                    rl=r.descendant,
                    ratio=point,
                    lo=float(np.quantile(rd, alpha)),
                    hi=float(np.quantile(rd, 1.0 - alpha)),
                )
            )
    weakest = min(ratios, key=lambda q: q.ratio)
    min_lo = min(q.lo for q in ratios)
    holds = bool(weakest.ratio >= ratio and min_lo > 1.0)
    test = mann_whitney_greater(pooled["SFT"], pooled["RL"])

    def side_text(method: str) -> str:
        return ", ".join(
            f"{c.descendant} {c.median:.4g} [{c.lo:.4g}..{c.hi:.4g}]" for c in changes[method]
        )

    rbf_text = (
        f"; mean RBF CKA SFT {s_rbf:.3f} {'<' if rbf_lower else '>='} RL {r_rbf:.3f} (reported)"
        if s_rbf is not None and r_rbf is not None
        else "; RBF CKA not available (weights only)"
    )
    summary = (
        f"SFT {'changes more' if holds else 'does not clearly change more'} than RL: median "
        f"normalized diff per descendant, SFT {side_text('SFT')}; RL {side_text('RL')}; "
        f"weakest ratio {weakest.ratio:.3g} ({weakest.sft} / {weakest.rl}) "
        f"{'>=' if weakest.ratio >= ratio else '<'} {ratio:g}, smallest interval lower bound "
        f"{min_lo:.3g} {'>' if min_lo > 1.0 else '<='} 1{rbf_text}; pooled matrices (descriptive): "
        f"Mann-Whitney p={test.p_value:.2g}, Cliff's delta {test.effect:+.2f}"
    )
    return SftVsRlResult(
        holds=holds,
        n_sft=n_sft,
        n_rl=n_rl,
        descendants=descendants,
        ratios=tuple(ratios),
        min_ratio=weakest.ratio,
        min_ratio_lo=min_lo,
        ratio_threshold=ratio,
        sft_median=min(c.median for c in changes["SFT"]),
        rl_median=max(c.median for c in changes["RL"]),
        sft_rbf_mean=s_rbf,
        rl_rbf_mean=r_rbf,
        rbf_lower_for_sft=rbf_lower,
        p_value=test.p_value,
        effect=test.effect,
        summary=summary,
    )


# --------------------------------------------------------------------------- trace invariance
@dataclass(frozen=True)
class InvarianceResult:
    """Largest per-layer gap between the curves of two trace sets."""

    invariant: bool
    max_abs_diff: float
    layer: int
    atol: float
    diffs: tuple[float, ...]
    layers: tuple[int, ...]
    summary: str


def _curve_parts(curve: Curve | Sequence[float], name: str) -> tuple[list[int] | None, FloatArray]:
    if isinstance(curve, Curve):
        vals, _ = _as_curve(curve.mean, curve.layers, f"{name} ({curve.metric})")
        return list(curve.layers), vals
    return None, as_vector(curve, name)


def trace_invariance(
    curve_a: Curve | Sequence[float],
    curve_b: Curve | Sequence[float],
    *,
    atol: float = INVARIANCE_ATOL,
    names: tuple[str, str] = ("trace set A", "trace set B"),
) -> InvarianceResult:
    """Curves from two trace sets agree when max_l |a_l - b_l| <= ``atol``.

    Accepts :class:`~reasondiff.records.Curve` s (compared on their means, layers must be
    the same) or plain per-layer sequences (layers 0..n-1).
    """
    la, a = _curve_parts(curve_a, names[0])
    lb, b = _curve_parts(curve_b, names[1])
    layers = la if la is not None else lb if lb is not None else list(range(a.size))
    if (la is not None and lb is not None and la != lb) or a.size != b.size:
        raise MetricInputError(
            f"trace invariance: {names[0]} has layers {la if la is not None else a.size} "
            f"but {names[1]} has {lb if lb is not None else b.size}; curves must cover the same layers"
        )
    diffs = np.abs(a - b)
    k = int(np.argmax(diffs))
    mx = float(diffs[k])
    invariant = mx <= atol
    summary = (
        f"{names[0]} vs {names[1]}: max |diff| {mx:.4f} at layer {layers[k]} "
        f"({'<=' if invariant else '>'} atol {atol:g}) over {a.size} layers"
    )
    return InvarianceResult(
        invariant=invariant,
        max_abs_diff=mx,
        layer=int(layers[k]),
        atol=atol,
        diffs=tuple(float(d) for d in diffs),
        layers=tuple(int(x) for x in layers),
        summary=summary,
    )
