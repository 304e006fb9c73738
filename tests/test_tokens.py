"""Token naming: frequencies over traces, layer runs, massive overlap, the heatmap table."""

from __future__ import annotations

from reasondiff.records import DominantRecord, MassiveRecord
from reasondiff.tokens import (
    decode_each,
    dominant_tokens,
    format_layers,
    massive_overlap,
    quote_token,
    token_layer_shares,
)


def _rec(
    trace: str, layer: int, pos: int, tid: int, tok: str, proj: float, model: str = "d"
) -> DominantRecord:
    return DominantRecord("b", "d", trace, layer, model, pos, tid, tok, proj)


def _sink_rows(traces: int = 4) -> list[DominantRecord]:
    rows = []
    for t in range(traces):
        for lay in range(4, 8):
            rows.append(_rec(f"s:{t}", lay, 0, 7, "<|im_start|>", 1e4))
            rows.append(_rec(f"s:{t}", lay, 5 + t, 100 + t, f" w{t}", 3.0))
    return rows


def test_sink_token_is_named_first_with_its_layers() -> None:
    top = dominant_tokens(_sink_rows(), layers=range(4, 8))
    assert top[0].token == "<|im_start|>"
    assert (top[0].traces, top[0].total_traces, top[0].layers, top[0].positions) == (
        4,
        4,
        (4, 5, 6, 7),
        (0,),
    )
    assert top[0].line() == "'<|im_start|>' 4/4 traces, layers 4-7 (position 0)"
    # the other tokens are dominant in one trace each
    assert all(t.traces == 1 for t in top[1:])


def test_layer_filter_and_side_filter() -> None:
    rows = [*_sink_rows(), _rec("s:0", 2, 3, 9, "x", 50.0, model="b")]
    assert dominant_tokens(rows, layers=[2])[0].token == "x"
    assert dominant_tokens(rows, layers=[2], model="d") == []
    assert dominant_tokens(rows, layers=[9]) == []


def test_format_layers() -> None:
    assert format_layers([7, 4, 5, 6, 12]) == "4-7, 12"
    assert format_layers([3]) == "3"
    assert format_layers([]) == ""


def test_quote_keeps_whitespace_visible() -> None:
    assert quote_token(" the") == "' the'"
    assert quote_token("\n") == "'\\n'"


def test_decode_each_decodes_once_per_id() -> None:
    calls: list[list[int]] = []

    def decode(ids: list[int]) -> str:
        calls.append(ids)
        return f"<{ids[0]}>"

    assert decode_each(decode, [3, 3, 4]) == ["<3>", "<3>", "<4>"]
    assert calls == [[3], [4]]


def test_massive_overlap_per_layer() -> None:
    dom = [
        _rec("s:0", 4, 0, 7, "a", 1.0),
        _rec("s:0", 4, 5, 8, "b", 1.0),
        _rec("s:0", 5, 5, 8, "b", 1.0),
    ]
    mas = [MassiveRecord("d", "s:0", 4, (0,), 3e4), MassiveRecord("d", "s:0", 5, (), 1.0)]
    assert massive_overlap(dom, mas) == {4: 0.5, 5: 0.0}
    # another model's massive positions do not count
    assert massive_overlap(dom, [MassiveRecord("b", "s:0", 4, (0, 5), 3e4)]) == {4: 0.0, 5: 0.0}


def test_token_layer_shares() -> None:
    rows = [*_sink_rows(traces=2), _rec("s:0", 3, 0, 7, "<|im_start|>", 9.0)]
    tokens, layers, shares = token_layer_shares(rows, top=2)
    assert tokens[0] == "'<|im_start|>'" and layers == [3, 4, 5, 6, 7]
    assert shares[0] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert all(0.0 <= v <= 1.0 for row in shares for v in row)
