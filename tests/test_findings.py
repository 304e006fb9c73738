"""Verdict math of the finding tests (reasondiff.metrics.findings)."""

from __future__ import annotations

import inspect
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


# Synthetic 28-block curves (hidden_states 0..28), each with a known answer.
L28 = list(range(29))


def _curve28(points: dict[int, float], default: float = 1.0) -> list[float]:
    return [points.get(layer, default) for layer in L28]


def test_steady_decline_is_not_a_bathtub() -> None:
    r = detect_bathtub(np.linspace(1.0, 0.3, 29).tolist(), L28)
    assert not r.present
    assert r.deepest_bottom is None and r.deepest_depth == 0.0 and r.start is None
    assert "no dip" in r.summary


def test_low_final_layer_does_not_hide_a_middle_dip() -> None:
    # The curve: a dip to 0.5 at layers 15-16 of 28 and 0.45 at layer 27. The
    # global minimum (27) is no dip; the dip at 15 is judged against its own sides.
    tail = {22: 0.8, 23: 0.7, 24: 0.6, 25: 0.55, 26: 0.5, 27: 0.45, 28: 0.4}
    dip = {12: 0.8, 13: 0.65, 14: 0.55, 15: 0.5, 16: 0.5, 17: 0.6, 18: 0.7, 19: 0.8}
    curve = _curve28({**dip, 20: 0.85, 21: 0.9, **tail})
    r = detect_bathtub(curve, L28)
    assert r.present
    assert (r.start, r.bottom, r.recover) == (13, 15, 18)
    assert r.early == pytest.approx(1.0) and r.late == pytest.approx(0.9)
    assert r.depth == pytest.approx(0.4)
    assert r.deepest_bottom == 15 and r.in_band
    assert "layer 15 of 28" in r.summary and "no recovery" not in r.summary


def test_two_dips_the_deepest_in_the_band_is_judged() -> None:
    curve = _curve28({7: 0.85, 8: 0.7, 9: 0.85, 17: 0.7, 18: 0.4, 19: 0.7})
    r = detect_bathtub(curve, L28)
    assert r.present and r.bottom == 18 and r.depth == pytest.approx(0.6)
    assert (r.start, r.recover) == (18, 19)  # 17 and 19 sit at the half-depth level
    # with the deeper dip outside the band, the shallower one inside decides
    narrow = detect_bathtub(curve, L28, band=(0.15, 0.5))
    assert narrow.present and narrow.bottom == 8 and narrow.depth == pytest.approx(0.3)
    assert narrow.deepest_bottom == 18
    assert "deepest dip anywhere bottoms at layer 18" in narrow.summary


def test_flat_28_layer_curve_has_no_dip() -> None:
    r = detect_bathtub([1.0] * 29, L28)
    assert not r.present and r.deepest_bottom is None and r.depth == 0.0


def test_noise_is_not_a_bathtub_and_does_not_move_a_real_one() -> None:
    rng = np.random.default_rng(5)
    noise = rng.normal(0.0, 0.01, 29)
    flat = (0.97 + noise).tolist()
    r = detect_bathtub(flat, L28)
    assert not r.present and 0.0 < r.depth < 0.1
    assert "under delta 0.25" in r.summary
    planted = 0.97 + noise
    planted[12:21] -= 0.6  # the study's distill7b shape: drop at 12, back at 21
    r = detect_bathtub(planted.tolist(), L28)
    assert r.present and 12 <= r.bottom <= 20
    assert (r.start, r.recover) == (12, 21)


def test_dip_at_layer_4_of_28_is_reported_and_the_band_can_hold_it() -> None:
    curve = _curve28({3: 0.8, 4: 0.5, 5: 0.8})
    default = detect_bathtub(curve, L28)
    assert not default.present and not default.in_band
    assert default.bottom == 4 and default.deepest_bottom == 4  # location reported anyway
    assert "outside the middle band 15%-85%" in default.summary
    assert detect_bathtub(curve, L28, band=(0.1, 0.85)).present


def test_bathtub_defaults_are_the_option_defaults() -> None:
    from reasondiff.options import OPTIONS, DiffOptions

    params = inspect.signature(detect_bathtub).parameters
    opt = {o.dest: o.default for o in OPTIONS}
    assert params["delta"].default == opt["bathtub_delta"] == DiffOptions().bathtub_delta
    assert params["band"].default == opt["bathtub_band"] == DiffOptions().bathtub_band
    ratio = inspect.signature(sft_vs_rl).parameters["ratio"].default
    assert ratio == opt["sft_rl_ratio"] == DiffOptions().sft_rl_ratio


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


def test_nothing_to_explain_names_the_rule_that_failed() -> None:
    """The summary gives the reason the bathtub rule gave, not a global-minimum rule."""
    # A deep dip at layer 2 of 20 (outside the 15%-85% band) and a low final layer.
    curve = [1.0] * 21
    curve[2], curve[20] = 0.1, 0.0
    outside = detect_bathtub(curve, list(range(21)))
    assert not outside.present and outside.depth >= outside.delta and not outside.in_band
    text = bathtub_explained(outside, outside).summary
    assert "layer 2, lies outside the band" in text and "delta" not in text
    assert "minimum" not in text
    # A shallow dip inside the band.
    shallow = detect_bathtub([1.0, 1.0, 1.0, 1.0, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], LAYERS)
    assert not shallow.present and shallow.in_band
    text = bathtub_explained(shallow, shallow).summary
    assert "depth 0.100 < delta 0.25" in text and "outside" not in text
    # No dip at all.
    flat = detect_bathtub([1.0] * 11, LAYERS)
    assert "no dip" in bathtub_explained(flat, flat).summary


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
    assert "localized" in one.summary and "block 2" in one.summary


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
    with pytest.raises(MetricInputError, match="block 1 is negative"):
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


def _matrices(
    rng: np.random.Generator, median: float, n: int = 200, sigma: float = 0.3
) -> list[float]:
    """n per-matrix normalized diffs of one descendant: log-normal around ``median``."""
    return (median * np.exp(rng.normal(0.0, sigma, n))).tolist()


def test_sft_vs_rl_one_sft_two_rl_the_distill7b_shape() -> None:
    # The study's means: Light-R1 .0112 (SFT) vs AceReason-7B .0031 and Skywork-OR1 .0014.
    rng = np.random.default_rng(11)
    sft = {"light-r1": _matrices(rng, 0.0112)}
    rl = {"acereason": _matrices(rng, 0.0031), "skywork": _matrices(rng, 0.0014)}
    r = sft_vs_rl(sft, rl)
    assert r.holds is True
    assert (r.n_sft, r.n_rl) == (1, 2)  # descendants, not matrices
    assert [q.rl for q in r.ratios] == ["acereason", "skywork"]
    assert r.min_ratio == pytest.approx(
        np.median(sft["light-r1"]) / np.median(rl["acereason"]), rel=1e-12
    )
    assert r.min_ratio_lo is not None and r.min_ratio_lo > 1.0
    for c in r.descendants:
        assert c.lo <= c.median <= c.hi and c.n_matrices == 200
    assert "light-r1" in r.summary and "skywork" in r.summary and "changes more" in r.summary
    assert "RBF CKA not available" in r.summary and r.rbf_lower_for_sft is None


def test_sft_vs_rl_one_sft_nine_rl_every_pair_must_clear_the_ratio() -> None:
    rng = np.random.default_rng(12)
    sft = {"deepmath": _matrices(rng, 0.02)}
    rl = {f"rl-{i}": _matrices(rng, 0.002 + 0.0005 * i) for i in range(9)}
    r = sft_vs_rl(sft, rl)
    assert r.holds is True and len(r.ratios) == 9 and r.n_rl == 9
    # one RL descendant that changed nearly as much as the SFT one breaks it
    rl["rl-big"] = _matrices(rng, 0.015)
    r = sft_vs_rl(sft, rl)
    assert r.holds is False
    assert r.min_ratio is not None and r.min_ratio < 2.0
    assert "deepmath / rl-big" in r.summary


def test_sft_vs_rl_equal_magnitude_controls_are_false() -> None:
    # Two models of similar magnitude, 200 matrices each: the pooled rank test calls a
    # 1.3x difference "model A vs model B" significant; one descendant per side is not
    # evidence about training methods, and 1.3 is below the ratio.
    rng = np.random.default_rng(13)
    sft = {"sft-0": _matrices(rng, 0.013)}
    rl = {"rl-0": _matrices(rng, 0.010)}
    r = sft_vs_rl(sft, rl)
    assert r.p_value is not None and r.p_value < 0.05 and r.effect is not None and r.effect > 0.3
    assert r.holds is False
    same = sft_vs_rl({"a": _matrices(rng, 0.01)}, {"b": _matrices(rng, 0.01)})
    assert same.holds is False and same.min_ratio_lo is not None and same.min_ratio_lo < 1.0
    assert "does not clearly change more" in same.summary


def test_sft_vs_rl_near_the_ratio_threshold() -> None:
    rng = np.random.default_rng(14)
    base = _matrices(rng, 0.01, sigma=0.02)
    above = {"sft": [2.1 * v for v in base]}
    below = {"sft": [1.9 * v for v in base]}
    rl = {"rl": _matrices(rng, 0.01, sigma=0.02)}
    r_above, r_below = sft_vs_rl(above, rl), sft_vs_rl(below, rl)
    assert r_above.min_ratio is not None and 2.0 <= r_above.min_ratio < 2.2
    assert r_above.holds is True
    assert r_below.min_ratio is not None and 1.8 < r_below.min_ratio < 2.0
    assert r_below.holds is False
    assert sft_vs_rl(below, rl, ratio=1.8).holds is True  # --sft-rl-ratio decides


def test_sft_vs_rl_needs_the_interval_above_one() -> None:
    # A ratio of 3 from five scattered matrices: the interval reaches below 1.
    sft = {"sft": [0.001, 0.002, 0.03, 0.04, 0.05]}
    rl = {"rl": [0.0005, 0.001, 0.01, 0.03, 0.04]}
    r = sft_vs_rl(sft, rl)
    assert r.min_ratio == pytest.approx(3.0)
    assert r.min_ratio_lo is not None and r.min_ratio_lo <= 1.0
    assert r.holds is False and "<= 1" in r.summary


def test_sft_vs_rl_undecided_when_a_side_is_empty() -> None:
    r = sft_vs_rl({"sft": [0.1, 0.2, 0.3]}, {})
    assert r.holds is None
    assert r.summary.startswith("undecided: no RL descendant")
    assert sft_vs_rl({}, {}).summary.startswith("undecided: no SFT and RL descendant")
    with pytest.raises(MetricInputError, match=r"RL descendant 'rl-x'.*position 1"):
        sft_vs_rl({"sft": [0.1]}, {"rl-x": [0.2, math.nan]})


def test_sft_vs_rl_rbf_is_reported_beside_never_deciding() -> None:
    rng = np.random.default_rng(15)
    sft = {"s": _matrices(rng, 0.03)}
    rl = {"r": _matrices(rng, 0.005)}
    weights_only = sft_vs_rl(sft, rl)
    wrong_rbf = sft_vs_rl(sft, rl, sft_rbf={"s": 0.95}, rl_rbf={"r": 0.90})
    assert weights_only.holds is True and wrong_rbf.holds is True
    assert wrong_rbf.rbf_lower_for_sft is False and wrong_rbf.sft_rbf_mean == 0.95
    assert "mean RBF CKA SFT 0.950 >= RL 0.900" in wrong_rbf.summary


def test_sft_vs_rl_is_seeded_and_order_free() -> None:
    rng = np.random.default_rng(16)
    sft = {"s1": _matrices(rng, 0.03, n=30), "s2": _matrices(rng, 0.02, n=30)}
    rl = {"r1": _matrices(rng, 0.005, n=30), "r2": _matrices(rng, 0.004, n=30)}
    a = sft_vs_rl(sft, rl)
    b = sft_vs_rl(dict(reversed(sft.items())), dict(reversed(rl.items())))
    assert a == b


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
