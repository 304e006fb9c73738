"""Figures render from a ReportData alone: valid PNGs on disk, and the matplotlib objects
have the expected panels and lines (checked on objects, never on pixels)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from test_reports_terminal import BRACKET_ID, COMPONENTS, make_report_data

from reasondiff.records import ReportData
from reasondiff.reports import figures
from reasondiff.reports.figures import FigureInfo, write_figures
from reasondiff.reports.index import md_code, md_text, write_index

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_TOY = 7  # pairs in the synthetic toy group
LOW_DPI = 40  # enough to prove a valid PNG; full resolution only costs test time


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[FigureInfo]]:
    """Write the figures once per module: saving PNGs is the slow part (about a second each)."""
    out = tmp_path_factory.mktemp("report")
    return out, write_figures(make_report_data(), out, dpi=LOW_DPI)


def _lines(fig: object) -> list[int]:
    return [len(ax.get_lines()) for ax in fig.axes]  # type: ignore[attr-defined]


def test_pngs_exist_are_valid_and_match_their_records(
    written: tuple[Path, list[FigureInfo]],
) -> None:
    out, infos = written
    assert [i.number for i in infos] == [1, 2, 3, 4, 5, 6]
    for info in infos:
        assert info.path is not None and info.path.parent == out
        data = info.path.read_bytes()
        assert len(data) > 500
        assert data.startswith(PNG_MAGIC)
        assert info.panels > 0 and info.lines > 0
        assert info.skipped is None


def test_figure_1_one_line_per_descendant_per_metric() -> None:
    fig = figures.build_figure_1(make_report_data())
    assert fig is not None
    assert len(fig.axes) == 2  # linear, RBF for the one group
    assert _lines(fig) == [N_TOY, N_TOY]
    assert [ax.get_title() for ax in fig.axes] == ["toy: linear CKA", "toy: RBF CKA"]
    assert all(len(ax.collections) == N_TOY for ax in fig.axes)  # interval bands


def test_figure_1_has_a_row_per_group() -> None:
    fig = figures.build_figure_1(make_report_data(adhoc=True))
    assert fig is not None
    assert _lines(fig) == [N_TOY, N_TOY, 1, 1]
    legend_labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "x[1] (?)" in legend_labels and "my/ckpt[v2] (RL)" in legend_labels


def test_figure_2_solid_and_dashed_per_descendant() -> None:
    fig = figures.build_figure_2(make_report_data())
    assert fig is not None
    (ax,) = fig.axes
    styles = [line.get_linestyle() for line in ax.get_lines()]
    assert styles.count("-") == N_TOY and styles.count("--") == N_TOY


def test_figure_3_one_panel_per_component() -> None:
    fig = figures.build_figure_3(make_report_data())
    assert fig is not None
    assert len(fig.axes) == len(COMPONENTS)
    assert _lines(fig) == [N_TOY] * len(COMPONENTS)
    assert fig.axes[0].get_title() == "q_proj"


def test_weight_axes_say_block_and_cka_axes_say_hidden_state_layer() -> None:
    """One layer numbering: weights by decoder block, CKA by hidden-state index."""
    data = make_report_data()
    fig3 = figures.build_figure_3(data)
    assert fig3 is not None
    xlabels = {ax.get_xlabel() for ax in fig3.axes} - {""}
    assert xlabels == {"block (0-based decoder block)"}
    assert "per decoder block" in fig3.get_suptitle()
    for build in (figures.build_figure_1, figures.build_figure_2, figures.build_figure_4):
        fig = build(data)
        assert fig is not None
        labels = {ax.get_xlabel() for ax in fig.axes} - {""}
        assert labels == {"layer (hidden state: 0 = embeddings, L = after final norm)"}, build


def test_figure_3_colours_by_base_when_there_are_several() -> None:
    data = make_report_data()
    for pair in data.pairs[:3]:
        pair.base = "other-base"
    fig = figures.build_figure_3(data)
    assert fig is not None
    colours = {line.get_color() for line in fig.axes[0].get_lines()}
    colours_as_tuples = {tuple(c) if not isinstance(c, str) else c for c in colours}
    assert len(colours_as_tuples) == 2


def test_figure_4_marks_the_prenorm_point() -> None:
    fig = figures.build_figure_4(make_report_data())
    assert fig is not None
    assert _lines(fig) == [2 * N_TOY, 2 * N_TOY]  # post-norm curve + pre-norm marker
    markers = [line.get_marker() for line in fig.axes[0].get_lines()]
    assert markers.count("D") == N_TOY


def test_figure_4_without_prenorm_curves_has_only_curves() -> None:
    data = make_report_data()
    for curves in data.curves.values():
        curves.pop("linear_prenorm")
        curves.pop("rbf_prenorm")
    fig = figures.build_figure_4(data)
    assert fig is not None
    assert _lines(fig) == [N_TOY, N_TOY]


def test_trace_invariance_figure_and_its_absence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fig = figures.build_figure_5(make_report_data())
    assert fig is not None
    assert _lines(fig) == [2 * N_TOY]
    data = make_report_data(trace_sets=False)
    assert figures.build_figure_5(data) is None
    monkeypatch.setattr(figures, "FIGURES", figures.FIGURES[4:5])  # only figure 5: fast
    infos = write_figures(data, tmp_path, dpi=LOW_DPI)
    (fig5,) = infos
    assert fig5.path is None and fig5.skipped is not None and "two trace sets" in fig5.skipped
    assert not (tmp_path / "fig5_trace_invariance.png").exists()
    index = write_index(data, tmp_path, infos).read_text(encoding="utf-8")
    assert "*Skipped:* curves for fewer than two trace sets" in index


def test_empty_report_skips_every_figure(tmp_path: Path) -> None:
    infos = write_figures(ReportData(), tmp_path / "nested" / "dir")
    assert all(i.path is None and i.skipped for i in infos)
    assert list((tmp_path / "nested" / "dir").iterdir()) == []


def test_figures_do_not_touch_pyplot_state() -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    figures.build_figure_1(make_report_data())
    assert plt.get_fignums() == before


def test_verdict_line_counts_statuses() -> None:
    line = figures.verdict_line(make_report_data().verdicts, ["final_layer_lowest"])
    assert line == ("final_layer_lowest: holds for 1/6 (toy-base__toy-sft-b); 5 pass, 1 FAIL")
    assert (
        figures.verdict_line([], ["bathtub"]) == "no verdicts recorded for this figure's findings"
    )


def test_index_links_figures_and_tabulates_findings(
    written: tuple[Path, list[FigureInfo]],
) -> None:
    out, infos = written
    data = make_report_data()
    text = write_index(data, out, infos).read_text(encoding="utf-8")
    for info in infos:
        assert info.path is not None
        assert f"]({info.path.name})" in text
    assert f"| {md_code(BRACKET_ID)} | x\\[1\\] |" in text
    assert "**FAIL (yes, want no)**" in text
    assert "reasondiff cache: activations 12 computed, 0 loaded" in text
    table_rows = [ln for ln in text.splitlines() if ln.startswith("| `")]
    assert len(table_rows) == N_TOY + 1  # 7 pairs + the group verdict row
    assert (
        f"- {md_code('toy-base__toy-massive')} dominant in dip (layers 3-6): "
        "'\\<\\|bos\\|\\>' 4/4 traces (position 0)" in text
    )
    copy_lines = [ln for ln in text.splitlines() if ln.startswith("- `toy-base__toy-copy`")]
    assert len(copy_lines) == 2 and not any("in dip" in ln for ln in copy_lines)


def test_markdown_escaping() -> None:
    assert md_text("a|b [c] __d__") == "a\\|b \\[c\\] \\_\\_d\\_\\_"
    assert md_code("x`y") == "`` x`y ``"


def test_write_figures_does_not_mutate_its_input(tmp_path: Path) -> None:
    data = make_report_data(trace_sets=False)
    before = copy.deepcopy(data)
    figures.build_figure_3(data)
    figures.build_figure_4(data)
    assert data == before


def test_figure_3_clips_a_saturated_point_and_marks_it() -> None:
    """A zero-base tensor's 2.0 must not flatten the other lines of its panel."""
    data = make_report_data()
    pid = data.pairs[0].pair_id
    comp = next(iter(data.weight_layers[pid]))
    values = list(data.weight_layers[pid][comp])
    others = [v for p in data.pairs for v in data.weight_layers[p.pair_id].get(comp, [])]
    values[2] = 2.0
    data.weight_layers[pid][comp] = values
    fig = figures.build_figure_3(data)
    assert fig is not None
    ax = next(a for a in fig.axes if a.get_title().startswith(figures.component_label(comp)))
    assert "1 saturated, up to 2" in ax.get_title()
    assert ax.get_ylim()[1] < 2.0  # the scale is the rest's, with headroom
    assert ax.get_ylim()[1] >= max(v for v in others if v < 2.0)
    markers = ax.collections[0].get_offsets()
    assert [float(x) for x, _ in markers] == [2.0]  # the saturated point, at its block


def test_figure_6_heatmap_names_the_sink_and_outlines_only_an_observed_dip() -> None:
    data = make_report_data()
    fig = figures.build_figure_6(data)
    assert fig is not None
    panels = [ax for ax in fig.axes if ax.get_images()]  # the colour bar is an axes too
    titles = [ax.get_title() for ax in panels]
    assert titles == ["toy-copy (no dip), 4 traces", "toy-massive (dip: layers 3-6), 4 traces"]
    copy_ax, massive_ax = panels
    assert len(copy_ax.get_lines()) == 0 and len(massive_ax.get_lines()) == 2  # dip edges
    assert [ln.get_xdata()[0] for ln in massive_ax.get_lines()] == [2.5, 6.5]
    labels = [t.get_text() for t in massive_ax.get_yticklabels()]
    assert labels[0] == "'<|bos|>'"
    shares = massive_ax.get_images()[0].get_array()
    assert list(shares[0]) == [1.0 if 3 <= lay <= 6 else 0.0 for lay in range(11)]
    assert "'<|bos|>'" not in [t.get_text() for t in copy_ax.get_yticklabels()]


def test_figure_6_token_labels_never_break_matplotlib() -> None:
    assert figures._tick_label("'$x$'") == "'\\$x\\$'"  # no mathtext
    assert figures._tick_label("'中'") == "'\\u4e2d'"  # no missing-glyph warning
    assert len(figures._tick_label("'" + "a" * 40 + "'")) == 18
    assert figures.build_figure_6(ReportData()) is None
