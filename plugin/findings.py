"""``reasondiff.findings``: every finding as a library function, results in, Verdict out.

The verdict math lives in :mod:`reasondiff.metrics.findings` (curves in, small results
out); this layer is what used to be glue in ``diffs/test_*.py``: pick the rows and curves
a finding reads, splice the pre-norm final layer, take the RBF means, turn the result into
the :class:`~reasondiff.records.Verdict` that the pytest tests assert on. The pytest
tests and :func:`reasondiff.compare` call the same functions, so their verdicts are equal
for the same results and options.

Input a finding cannot judge raises :class:`FindingInputError` naming the pair, metric,
layer and trace (NaN rows, no rows); :class:`FindingNotApplicable` means there is nothing
to judge (one trace set only) and is a skip, not a failure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import ReasondiffError
from .records import CkaRecord, Curve, PairResult, Verdict, WeightRecord, trace_set_of

#: Per-pair findings, in report order (the names of ``PairResult.verdicts``).
PAIR_FINDINGS = (
    "bathtub",
    "bathtub_explained",
    "final_layer_lowest",
    "weight_distributed",
    "trace_invariant",
)
#: CKA metrics of the curve snapshots (diffs/test_curves.py).
SNAPSHOT_CURVES = ("linear", "rbf", "linear_without_dominant")

#: ``curves(result, trace_set)`` -> ``{metric: Curve}``; the pytest session passes its
#: memoized one, the default computes them (same bootstrap, same seed).
CurveSource = Callable[[PairResult, "str | None"], Mapping[str, Curve]]


class FindingInputError(ReasondiffError):
    """A pair's results cannot be judged (no rows, NaN); the message names where."""


class NoCkaRows(FindingInputError):
    """A finding needs CKA rows and the result has none at all (a weights-only result)."""

    def __init__(self, pair_id: str) -> None:
        super().__init__(f"{pair_id}: no CKA rows (weights only)")
        self.pair_id = pair_id


class FindingNotApplicable(ReasondiffError):
    """Nothing to judge (e.g. one trace set for trace invariance): a skip, not a failure."""


@dataclass(frozen=True)
class FindingOptions:
    """The thresholds the findings read; defaults are the pytest options' defaults."""

    bathtub_delta: float
    bathtub_band: tuple[float, float]
    final_layer_margin: float
    localization_max_gini: float
    localization_max_share: float
    sft_rl_ratio: float
    invariance_atol: float
    bootstrap: int

    @classmethod
    def from_options(cls, options: Any) -> FindingOptions:
        """From :class:`~reasondiff.options.DiffOptions` or any object with these fields."""
        return cls(**{f.name: getattr(options, f.name) for f in fields(cls)})

    @classmethod
    def defaults(cls, **overrides: Any) -> FindingOptions:
        """The documented defaults (the options table), with ``overrides``."""
        from .options import OPTIONS

        table = {o.dest: o.default for o in OPTIONS}
        return cls(**{f.name: overrides.get(f.name, table[f.name]) for f in fields(cls)})


class Evidence:
    """Checked rows and curves of one pair (memoized), what every finding reads."""

    def __init__(
        self, result: PairResult, options: FindingOptions, curves: CurveSource | None = None
    ) -> None:
        self.result = result
        self.options = options
        self._curves = curves
        self._memo: dict[str | None, Mapping[str, Curve]] = {}

    @property
    def pair_id(self) -> str:
        return self.result.info.pair_id

    def primary(self) -> str | None:
        return self.result.trace_sets[0] if self.result.trace_sets else None

    def rows(self, metrics: Iterable[str], trace_set: str | None = None) -> list[CkaRecord]:
        """The CKA rows of ``metrics`` (in one trace set; None = all), all finite."""
        wanted = set(metrics)
        res = self.result
        out = [
            r
            for r in res.cka
            if r.metric in wanted and (trace_set is None or trace_set_of(r.trace) == trace_set)
        ]
        if not res.cka:
            raise NoCkaRows(self.pair_id)
        if not out:
            raise FindingInputError(
                f"{self.pair_id}: no {'/'.join(sorted(wanted))} rows"
                + (f" in trace set {trace_set!r}" if trace_set else "")
                + f" (trace sets: {', '.join(res.trace_sets) or 'none'})"
            )
        for r in out:
            if not math.isfinite(r.value):
                raise FindingInputError(
                    f"{self.pair_id}: {r.metric} is {r.value} for {r.descendant} vs {r.base} "
                    f"at layer {r.layer}, trace {r.trace}"
                )
        return out

    def curve(self, metric: str, trace_set: str | None = None) -> Curve:
        """The mean curve of ``metric`` over one trace set's traces (None = primary)."""
        name = trace_set if trace_set is not None else self.primary()
        self.rows([metric], name)
        try:
            if self._curves is not None:
                return self._curves(self.result, name)[metric]
            if name not in self._memo:
                from .metrics.aggregate import curves_from_rows

                self._memo[name] = curves_from_rows(
                    self.result.cka, trace_set=name, n_boot=self.options.bootstrap, seed=0
                )
            return self._memo[name][metric]
        except ReasondiffError as exc:
            raise FindingInputError(f"{self.pair_id}: {metric}: {exc}") from None

    def weights(self) -> list[WeightRecord]:
        """Weight records; a NaN/Inf normalized diff of a comparable tensor (no note) is an error.

        Only ``normalized_diff`` is checked: it is the only number the weight findings
        use (``relative_diff`` is legitimately inf for a zero base tensor).
        """
        res = self.result
        if not res.weights:
            raise FindingInputError(f"{self.pair_id}: no weight-diff records")
        for w in res.weights:
            if not w.note and not math.isfinite(w.normalized_diff):
                raise FindingInputError(
                    f"{self.pair_id}: normalized_diff is {w.normalized_diff} for tensor "
                    f"{w.tensor} (block {w.block}) of {w.descendant} vs {w.base}"
                )
        return list(res.weights)


def _evidence(
    result: PairResult | Evidence, options: FindingOptions | None, curves: CurveSource | None
) -> Evidence:
    if isinstance(result, Evidence):
        return result
    return Evidence(result, options or FindingOptions.defaults(), curves)


# --------------------------------------------------------------------------- pair findings
def bathtub(
    result: PairResult | Evidence,
    options: FindingOptions | None = None,
    *,
    study_dip: tuple[int, int] | None = None,
    curves: CurveSource | None = None,
) -> Verdict:
    """A middle-layer dip in the primary set's mean linear CKA (METHODS §8)."""
    from .metrics.findings import detect_bathtub

    ev = _evidence(result, options, curves)
    o = ev.options
    c = ev.curve("linear")
    res = detect_bathtub(
        c.mean,
        c.layers,
        delta=o.bathtub_delta,
        band=o.bathtub_band,
        lo=c.lo,
        hi=c.hi,
        num_layers=ev.result.info.num_layers,
    )
    summary = res.summary
    if study_dip is not None:
        summary += f"; study: dip from layer {study_dip[0]} to {study_dip[1]}"
    return Verdict(
        finding="bathtub",
        subject=ev.pair_id,
        observed=res.present,
        expected=ev.result.info.expect.get("bathtub"),
        summary=summary,
        details={**asdict(res), "study_dip": list(study_dip) if study_dip else None},
    )


def bathtub_explained(
    result: PairResult | Evidence,
    options: FindingOptions | None = None,
    *,
    curves: CurveSource | None = None,
) -> Verdict:
    """The bathtub is gone once the dominant datapoints U are removed (METHODS §5, §8)."""
    from .metrics import findings as fm

    ev = _evidence(result, options, curves)
    o = ev.options
    kwargs: dict[str, Any] = {
        "delta": o.bathtub_delta,
        "band": o.bathtub_band,
        "num_layers": ev.result.info.num_layers,
    }
    lin = ev.curve("linear")
    wo = ev.curve("linear_without_dominant")
    with_u = fm.detect_bathtub(lin.mean, lin.layers, lo=lin.lo, hi=lin.hi, **kwargs)
    without_u = fm.detect_bathtub(
        wo.mean,
        wo.layers,
        lo=wo.lo,
        hi=wo.hi,
        metric="linear CKA without dominant datapoints",
        **kwargs,
    )
    res = fm.bathtub_explained(with_u, without_u)
    return Verdict(
        finding="bathtub_explained",
        subject=ev.pair_id,
        observed=res.explained,
        expected=ev.result.info.expect.get("bathtub_explained"),
        summary=res.summary,
        details={**asdict(res), "linear": asdict(with_u), "without_dominant": asdict(without_u)},
    )


def final_layer_lowest(
    result: PairResult | Evidence,
    options: FindingOptions | None = None,
    *,
    curves: CurveSource | None = None,
) -> Verdict:
    """The final layer has the lowest linear CKA: post-norm decides, pre-norm beside it."""
    from .metrics import findings as fm

    ev = _evidence(result, options, curves)
    post_curve = ev.curve("linear")
    pre_curve = ev.curve("linear_prenorm")
    final = ev.result.info.num_layers or max(post_curve.layers)
    margin = ev.options.final_layer_margin
    post = fm.final_layer_lowest(
        post_curve.mean, post_curve.layers, margin=margin, variant="post-norm"
    )
    pre_by_layer = dict(zip(pre_curve.layers, pre_curve.mean, strict=True))
    if final not in pre_by_layer:
        raise FindingInputError(
            f"{ev.pair_id}: linear_prenorm has no value at the final layer {final} "
            f"(layers {pre_curve.layers})"
        )
    # the last block's output before the final norm, in place of the post-norm value
    pre_values = [
        pre_by_layer[final] if lay == final else v
        for lay, v in zip(post_curve.layers, post_curve.mean, strict=True)
    ]
    pre = fm.final_layer_lowest(pre_values, post_curve.layers, margin=margin, variant="pre-norm")
    return Verdict(
        finding="final_layer_lowest",
        subject=ev.pair_id,
        observed=post.lowest,
        expected=ev.result.info.expect.get("final_layer_lowest"),
        summary=fm.final_layer_summary(post, pre),
        details={"post_norm": asdict(post), "pre_norm": asdict(pre)},
    )


def weight_distributed(
    result: PairResult | Evidence,
    options: FindingOptions | None = None,
    *,
    curves: CurveSource | None = None,
) -> Verdict:
    """The weight change is spread over layers: Gini and top share over the block matrices."""
    from .metrics.aggregate import weight_layer_totals
    from .metrics.findings import localization

    ev = _evidence(result, options, curves)
    totals = weight_layer_totals(ev.weights(), matrices_only=True)
    res = localization(
        totals,
        max_gini=ev.options.localization_max_gini,
        max_share_ratio=ev.options.localization_max_share,
    )
    return Verdict(
        finding="weight_distributed",
        subject=ev.pair_id,
        observed=res.distributed,
        expected=ev.result.info.expect.get("weight_distributed"),
        summary=res.summary + " (over weight matrices)",
        details=asdict(res),
    )


def trace_invariant(
    result: PairResult | Evidence,
    options: FindingOptions | None = None,
    *,
    curves: CurveSource | None = None,
) -> Verdict:
    """The primary and the second trace set give the same linear-CKA curve (Fig. 5)."""
    from .metrics.findings import trace_invariance

    ev = _evidence(result, options, curves)
    sets = ev.result.trace_sets
    if not sets:
        ev.rows(["linear"])  # names a weights-only result
    if len(sets) < 2:
        raise FindingNotApplicable(
            f"{ev.pair_id}: only one trace set; pass --traces-alt PATH to check trace invariance"
        )
    set_a, set_b = sets[:2]
    results = {
        metric: trace_invariance(
            ev.curve(metric, set_a),
            ev.curve(metric, set_b),
            atol=ev.options.invariance_atol,
            names=(set_a, set_b),
        )
        for metric in ("linear", "rbf")
    }
    linear, rbf = results["linear"], results["rbf"]
    return Verdict(
        finding="trace_invariant",
        subject=ev.pair_id,
        observed=linear.invariant,
        expected=ev.result.info.expect.get("trace_invariant"),
        summary=f"linear CKA {linear.summary} (RBF CKA, reported: max |diff| "
        f"{rbf.max_abs_diff:.4f} at layer {rbf.layer})",
        details={metric: asdict(r) for metric, r in results.items()},
    )


#: name -> function, in report order.
PAIR_FINDING_FUNCTIONS: dict[str, Callable[..., Verdict]] = {
    "bathtub": bathtub,
    "bathtub_explained": bathtub_explained,
    "final_layer_lowest": final_layer_lowest,
    "weight_distributed": weight_distributed,
    "trace_invariant": trace_invariant,
}


def pair_verdicts(
    result: PairResult,
    options: FindingOptions | None = None,
    *,
    study_dip: tuple[int, int] | None = None,
    curves: CurveSource | None = None,
) -> dict[str, Verdict]:
    """Every pair finding that applies to ``result`` (finding name -> Verdict).

    A finding with nothing to judge (one trace set, a weights-only result) is left out;
    one whose input is broken (NaN rows, holes) is undecided (``observed=None``) with the
    reason as its summary: the pytest test fails there with the same reason.
    """
    ev = _evidence(result, options, curves)
    out: dict[str, Verdict] = {}
    for name, fn in PAIR_FINDING_FUNCTIONS.items():
        kwargs: dict[str, Any] = {"study_dip": study_dip} if name == "bathtub" else {}
        try:
            out[name] = fn(ev, **kwargs)
        except (FindingNotApplicable, NoCkaRows):
            continue
        except ReasondiffError as exc:  # FindingInputError, or the math refusing its input
            out[name] = Verdict(
                finding=name,
                subject=ev.pair_id,
                observed=None,
                expected=ev.result.info.expect.get(name),
                summary=f"cannot judge: {exc}",
            )
    return out


# --------------------------------------------------------------------------- group finding
@dataclass(frozen=True)
class GroupMember:
    """One descendant of a base in a group finding: its key, method and result."""

    key: str
    method: str | None
    result: PairResult


def mean_rbf(ev: Evidence) -> float | None:
    """Mean RBF CKA over layers 1..L of the primary set, or None for a weights-only result."""
    if not any(r.metric == "rbf" for r in ev.result.cka):
        return None
    c = ev.curve("rbf")
    blocks = [v for lay, v in zip(c.layers, c.mean, strict=True) if lay >= 1]
    return sum(blocks) / len(blocks) if blocks else None


def sft_more_than_rl(
    subject: str,
    members: Sequence[GroupMember],
    options: FindingOptions | None = None,
    *,
    expected: bool | None = None,
    curves: CurveSource | None = None,
) -> Verdict:
    """Group finding per base: SFT descendants change more than RL ones (METHODS §8).

    ``subject`` is ``base:<key>``. Decided from the per-matrix weight diffs alone; mean
    RBF CKA per side is reported when CKA rows exist. With no SFT or no RL member the
    verdict is undecided (``observed=None``) and the expectation is not checked.
    """
    from .metrics.aggregate import per_matrix_diffs
    from .metrics.findings import sft_vs_rl

    o = options or FindingOptions.defaults()
    diffs: dict[str, dict[str, list[float]]] = {"SFT": {}, "RL": {}}
    rbf: dict[str, dict[str, float]] = {"SFT": {}, "RL": {}}
    for m in members:
        if m.method not in diffs:
            continue
        ev = Evidence(m.result, o, curves)
        diffs[m.method][m.key] = per_matrix_diffs(ev.weights())
        value = mean_rbf(ev)
        if value is not None:
            rbf[m.method][m.key] = value
    res = sft_vs_rl(
        diffs["SFT"],
        diffs["RL"],
        ratio=o.sft_rl_ratio,
        sft_rbf=rbf["SFT"],
        rl_rbf=rbf["RL"],
        n_boot=o.bootstrap,
    )
    summary = res.summary
    if res.holds is None:
        if expected is not None:
            # undecided is reported, not failed: the expectation cannot be checked here
            summary += f" (expectation {'yes' if expected else 'no'} not checked)"
        expected = None
        # an undecided verdict shows its reason only, no row of None/NaN numbers
        details: dict[str, Any] = {"sft": sorted(diffs["SFT"]), "rl": sorted(diffs["RL"])}
    else:
        details = {**asdict(res), "sft": sorted(diffs["SFT"]), "rl": sorted(diffs["RL"])}
    return Verdict(
        finding="sft_more_than_rl",
        subject=subject,
        observed=res.holds,
        expected=expected,
        summary=summary,
        details=details,
    )


# --------------------------------------------------------------------------- snapshots
def weight_diff_curve(records: Iterable[WeightRecord]) -> dict[str, Any]:
    """Mean normalized diff over the comparable tensors of each decoder block.

    Keyed ``blocks``, not ``layers``: block b is hidden-state layer b + 1, so the two
    axes must not be mistaken for each other. (The snapshot payload: its values must
    stay what the accepted snapshots hold, so it keeps every tensor kind.)
    """
    per_block: dict[int, list[float]] = {}
    for r in records:
        if r.layer >= 0 and not r.note:
            per_block.setdefault(r.layer, []).append(r.normalized_diff)
    blocks = sorted(per_block)
    return {
        "metric": "weight_diff",
        "blocks": blocks,
        "values": [sum(per_block[b]) / len(per_block[b]) for b in blocks],
    }


def snapshot_payloads(
    result: PairResult | Evidence,
    options: FindingOptions | None = None,
    *,
    curves: CurveSource | None = None,
) -> dict[str, dict[str, Any]]:
    """The curves a snapshot holds for one pair: CKA means per layer, weight diff per block."""
    ev = _evidence(result, options, curves)
    out: dict[str, dict[str, Any]] = {}
    for metric in SNAPSHOT_CURVES:
        c = ev.curve(metric)
        out[metric] = {"metric": metric, "layers": c.layers, "values": c.mean}
    out["weight_diff"] = weight_diff_curve(ev.weights())
    return out
