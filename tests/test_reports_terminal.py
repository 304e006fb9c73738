"""The terminal report renders a synthetic ReportData: ids intact, every status, no ANSI
codes unless colour is on, the exact cache line, narrow terminals and ASCII consoles."""

from __future__ import annotations

import io
import math
import re

import pytest
from rich.console import Console

from reasondiff.records import (
    CacheStats,
    Curve,
    DominantRecord,
    MassiveRecord,
    PairInfo,
    PairResult,
    ReportData,
    Verdict,
)
from reasondiff.reports import tables
from reasondiff.reports.sparkline import Glyphs, level, ramp_rgb, shade, sparkline
from reasondiff.reports.terminal import (
    cache_line,
    color_wanted,
    make_console,
    render_plain_summary,
    render_terminal,
    stages_line,
)
from reasondiff.tokens import pair_tokens

ANSI = re.compile(r"\x1b\[[0-9;]*m")
L = 10  # decoder layers of the synthetic toy models: curves have points 0..L
BRACKET_ID = "toy[1]__x"
COMPONENTS = (
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
EXPECT = {
    "bathtub": False,
    "bathtub_explained": False,
    "final_layer_lowest": False,
    "weight_distributed": True,
}


def _curve(metric: str, values: list[float], layers: list[int] | None = None) -> Curve:
    layers = list(range(len(values))) if layers is None else layers
    return Curve(
        metric=metric,
        layers=layers,
        mean=values,
        lo=[v - 0.02 for v in values],
        hi=[min(1.0, v + 0.02) for v in values],
        n_traces=8,
    )


def make_report_data(*, adhoc: bool = False, trace_sets: bool = True) -> ReportData:
    """A toy group of 7 pairs: a copy, 2 SFT, 2 RL, one planted bathtub, one bracket id.

    Verdicts cover every status (pass, fail, observed, n/a, error) and one group verdict.
    """
    specs = [  # (pair id, descendant, method, linear drop, planted bathtub)
        ("toy-base__toy-copy", "toy-copy", "SFT", 0.0, False),
        ("toy-base__toy-sft-a", "toy-sft-a", "SFT", 0.15, False),
        ("toy-base__toy-sft-b", "toy-sft-b", "SFT", 0.20, False),
        ("toy-base__toy-rl-a", "toy-rl-a", "RL", 0.03, False),
        ("toy-base__toy-rl-b", "toy-rl-b", "RL", 0.04, False),
        ("toy-base__toy-massive", "toy-massive", "SFT", 0.05, True),
        (BRACKET_ID, "x[1]", None, 0.10, False),
    ]
    if adhoc:
        specs.append(("my-ckpt[v2]", "my/ckpt[v2]", "RL", 0.08, False))
    data = ReportData(
        cache=CacheStats(activations_computed=12, weight_diffs_computed=7, metrics_computed=84),
        stage_seconds={"load": 3.1, "activations": 2.0, "metrics": 1.2, "weight_diffs": 0.4},
        notes=["trace toy:7 truncated to 256 tokens [--max-tokens]"],
    )
    for i, (pid, desc, method, drop, planted) in enumerate(specs):
        group = None if pid.startswith("my-ckpt") else "toy"
        expect = (
            {} if pid == BRACKET_ID else dict(EXPECT, bathtub=planted, bathtub_explained=planted)
        )
        data.pairs.append(
            PairInfo(pid, "toy-base", desc, "toy:base", f"toy:{desc}", method, group, expect, L)
        )
        linear = [1.0 - drop * layer / L for layer in range(L + 1)]
        without = list(linear)
        if planted:
            linear = [0.01 if 3 <= layer <= 6 else v for layer, v in enumerate(linear)]
        rbf = [1.0 - drop * 0.5 * layer / L for layer in range(L + 1)]
        curves = {
            "linear": _curve("linear", linear),
            "rbf": _curve("rbf", rbf),
            "linear_without_dominant": _curve("linear_without_dominant", without),
            "linear_prenorm": _curve("linear_prenorm", [linear[-1] + 0.01], [L]),
            "rbf_prenorm": _curve("rbf_prenorm", [rbf[-1] + 0.01], [L]),
        }
        if trace_sets:
            curves["linear@a"] = _curve("linear@a", linear)
            curves["linear@b"] = _curve("linear@b", [v - 0.01 for v in linear])
        data.curves[pid] = curves
        scale = 0.0 if desc == "toy-copy" else 0.002 * (i + 1) * (2.0 if method == "SFT" else 1.0)
        comps = {c: [scale * (1 + 0.1 * layer) for layer in range(L)] for c in COMPONENTS}
        if desc == "toy-sft-a":
            comps["mlp.down_proj.weight"][3] = math.nan  # a shape mismatch: not comparable
        data.weight_layers[pid] = comps
        data.weight_other[pid] = {"model.embed_tokens.weight": scale, "lm_head.weight": scale}
        data.weight_summary[pid] = {"mean_diff": scale * 1.45, "localization": 0.05 + 0.01 * i}
        for finding, expected in data.pairs[-1].expect.items():
            observed = planted if finding.startswith("bathtub") else expected
            details = (
                {"bottom": 4, "start": 3, "recover": 7} if planted and finding == "bathtub" else {}
            )
            data.verdicts.append(
                Verdict(finding, pid, observed, expected, f"{finding} summary for {pid}", details)
            )
    verdicts = {(v.subject, v.finding): v for v in data.verdicts}
    for pair in data.pairs:
        if pair.descendant in ("toy-massive", "toy-copy"):
            named = pair_tokens(
                token_result(pair, planted=pair.descendant == "toy-massive"),
                verdicts.get((pair.pair_id, "bathtub")),
            )
            assert named is not None
            data.tokens[pair.pair_id] = named
    data.verdicts += [
        Verdict(
            "final_layer_lowest", "toy-base__toy-sft-b", True, False, "last layer 0.80 < min 0.82"
        ),
        Verdict("bathtub", BRACKET_ID, False, None, "no dip: min 0.90 at layer 9 [of 10]"),
        Verdict("trace_invariant", BRACKET_ID, None, None, "only one trace set [a]"),
        Verdict("trace_invariant", "toy-base__toy-rl-b", None, True, "trace set [b] is empty"),
        Verdict(
            "sft_more_than_rl",
            "base:toy-base",
            True,
            True,
            "SFT changes more than RL: weakest ratio 3 >= 2",
            {  # the fields of metrics.findings.SftVsRlResult, shuffled
                "holds": True,
                "summary": "SFT changes more than RL: weakest ratio 3 >= 2",
                "n_sft": 1,
                "p_value": 0.002,
                "effect": 0.81,
                "min_ratio_lo": 2.5,
                "sft_median": 0.012,
                "rl_median": 0.004,
                "ratio_threshold": 2.0,
                "min_ratio": 3.0,
                "n_rl": 2,
                "descendants": [{"descendant": "light-r1", "median": 0.012}],
            },
        ),
    ]
    return data


N_TRACES = 4  # traces of the synthetic dominant-token rows
DIP = range(3, 7)  # the planted pair's dip layers (its bathtub verdict: start 3, recover 7)


def token_result(pair: PairInfo, *, planted: bool) -> PairResult:
    """Dominant datapoints of a pair, both sides, every layer of trace set ``a``.

    Planted: in the dip layers the descendant's top token is the sink ``<|bos|>`` at
    position 0, which also carries the massive activation there; elsewhere (and in
    the control) the top tokens are ordinary words at per-trace positions.
    """
    res = PairResult(info=pair, trace_sets=["a", "b"])
    for t in range(N_TRACES):
        trace = f"a:{t}"
        for layer in range(L + 1):
            for model in (pair.base, pair.descendant):
                sink = planted and model == pair.descendant and layer in DIP
                rows = [(0, 1, "<|bos|>", 5e3)] if sink else [(2 + t, 40, " the", 9.0)]
                rows.append((7 + t, 50 + t, f" w{t}", 2.0))
                for pos, tid, tok, proj in rows:
                    res.dominant.append(
                        DominantRecord(
                            pair.base, pair.descendant, trace, layer, model, pos, tid, tok, proj
                        )
                    )
                massive = (0,) if sink else ()
                res.massive.append(
                    MassiveRecord(
                        model, trace, layer, massive, 5e3 if sink else 3.0, (1,) * len(massive),
                        ("<|bos|>",) * len(massive),
                    )
                )  # fmt: skip
        # the second trace set is not the one the bathtub is judged on: never counted
        res.dominant.append(
            DominantRecord(pair.base, pair.descendant, f"b:{t}", 4, pair.base, 0, 99, "zz", 1e9)
        )
    return res


def _render(data: ReportData, *, width: int = 140, **kwargs: object) -> str:
    buffer = io.StringIO()
    console = make_console(buffer, width=width, environ={}, **kwargs)  # type: ignore[arg-type]
    render_terminal(data, console=console)
    return buffer.getvalue()


def test_ids_with_brackets_survive_and_every_pair_has_a_row() -> None:
    data = make_report_data()
    out = _render(data, color="no")
    assert BRACKET_ID in out
    assert "x[1]" in out
    assert "[of 10]" not in out  # a passing verdict's summary is not printed
    for pair in data.pairs:
        assert sum(pair.pair_id in line for line in out.splitlines()) >= 1
        assert pair.descendant in out
    findings_rows = [ln for ln in out.splitlines() if ln.strip().startswith("toy-base__")]
    # one findings-table row per toy-base pair (the FAIL explanation starts with "FAIL")
    assert len(findings_rows) == 6


def test_every_status_is_rendered_and_failures_explain_themselves() -> None:
    out = _render(make_report_data(), color="no")
    assert "pass (no)" in out
    assert "FAIL (yes, want no)" in out
    assert "observed (no)" in out
    assert "error (want yes)" in out
    assert " n/a " in out
    assert "FAIL toy-base__toy-sft-b final_layer_lowest: last layer 0.80 < min 0.82" in out
    assert "error toy-base__toy-rl-b trace_invariant: trace set [b] is empty" in out
    assert "only one trace set [a]" not in out  # n/a is not a problem worth a line


def test_group_verdict_table_shows_the_deciding_ratio_first() -> None:
    out = _render(make_report_data(), color="no")
    assert "base:toy-base" in out
    assert (
        "min_ratio=3, min_ratio_lo=2.5, ratio_threshold=2, sft_median=0.012, rl_median=0.004, "
        "n_sft=1, n_rl=2, p_value=0.002, effect=0.81" in out
    )
    assert "holds=" not in out and "summary=" not in out


def test_footer_lines_are_exact_and_never_wrapped() -> None:
    data = make_report_data()
    data.cache.caching_disabled_reason = "read-only file system: /cache"
    out = _render(data, color="no", width=60)
    lines = out.splitlines()
    assert (
        "reasondiff cache: activations 12 computed, 0 loaded; weight diffs 7 computed, 0 loaded;"
        f" metrics {data.cache.metrics_computed} computed, {data.cache.metrics_loaded} loaded"
        in lines
    )
    assert (
        "reasondiff stages: load 3.1s, activations 2.0s, metrics 1.2s, weight diffs 0.4s" in lines
    )
    assert any("caching was off" in ln and "read-only file system: /cache" in ln for ln in lines)
    assert lines[-3].startswith("reasondiff cache: ")


def test_no_ansi_with_color_no_and_ansi_with_color_yes() -> None:
    data = make_report_data()
    assert not ANSI.search(_render(data, color="no"))
    coloured = _render(data, color="yes")
    assert ANSI.search(coloured)
    assert "48;" in coloured  # heatmap cells are background colours
    assert BRACKET_ID in ANSI.sub("", coloured)


def test_auto_colour_honours_no_color_and_non_tty() -> None:
    class FakeTty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert color_wanted("auto", FakeTty(), {}) is True
    assert color_wanted("auto", FakeTty(), {"NO_COLOR": "1"}) is False
    assert color_wanted("auto", io.StringIO(), {}) is False
    assert color_wanted("auto", io.StringIO(), {"FORCE_COLOR": "1"}) is True
    assert color_wanted("auto", FakeTty(), {"TERM": "dumb"}) is False
    assert color_wanted("auto", FakeTty(), {"PY_COLORS": "0", "FORCE_COLOR": "1"}) is False
    assert color_wanted("yes", io.StringIO(), {"NO_COLOR": "1"}) is True
    buffer = FakeTty()
    console = make_console(buffer, color="auto", width=100, environ={"NO_COLOR": "1"})
    render_terminal(make_report_data(), console=console)
    assert not ANSI.search(buffer.getvalue())
    with pytest.raises(ValueError, match="color must be one of"):
        color_wanted("always", io.StringIO(), {})


def test_narrow_terminal_does_not_crash_and_keeps_ids() -> None:
    out = _render(make_report_data(adhoc=True), color="yes", width=60)
    plain = ANSI.sub("", out)
    assert "my-ckpt[v2]" in plain
    assert "group ad-hoc" in plain
    assert BRACKET_ID in plain.replace("\n", "")


def test_ascii_console_gets_ascii_glyphs() -> None:
    text = render_plain_summary(make_report_data(), ascii_only=True)
    text.encode("ascii")  # raises if any Unicode glyph leaked into an ASCII console
    assert "#" in text and "_" in text  # ASCII sparkline levels
    unicode_text = render_plain_summary(make_report_data())
    assert "█" in unicode_text and "▁" in unicode_text


def test_plain_summary_matches_console_content() -> None:
    data = make_report_data()
    plain = render_plain_summary(data, width=140)
    assert not ANSI.search(plain)
    assert plain.splitlines()[-2].startswith("reasondiff cache: ")
    assert all(line == line.rstrip() for line in plain.splitlines())
    assert "trace toy:7 truncated to 256 tokens [--max-tokens]" in plain


def test_planted_bathtub_row_shows_dip_and_sparkline() -> None:
    out = render_plain_summary(make_report_data())
    row = next(ln for ln in out.splitlines() if ln.lstrip().startswith("toy-massive "))
    assert "███▁▁▁▁████" in row  # linear CKA: the window bottoms on the fixed 0..1 axis
    assert row.rstrip().endswith("4")  # dip@ from the bathtub verdict's details


def test_empty_report_still_prints_footer() -> None:
    out = render_plain_summary(ReportData())
    assert "no model pairs were compared" in out
    assert (
        "reasondiff cache: activations 0 computed, 0 loaded; weight diffs 0 computed, 0 loaded"
        in out
    )
    assert "reasondiff stages" not in out


def test_console_from_rich_directly_is_accepted() -> None:
    buffer = io.StringIO()
    render_terminal(make_report_data(), console=Console(file=buffer, width=140, color_system=None))
    assert BRACKET_ID in buffer.getvalue()
    assert not ANSI.search(buffer.getvalue())


# ---------------------------------------------------------------- glyph helpers
def test_sparkline_uses_a_fixed_axis_and_marks_missing_values() -> None:
    glyphs = Glyphs.for_console(ascii_only=False)
    assert sparkline([0.0, 0.5, 1.0, -0.2, 1.3, math.nan], glyphs=glyphs) == "▁▅█▁█·"
    assert sparkline([0.98, 0.99], glyphs=glyphs) == "██"  # no per-row rescaling
    assert level(0.5, 8) == 4
    assert level(math.nan, 8) is None
    with pytest.raises(ValueError, match="empty axis"):
        level(0.5, 8, lo=1.0, hi=1.0)


def test_shades_keep_small_changes_visible() -> None:
    glyphs = Glyphs.for_console(ascii_only=True)
    assert shade(0.0, 1.0, glyphs=glyphs) == " "
    assert shade(1e-6, 1.0, glyphs=glyphs) == "."
    assert shade(1.0, 1.0, glyphs=glyphs) == "#"
    assert shade(math.nan, 1.0, glyphs=glyphs) == "?"
    assert ramp_rgb(0.0) == (68, 1, 84) and ramp_rgb(1.0) == (253, 231, 37)


def test_table_helpers() -> None:
    assert tables.component_label("self_attn.q_proj.bias") == "q_proj.bias"
    assert tables.component_label("post_attention_layernorm.weight") == "post_attn_norm"
    assert tables.component_order(["zeta", "mlp.down_proj.weight", "self_attn.q_proj.weight"]) == [
        "self_attn.q_proj.weight",
        "mlp.down_proj.weight",
        "zeta",
    ]
    curve = _curve("linear", [1.0, 0.9, 0.5, 0.7, 0.95, 0.1])
    assert tables.dip_layer(None, curve, 5) == 2  # final layer 5 excluded
    assert tables.fmt(math.nan) == "—" and tables.fmt(3) == "3" and tables.fmt(0.01234) == "0.0123"
    assert stages_line({}) is None
    assert cache_line(CacheStats(1, 2, 3, 4, 5, 6)) == (
        "reasondiff cache: activations 1 computed, 2 loaded; weight diffs 3 computed, 4 loaded;"
        " metrics 5 computed, 6 loaded"
    )


# ---------------------------------------------------------------- weight heatmap
def _panel_rows(text: str, title: str) -> list[str]:
    """The grid rows of the heatmap panel titled ``title`` (one panel per line block)."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if f"─ {title} " in ln)
    rows = []
    for ln in lines[start + 1 :]:
        if ln.startswith("╰"):
            break
        rows.append(ln)
    return rows


def test_heatmap_scales_each_pair_so_an_outlier_hides_no_other_pair() -> None:
    """The toy group's planted 2.0 once made SFT diffs of 0.2 print as uniform '░'."""
    data = ReportData()
    for desc, method in (("toy-massive", None), ("toy-sft-b", "SFT")):
        pid = f"toy-base__{desc}"
        data.pairs.append(PairInfo(pid, "toy-base", desc, "toy:base", f"toy:{desc}", method, "toy"))
        if desc == "toy-massive":
            comps = {"mlp.up_proj.weight": [0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.01, 0.0, 0.0]}
        else:
            comps = {"mlp.up_proj.weight": [0.1 + 0.01 * b for b in range(10)]}
        data.weight_layers[pid] = comps
    text = render_plain_summary(data, width=60)  # narrow: one panel per line block
    sft = "".join(_panel_rows(text, "toy-sft-b"))
    massive = "".join(_panel_rows(text, "toy-massive"))
    assert "█" in sft and "▓" in sft  # its own largest value is the darkest shade
    assert "toy-sft-b (max 0.19)" in text
    # massive's planted 2.0 is an outlier: saturated (marked), its scale is the rest's
    assert "toy-massive (scale 0..0.01; 1 saturated, up to 2)" in text
    assert "█" in massive  # block 7's small change is the top of massive's robust scale
    assert "block" in sft and "layer" not in sft  # the axis is the decoder block index
    flat = " ".join(text.split())
    assert "decoder block (columns, 0-based), each pair on its own robust linear scale" in flat
    assert "the scale's top (in its title); ▲ = above it" in flat
    assert "▲" in massive  # the saturated cell is marked, not the darkest shade


# ---------------------------------------------------------------- dominant tokens
def _token_lines(text: str, descendant: str) -> list[str]:
    """The dominant-token lines of one pair (each starts with its descendant's name)."""
    return [
        ln.strip()
        for ln in text.splitlines()
        if ln.strip().startswith(f"{descendant} ") and "dominant" in ln
    ]


def test_planted_pair_names_the_sink_token_in_its_dip() -> None:
    out = render_plain_summary(make_report_data(), width=200)
    dip, overlap = _token_lines(out, "toy-massive")
    assert dip == (
        "toy-massive dominant in dip (layers 3-6): '<|bos|>' 4/4 traces (position 0); "
        "' the' 4/4 traces (positions 2, 3, 4, ...); ' w0' 1/4 traces (position 7)"
    )
    # 2 of 4 dominant tokens per (trace, layer) are the descendant's; the sink carries the
    # massive activation in the dip layers only: 1 / 4 of the pooled dominant tokens there
    assert overlap == (
        "toy-massive share of dominant tokens with a massive activation (study ~0.4): "
        "layers 0-2 0.00, 3-6 0.25, 7-10 0.00"
    )
    assert "'zz'" not in out  # the second trace set is not counted


def test_a_pair_without_a_dip_gets_no_line_claiming_one() -> None:
    data = make_report_data()
    out = render_plain_summary(data, width=200)
    lines = _token_lines(out, "toy-copy")
    assert len(lines) == 2 and not any("in dip" in ln for ln in lines)
    assert lines[0].startswith("toy-copy dominant (no dip; all layers): ' the' 4/4 traces")
    assert "<|bos|>" not in " ".join(lines)
    # the dip line follows the verdict, not the records: no observed dip, no dip line
    pid = "toy-base__toy-massive"
    for v in data.verdicts:
        if (v.subject, v.finding) == (pid, "bathtub"):
            v.observed = False
    pair = next(p for p in data.pairs if p.pair_id == pid)
    bathtub = next(v for v in data.verdicts if (v.subject, v.finding) == (pid, "bathtub"))
    data.tokens[pid] = pair_tokens(token_result(pair, planted=True), bathtub)  # type: ignore[assignment]
    again = render_plain_summary(data, width=200)
    assert not any("in dip" in ln for ln in _token_lines(again, "toy-massive"))
    assert "toy-massive dominant (no dip; all layers): '<|bos|>'" in again


def test_token_lines_leave_the_other_lines_as_they_were() -> None:
    data = make_report_data()
    with_tokens = render_plain_summary(data, width=140).splitlines()
    data.tokens.clear()
    without = render_plain_summary(data, width=140).splitlines()
    added = [ln for ln in with_tokens if ln not in without]
    assert with_tokens[-2:] == without[-2:]  # the cache and stages lines
    assert [ln for ln in with_tokens if ln in without] == without
    assert len(added) == 5 and added[0].startswith("dominant tokens (top-k by |PC1 projection|")
