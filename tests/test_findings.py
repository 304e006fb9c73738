"""Verdict math of the finding tests (reasondiff.metrics.findings)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from reasondiff.errors import MetricInputError
from reasondiff.metrics.findings import (
    bathtub_explained,
    bootstrap_interval,
    detect_bathtub,
    final_layer_lowest,
    final_layer_summary,
    localization,
    mann_whitney_greater,
    sft_vs_rl,
    trace_invariance,
)
from reasondiff.records import Curve

LAYERS = list(range(11))  # hidden_states 0..10 of a 10-block model
# The planted toy bathtub (METHODS §10): write at block 4, erase at block 7.
PLANTED = [1.0, 1.0, 1.0, 0.999, 0.012, 0.006, 0.008, 0.997, 0.998, 0.999, 0.97]


# --------------------------------------------------------------------------- bathtub
def test_planted_bathtub_is_found_with_its_layers() -> None:
    r = detect_bathtub(PLANTED, LAYERS)
    assert r.present
    assert (r.start, r.bottom, r.recover) == (4, 5, 7)
    assert r.early == pytest.approx(1.0)
    assert r.late == pytest.approx(0.999)
    assert r.depth == pytest.approx(0.999 - 0.006)
    assert r.num_layers == 10 and r.position == pytest.approx(0.5)
    assert "layer 5 of 10" in r.summary and "4..7" in r.summary


def test_flat_curve_has_no_bathtub() -> None:
    r = detect_bathtub([1.0] * 11, LAYERS)
    assert not r.present
    assert r.depth == 0.0
    assert r.start is None and r.recover is None
    assert r.summary.startswith("no bathtub")


def test_shallow_dip_below_delta_is_not_a_bathtub() -> None:
    curve = [1.0, 1.0, 1.0, 0.95, 0.92, 0.95, 1.0, 1.0, 1.0, 1.0, 1.0]
    r = detect_bathtub(curve, LAYERS, delta=0.1)
    assert not r.present
    assert r.depth == pytest.approx(0.08)
    assert "under delta 0.1" in r.summary
    assert detect_bathtub(curve, LAYERS, delta=0.05).present


def test_drop_must_be_below_both_sides() -> None:
    # Deep drop from the early level but hardly any recovery: min(early, late) decides.
    curve = [1.0, 1.0, 1.0, 0.6, 0.5, 0.52, 0.55, 0.56, 0.57, 0.58, 0.5]
    r = detect_bathtub(curve, LAYERS)
    assert not r.present
    assert r.late == pytest.approx(0.58) and r.depth == pytest.approx(0.08)


def test_minimum_outside_middle_band_is_not_a_bathtub() -> None:
    curve = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.3, 1.0, 1.0]  # bottom at 8/10 = 80%
    assert detect_bathtub(curve, LAYERS).present
    r = detect_bathtub(curve, LAYERS, band=(0.15, 0.75))
    assert not r.present
    assert "outside the middle band 15%-75%" in r.summary


def test_monotone_decline_without_recovery() -> None:
    curve = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5]
    r = detect_bathtub(curve, LAYERS)
    assert not r.present
    assert r.bottom == 9 and r.late is None
    assert "no recovery" in r.summary


def test_layer_zero_and_final_layer_are_excluded() -> None:
    # A low embedding layer and a low final layer must not create or hide a bathtub.
    curve = [0.1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.1]
    r = detect_bathtub(curve, LAYERS)
    assert not r.present
    assert r.bottom_value == pytest.approx(1.0)


def test_bathtub_on_a_layer_subset_uses_layer_numbers() -> None:
    layers = list(range(0, 29, 2))  # --layers every other one of 28
    vals = [1.0 if not 12 <= lay <= 20 else 0.3 for lay in layers]
    r = detect_bathtub(vals, layers)
    assert r.present and (r.start, r.bottom, r.recover) == (12, 12, 22)
    assert r.num_layers == 28
    assert detect_bathtub(vals, layers, num_layers=40).position == pytest.approx(12 / 40)


def test_depth_interval_is_conservative() -> None:
    rng = np.random.default_rng(1)
    lo = np.array(PLANTED) - rng.uniform(0.0, 0.02, 11)
    hi = np.array(PLANTED) + rng.uniform(0.0, 0.02, 11)
    r = detect_bathtub(PLANTED, LAYERS, lo=lo, hi=hi)
    assert r.depth_lo is not None and r.depth_hi is not None
    sel = slice(1, 10)
    b = 5 - 1  # index of layer 5 inside layers 1..9
    lo_s, hi_s = lo[sel], hi[sel]
    assert r.depth_lo == pytest.approx(min(lo_s[:b].max(), lo_s[b + 1 :].max()) - hi_s[b])
    assert r.depth_hi == pytest.approx(min(hi_s[:b].max(), hi_s[b + 1 :].max()) - lo_s[b])
    assert r.depth_lo <= r.depth <= r.depth_hi
    assert "interval" in r.summary
    with pytest.raises(MetricInputError, match="both lo and hi"):
        detect_bathtub(PLANTED, LAYERS, lo=lo)


@pytest.mark.parametrize(
    ("values", "layers", "match"),
    [
        ([], [], "empty"),
        ([1.0, 0.5], [0, 1, 2], "2 value"),
        ([1.0, 1.0, math.nan, 1.0, 1.0], [0, 1, 2, 3, 4], "layer 2"),
        ([1.0, 1.0, 1.0, math.inf, 1.0], [0, 2, 4, 6, 8], "layer 6"),
        ([1.0, 1.0, 1.0, 1.0], [0, 1, 2, 3], "at least 3 layers"),
        ([1.0, 1.0, 1.0, 1.0, 1.0], [0, 1, 3, 2, 4], "strictly increasing"),
    ],
)
def test_bad_curves_raise_naming_the_problem(
    values: list[float], layers: list[int], match: str
) -> None:
    with pytest.raises(MetricInputError, match=match):
        detect_bathtub(values, layers)


def test_bathtub_explained_combinations() -> None:
    with_tub = detect_bathtub(PLANTED, LAYERS)
    flat = detect_bathtub([1.0] * 11, LAYERS)
    yes = bathtub_explained(with_tub, flat)
    assert yes.explained and "explained by dominant datapoints" in yes.summary
    remains = bathtub_explained(with_tub, with_tub)
    assert not remains.explained and "remains" in remains.summary
    nothing = bathtub_explained(flat, flat)
    assert not nothing.explained and "nothing to explain" in nothing.summary


# --------------------------------------------------------------------------- final layer
def test_final_layer_lowest_reports_runner_up() -> None:
    r = final_layer_lowest([0.2, 1.0, 0.9, 0.95, 0.5], [0, 1, 2, 3, 4])
    assert r.lowest  # layer 0 (0.2) is ignored
    assert (r.final_layer, r.runner_up_layer) == (4, 2)
    assert r.final_value == 0.5 and r.runner_up_value == 0.9


def test_flat_copy_with_float_noise_is_not_final_layer_lowest() -> None:
    rng = np.random.default_rng(0)
    noisy = 1.0 - rng.uniform(0, 1e-9, 11)
    noisy[-1] = noisy.min() - 1e-10
    assert not final_layer_lowest(noisy, LAYERS).lowest
    assert final_layer_lowest(noisy, LAYERS, margin=0.0).lowest


def test_final_layer_not_lowest_and_summary_of_both_variants() -> None:
    post = final_layer_lowest([1.0, 0.9, 0.5, 0.95], [0, 1, 2, 3])
    pre = final_layer_lowest([1.0, 0.9, 0.5, 0.3], [0, 1, 2, 3], variant="pre-norm")
    assert not post.lowest and pre.lowest
    line = final_layer_summary(post, pre)
    assert "post-norm" in line and "pre-norm" in line and "disagree" in line
    assert final_layer_summary(post) == post.summary
    with pytest.raises(MetricInputError, match="at least 2 layers"):
        final_layer_lowest([1.0, 0.5], [0, 1])


# --------------------------------------------------------------------------- localization
def _gini_reference(x: np.ndarray) -> float:
    """Gini as the mean absolute difference over all ordered pairs / (2 mean)."""
    n = len(x)
    mad = sum(abs(a - b) for a, b in itertools.product(x, x)) / (n * n)
    return float(mad / (2 * x.mean()))


def test_localization_uniform_and_concentrated() -> None:
    even = localization([2.0] * 8)
    assert even.distributed is True and even.gini == pytest.approx(0.0)
    assert even.max_share_ratio == pytest.approx(1.0)
    one = localization([0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert one.distributed is False
    assert one.gini == pytest.approx(7 / 8) and one.max_share_ratio == pytest.approx(8.0)
    assert one.max_layer == 2 and one.max_share == pytest.approx(1.0)
    assert "localized" in one.summary and "layer 2" in one.summary


def test_localization_gini_matches_reference() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        x = rng.exponential(size=12)
        assert localization(x.tolist()).gini == pytest.approx(_gini_reference(x), abs=1e-12)


def test_localization_thresholds_each_decide() -> None:
    totals = [1.0] * 9 + [4.0]  # ratio 10 * 4/13 = 3.08, Gini small
    r = localization(totals)
    assert r.gini < 0.5 and r.max_share_ratio > 3.0 and r.distributed is False
    assert localization(totals, max_share_ratio=3.5).distributed is True


def test_localization_edge_cases() -> None:
    none = localization([0.0, 0.0, 0.0])
    assert none.distributed is None and none.summary.startswith("no weight change")
    with pytest.raises(MetricInputError, match="layer 1 is negative"):
        localization([1.0, -0.5])
    with pytest.raises(MetricInputError, match="layer 2"):
        localization([1.0, 1.0, math.nan])
    with pytest.raises(MetricInputError, match="empty"):
        localization([])


# --------------------------------------------------------------------------- SFT vs RL
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mann_whitney_matches_scipy_with_ties(seed: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(0.3, 1.0, 40), 1)  # rounding makes ties
    y = np.round(rng.normal(0.0, 1.0, 55), 1)
    ours = mann_whitney_greater(x.tolist(), y.tolist())
    ref = stats.mannwhitneyu(x, y, alternative="greater", method="asymptotic")
    assert ours.u == pytest.approx(ref.statistic, abs=1e-9)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    cliff = np.mean([np.sign(a - b) for a in x for b in y])
    assert ours.effect == pytest.approx(cliff, abs=1e-12)


def test_mann_whitney_all_tied_has_no_evidence() -> None:
    r = mann_whitney_greater([1.0, 1.0], [1.0, 1.0, 1.0])
    assert r.p_value == 1.0 and r.effect == 0.0


def test_sft_vs_rl_holds_and_each_condition_can_break_it() -> None:
    rng = np.random.default_rng(7)
    sft = (rng.random(80) * 0.02 + 0.015).tolist()
    rl = (rng.random(120) * 0.02).tolist()
    r = sft_vs_rl(sft, rl, sft_rbf=[0.80, 0.82], rl_rbf=[0.90, 0.91, 0.92])
    assert r.holds is True and r.p_value is not None and r.p_value < 0.05
    assert r.effect is not None and r.effect >= 0.3
    assert "changes more" in r.summary
    rbf_wrong = sft_vs_rl(sft, rl, sft_rbf=[0.95], rl_rbf=[0.90])
    assert rbf_wrong.holds is False and rbf_wrong.rbf_lower_for_sft is False
    swapped = sft_vs_rl(rl, sft, sft_rbf=[0.8], rl_rbf=[0.9])
    assert swapped.holds is False and swapped.p_value is not None and swapped.p_value > 0.5
    weak = sft_vs_rl(sft, rl, sft_rbf=[0.8], rl_rbf=[0.9], min_effect=0.99)
    assert weak.holds is False


def test_sft_vs_rl_needs_both_methods() -> None:
    r = sft_vs_rl([0.1, 0.2], [], sft_rbf=[0.8], rl_rbf=[])
    assert r.holds is None
    assert "no RL matrices" in r.summary and "no RL RBF CKA" in r.summary
    with pytest.raises(MetricInputError, match="position 1"):
        sft_vs_rl([0.1, math.nan], [0.2], sft_rbf=[0.8], rl_rbf=[0.9])


# --------------------------------------------------------------------------- trace invariance
def test_trace_invariance_plain_sequences() -> None:
    r = trace_invariance([1.0, 0.5, 0.9], [1.0, 0.52, 0.7], atol=0.05)
    assert not r.invariant and r.layer == 2
    assert r.max_abs_diff == pytest.approx(0.2)
    assert trace_invariance([1.0, 0.5], [1.0, 0.53], atol=0.05).invariant


def test_trace_invariance_curves_use_their_layers() -> None:
    a = Curve("linear", [0, 4, 8], [1.0, 0.5, 0.9], [1.0, 0.5, 0.9], [1.0, 0.5, 0.9], 3)
    b = Curve("linear", [0, 4, 8], [1.0, 0.6, 0.9], [1.0, 0.6, 0.9], [1.0, 0.6, 0.9], 3)
    r = trace_invariance(a, b, names=("math", "code"))
    assert r.layer == 4 and r.layers == (0, 4, 8) and not r.invariant
    assert "math vs code" in r.summary
    c = Curve("linear", [0, 4, 9], [1.0, 0.6, 0.9], [1.0, 0.6, 0.9], [1.0, 0.6, 0.9], 3)
    with pytest.raises(MetricInputError, match="same layers"):
        trace_invariance(a, c)


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_is_deterministic_and_brackets_the_mean() -> None:
    rng = np.random.default_rng(11)
    data = rng.normal(size=(20, 6))
    m1, lo1, hi1 = bootstrap_interval(data, n_boot=500, seed=5)
    _, lo2, hi2 = bootstrap_interval(data, n_boot=500, seed=5)
    np.testing.assert_array_equal(lo1, lo2)
    np.testing.assert_array_equal(hi1, hi2)
    np.testing.assert_allclose(m1, data.mean(axis=0))
    assert np.all(lo1 < m1) and np.all(m1 < hi1)
    _, lo3, _ = bootstrap_interval(data, n_boot=500, seed=6)
    assert not np.array_equal(lo1, lo3)
    # Width shrinks roughly like 1/sqrt(T): 4x the traces -> about half the width.
    big = np.tile(data, (4, 1))
    _, blo, bhi = bootstrap_interval(big, n_boot=500, seed=5)
    ratio = np.median((bhi - blo) / (hi1 - lo1))
    assert 0.35 < ratio < 0.65


def test_bootstrap_single_trace_and_constant() -> None:
    m, lo, hi = bootstrap_interval([[0.1, 0.2, 0.3]])
    np.testing.assert_array_equal(m, lo)
    np.testing.assert_array_equal(m, hi)
    m, lo, hi = bootstrap_interval(np.full((5, 2), 0.7))
    assert np.all(lo <= m) and np.all(m <= hi)


def test_bootstrap_bad_input_names_layer() -> None:
    data = np.ones((3, 4))
    data[2, 1] = math.nan
    with pytest.raises(MetricInputError, match="trace #2 at layer 5"):
        bootstrap_interval(data, layers=[0, 5, 10, 15])
    with pytest.raises(MetricInputError, match="shape"):
        bootstrap_interval(np.ones(4))
    with pytest.raises(MetricInputError, match="level"):
        bootstrap_interval(np.ones((2, 2)), level=1.5)
