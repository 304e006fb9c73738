"""``reasondiff.findings``: the library layer the diffs/ tests and compare() share.

Synthetic rows with known curves; each finding keeps its negative control (a flat pair
that must come out False), input errors name the pair, metric, layer and trace, and an
undecided group finding carries its reason only (issue 18.1, 18.4).
"""

from __future__ import annotations

import io
import math

import pytest

from reasondiff import findings
from reasondiff.records import CkaRecord, PairInfo, PairResult, ReportData, WeightRecord
from reasondiff.reports import make_console, render_terminal

L = 10
DIP = [1.0, 0.99, 0.98, 0.6, 0.4, 0.5, 0.97, 0.98, 0.99, 0.99, 0.8]  # bathtub, low final
FLAT = [1.0] * (L + 1)


def _result(
    linear: list[float],
    *,
    without: list[float] | None = None,
    prenorm_final: float = 0.99,
    traces: int = 4,
    sets: tuple[str, ...] = ("a",),
    expect: dict[str, bool] | None = None,
    pid: str = "b__d",
) -> PairResult:
    rows: list[CkaRecord] = []
    for ts in sets:
        for t in range(traces):
            tr = f"{ts}:{t}"
            for lay in range(L + 1):
                wobble = 0.001 * t
                rows.append(CkaRecord("b", "d", tr, lay, "linear", linear[lay] - wobble))
                rows.append(CkaRecord("b", "d", tr, lay, "rbf", 0.99 - wobble))
                w = (without or FLAT)[lay] - wobble
                rows.append(CkaRecord("b", "d", tr, lay, "linear_without_dominant", w))
            rows.append(CkaRecord("b", "d", tr, L, "linear_prenorm", prenorm_final))
    weights = [
        WeightRecord(
            "b",
            "d",
            f"model.layers.{i}.mlp.up_proj.weight",
            i,
            "mlp.up_proj.weight",
            (4, 4),
            0.01,
            0.01,
            0.001,
        )
        for i in range(L)
    ]
    info = PairInfo(pid, "b", "d", "b", "d", expect=expect or {}, num_layers=L)
    return PairResult(info=info, weights=weights, cka=rows, trace_sets=list(sets))


def test_bathtub_and_its_negative_control() -> None:
    v = findings.bathtub(_result(DIP, expect={"bathtub": True}), study_dip=(3, 6))
    assert v.observed is True and v.status == "pass" and "study: dip from layer 3 to 6" in v.summary
    flat = findings.bathtub(_result(FLAT, expect={"bathtub": False}))
    assert flat.observed is False and flat.status == "pass"


def test_bathtub_explained_needs_the_dip_gone_without_dominant() -> None:
    assert findings.bathtub_explained(_result(DIP, without=FLAT)).observed is True
    assert findings.bathtub_explained(_result(DIP, without=DIP)).observed is False
    assert findings.bathtub_explained(_result(FLAT)).observed is False  # negative control


def test_final_layer_splices_the_prenorm_value() -> None:
    lowest = [1.0] * L + [0.5]
    v = findings.final_layer_lowest(_result(lowest, prenorm_final=1.0))
    assert v.observed is True
    assert v.details["pre_norm"]["lowest"] is False  # before the norm it was not lowest
    assert v.details["pre_norm"]["final_value"] == pytest.approx(1.0)
    assert findings.final_layer_lowest(_result(FLAT)).observed is False


def test_trace_invariance_needs_two_sets() -> None:
    with pytest.raises(findings.FindingNotApplicable, match="only one trace set"):
        findings.trace_invariant(_result(DIP))
    v = findings.trace_invariant(_result(DIP, sets=("a", "b")))
    assert v.observed is True
    verdicts = findings.pair_verdicts(_result(DIP))
    assert "trace_invariant" not in verdicts and set(verdicts) == set(findings.PAIR_FINDINGS) - {
        "trace_invariant"
    }


def test_a_nan_row_is_named_and_undecided_in_pair_verdicts() -> None:
    r = _result(DIP, expect={"bathtub": True})
    r.cka[5] = CkaRecord("b", "d", "a:1", 3, "linear", math.nan)
    with pytest.raises(
        findings.FindingInputError, match=r"b__d: linear is nan .* layer 3, trace a:1"
    ):
        findings.bathtub(r)
    v = findings.pair_verdicts(r)["bathtub"]
    assert v.observed is None and v.status == "error" and "layer 3, trace a:1" in v.summary


def test_weights_only_result_has_no_cka_verdicts() -> None:
    r = _result(DIP)
    r.cka = []
    with pytest.raises(findings.NoCkaRows):
        findings.bathtub(r)
    assert set(findings.pair_verdicts(r)) == {"weight_distributed"}


def test_undecided_group_finding_shows_its_reason_only() -> None:
    rl = _result(FLAT, pid="b__rl")
    v = findings.sft_more_than_rl("base:b", [findings.GroupMember("rl", "RL", rl)], expected=True)
    assert v.observed is None and v.expected is None  # not checked, so not failed
    assert "undecided: no SFT descendant" in v.summary and "not checked" in v.summary
    assert not any(isinstance(x, float) and math.isnan(x) for x in v.details.values())
    assert set(v.details) == {"sft", "rl"}
    buf = io.StringIO()
    render_terminal(ReportData(pairs=[rl.info], verdicts=[v]), console=make_console(buf, width=200))
    text = buf.getvalue()
    assert "undecided: no SFT descendant" in text
    assert "=nan" not in text and "min_ratio" not in text


def test_decided_group_finding_keeps_its_numbers() -> None:
    sft = _result(FLAT, pid="b__sft")
    sft.weights = [
        WeightRecord("b", "sft", w.tensor, w.layer, w.component, w.shape, 0.1, 0.1, 0.01)
        for w in sft.weights
    ]
    rl = _result(FLAT, pid="b__rl")
    members = [findings.GroupMember("sft", "SFT", sft), findings.GroupMember("rl", "RL", rl)]
    v = findings.sft_more_than_rl("base:b", members, expected=True)
    assert v.status == "pass" and v.details["min_ratio"] == pytest.approx(10.0)
    assert v.details["sft_rbf_mean"] is not None  # mean RBF over layers 1..L, reported
