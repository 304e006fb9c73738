"""Trace sets: the JSONL format, its validation errors, truncation and re-tokenization."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reasondiff.errors import TokenizerMismatch, TraceError
from reasondiff.fixtures.toy_traces import build_toy_tokenizer, toy_trace_set
from reasondiff.traces import (
    Trace,
    TraceAppender,
    TraceSet,
    load_trace_set,
    read_partial,
    save_trace_set,
    token_ids_for_pair,
    tokenizer_identity,
    trace_set_generator,
    trace_set_hash,
    truncate,
)


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _row(tid: str = "t0", n: int = 6) -> dict[str, Any]:
    return {"id": tid, "text": "x" * n, "token_ids": list(range(10, 10 + n))}


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_toy_tokenizer()


# ---------------------------------------------------------------- round trip
def test_save_load_round_trip_keeps_everything(tmp_path: Path) -> None:
    ts = TraceSet(
        name="demo",
        traces=(Trace("a", "ä text", (1, 2, 3, 4)), Trace("b", "", (5, 6, 7, 8, 9))),
        tokenizer="sha256:abc",
    )
    path = tmp_path / "sub" / "demo.jsonl"
    save_trace_set(path, ts)
    assert load_trace_set(path) == ts
    assert [p.name for p in path.parent.iterdir()] == ["demo.jsonl"]  # no temp file left


def test_headerless_file_is_named_after_the_file_with_unknown_tokenizer(tmp_path: Path) -> None:
    ts = load_trace_set(_write(tmp_path / "mine.jsonl", [_row("a"), "", _row("b")]))
    assert (ts.name, ts.tokenizer, ts.ids) == ("mine", None, ["a", "b"])
    assert ts.traces[0].token_ids == (10, 11, 12, 13, 14, 15)


def test_save_is_atomic_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    save_trace_set(path, TraceSet("old", (Trace("a", "", (1, 2, 3, 4)),)))
    bad = TraceSet("new", (Trace("a", "", (1, 2, 3, 4)), Trace("b", object(), (1, 2, 3, 4))))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        save_trace_set(path, bad)
    assert load_trace_set(path).name == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


# ---------------------------------------------------------------- load errors
@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([_row("a"), "{not json"], r"bad\.jsonl:2: not valid JSON"),
        ([_row("a"), [1, 2]], r"bad\.jsonl:2: expected a JSON object, got list"),
        ([{"id": "a", "text": "t"}], r"bad\.jsonl:1: trace is missing key\(s\) token_ids"),
        (
            [{**_row("a"), "token_ids": [1, 2, "3", 4]}],
            r":1: trace 'a': token_ids\[2\] = '3' is not",
        ),
        (
            [{**_row("a"), "token_ids": [1, 2.5, 3, 4]}],
            r"token_ids\[1\] = 2\.5 is not a non-negative",
        ),
        ([{**_row("a"), "token_ids": [1, True, 3, 4]}], r"token_ids\[1\] = True is not"),
        ([{**_row("a"), "token_ids": [1, -2, 3, 4]}], r"token_ids\[1\] = -2 is not"),
        ([{**_row("a"), "token_ids": "1 2 3"}], r"'token_ids' must be a list, got str"),
        ([_row("a"), "", _row("a")], r"bad\.jsonl:3: duplicate trace id 'a' \(first on line 1\)"),
        ([{**_row("a"), "token_ids": []}], r":1: trace 'a' is empty"),
        ([_row("a", n=3)], r":1: trace 'a' has 3 tokens; at least 4 are needed"),
        ([{**_row("a"), "id": 7}], r":1: trace 'id' must be a non-empty string, got 7"),
        ([_row("a"), {"reasondiff_traces": 1}], r":2: the header line .* must come first"),
        ([{"reasondiff_traces": 9}], r":1: trace set format version 9 is not supported"),
        ([{"reasondiff_traces": 1, "name": "h"}], r"bad\.jsonl contains no traces"),
    ],
)
def test_bad_files_raise_trace_error_with_file_and_line(
    tmp_path: Path, rows: list[Any], message: str
) -> None:
    with pytest.raises(TraceError, match=message):
        load_trace_set(_write(tmp_path / "bad.jsonl", rows))


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"nowhere\.jsonl does not exist"):
        load_trace_set(tmp_path / "nowhere.jsonl")


# ---------------------------------------------------------------- hash, truncate
def test_hash_depends_on_ids_and_tokens_only() -> None:
    a = TraceSet("a", (Trace("x", "text", (1, 2, 3, 4)),), tokenizer="t1")
    same = TraceSet("b", (Trace("x", "other", (1, 2, 3, 4)),), tokenizer="t2")
    other_tokens = TraceSet("a", (Trace("x", "text", (1, 2, 3, 5)),))
    other_id = TraceSet("a", (Trace("y", "text", (1, 2, 3, 4)),))
    # "1,23" vs "12,3" must not collide
    split = TraceSet("a", (Trace("x", "", (1, 23)),))
    joined = TraceSet("a", (Trace("x", "", (12, 3)),))
    assert trace_set_hash(a) == trace_set_hash(same)
    assert len({trace_set_hash(s) for s in (a, other_tokens, other_id)}) == 3
    assert trace_set_hash(split) != trace_set_hash(joined)


def test_truncate_cuts_long_traces_and_names_each_in_a_note() -> None:
    ts = TraceSet("s", (Trace("short", "", tuple(range(5))), Trace("long", "", tuple(range(9)))))
    out, notes = truncate(ts, 6)
    assert [len(t) for t in out.traces] == [5, 6]
    assert out.traces[1].token_ids == (0, 1, 2, 3, 4, 5)
    assert notes == [
        "trace 'long' of set 's' has 9 tokens; truncated to the first 6 (--max-tokens)"
    ]
    assert truncate(ts, 9) == (ts, [])
    with pytest.raises(TraceError, match="--max-tokens 3 is too small"):
        truncate(ts, 3)


# ---------------------------------------------------------------- tokenizer identity
def test_tokenizer_identity_survives_save_and_load(tmp_path: Path, tok: Any) -> None:
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    assert tokenizer_identity(AutoTokenizer.from_pretrained(tmp_path)) == tokenizer_identity(tok)


def test_tokenizer_identity_changes_with_the_vocabulary(tok: Any) -> None:
    other = build_toy_tokenizer()
    other.add_tokens(["Solution"])
    assert tokenizer_identity(other) != tokenizer_identity(tok)


# ---------------------------------------------------------------- token ids for a pair
def _pair(
    ts: TraceSet, base: Any, desc: Any, vb: int | None = 832, vd: int | None = 832
) -> TraceSet:
    return _pair_notes(ts, base, desc, vb, vd)[0]


def _pair_notes(
    ts: TraceSet, base: Any, desc: Any, vb: int | None = 832, vd: int | None = 832
) -> tuple[TraceSet, list[str]]:
    return token_ids_for_pair(
        ts, base, desc, base_name="B", desc_name="D", vocab_size_base=vb, vocab_size_desc=vd
    )


def _swapped_tokenizer(a: str, b: str) -> Any:
    """The toy tokenizer with the ids of tokens ``a`` and ``b`` exchanged."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(build_toy_tokenizer().backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))


def test_same_tokenizer_keeps_stored_ids(tok: Any) -> None:
    ts = toy_trace_set("a", tokenizer=tok)
    # stored ids are authoritative when the identity matches (no re-tokenization)
    doctored = TraceSet(ts.name, (Trace("z", "", (1, 7, 8, 9)), *ts.traces[1:]), ts.tokenizer)
    out, notes = _pair_notes(doctored, tok, tok)
    assert out.traces[0].token_ids == (1, 7, 8, 9)
    assert out.tokenizer == tokenizer_identity(tok)
    assert notes == []


def test_unknown_tokenizer_keeps_stored_ids_that_spell_the_text(tok: Any) -> None:
    # Not the canonical split: "Step" spelled byte by byte. Valid tokens of the base
    # that spell the text, so they stay -- re-encoding would merge them.
    text = "<|bos|>Step 1: 12 + 30 = 42."
    canonical = tuple(tok(text, add_special_tokens=False)["input_ids"])
    by_bytes = (canonical[0], *tok.convert_tokens_to_ids(list("Step")), *canonical[2:])
    assert by_bytes != canonical and tok.decode(list(by_bytes)) == text
    ts = TraceSet("s", (Trace("t", text, by_bytes),), tokenizer=None)
    out, notes = _pair_notes(ts, tok, None)
    assert out.traces[0].token_ids == by_bytes
    assert notes == []
    other_header = TraceSet("s", ts.traces, tokenizer="sha256:0123456789abcdef")
    assert _pair(other_header, tok, tok).traces[0].token_ids == by_bytes


def test_ids_that_are_other_tokens_for_the_base_are_retokenized_with_a_note(tok: Any) -> None:
    text = "<|bos|>Step 1: 12 + 30 = 42."
    ts = TraceSet("s", (Trace("t", text, (9, 9, 9, 9)),), tokenizer=None)
    out, notes = _pair_notes(ts, tok, None)
    assert out.traces[0].token_ids == tuple(tok(text, add_special_tokens=False)["input_ids"])
    assert out.traces[0].token_ids[0] == tok.bos_token_id
    assert out.tokenizer == tokenizer_identity(tok)
    assert len(notes) == 1
    assert "trace 't' of set 's'" in notes[0] and "base 'B'" in notes[0]
    assert "re-tokenized" in notes[0] and "4 -> 19 tokens" in notes[0]


def test_descendant_tokenizer_differing_only_in_unused_tokens_agrees(tok: Any) -> None:
    # The descendant reads "12" as one token when it encodes text, but it maps every id
    # the trace uses to the same token as the base: no mismatch (re-encoding said there
    # was one).
    desc = build_toy_tokenizer()
    desc.add_tokens(["12"])
    assert tokenizer_identity(desc) != tokenizer_identity(tok)
    ts = toy_trace_set("a", tokenizer=tok)
    out, notes = _pair_notes(ts, tok, desc)
    assert [t.token_ids for t in out.traces] == [t.token_ids for t in ts.traces]
    assert notes == []


def test_descendant_that_maps_a_used_id_to_another_token_is_a_mismatch(tok: Any) -> None:
    desc = _swapped_tokenizer("1", "2")
    ts = TraceSet(
        "s",
        (Trace("t7", "<|bos|>Step 1: 12 + 30 = 42.", ()),),
        tokenizer=None,
    )
    msg = (
        r"base 'B' and descendant 'D' disagree on trace 't7' at position 3: "
        r"token id 55 is '1' for the base and '2' for the descendant"
    )
    with pytest.raises(TokenizerMismatch, match=msg):
        _pair(ts, tok, desc)


def test_descendant_tokenizer_with_extra_unused_tokens_is_accepted(tok: Any) -> None:
    desc = build_toy_tokenizer()
    desc.add_tokens(["<tool_call>"])  # other identity, same ids on these texts
    ts = toy_trace_set("b", tokenizer=tok)
    out = _pair(ts, tok, desc)
    assert [t.token_ids for t in out.traces] == [t.token_ids for t in ts.traces]


def test_ids_beyond_a_models_vocabulary_are_named(tok: Any) -> None:
    ts = TraceSet("s", (Trace("t3", "", (1, 5, 250, 7)),), tokenizer=tokenizer_identity(tok))
    msg = r"trace 't3': token id 250 at position 2 is outside the vocabulary of model 'D' \(vocab size 200\)"
    with pytest.raises(TraceError, match=msg):
        _pair(ts, tok, tok, vb=256, vd=200)
    assert _pair(ts, tok, tok, vb=None, vd=None).traces[0].token_ids == (1, 5, 250, 7)


def test_retokenized_trace_too_short_is_refused_and_textless_ids_are_kept(tok: Any) -> None:
    short = TraceSet("s", (Trace("t", "<|bos|>1", (1, 2, 3, 4)),))
    with pytest.raises(TraceError, match=r"trace 't' re-tokenized for model 'B' has 2 tokens"):
        _pair(short, tok, tok)
    empty = TraceSet("s", (Trace("e", "", (1, 2, 3, 4)),))
    out, notes = _pair_notes(empty, tok, tok)
    assert out.traces[0].token_ids == (1, 2, 3, 4)
    assert len(notes) == 1 and "trace 'e' of set 's' has no text" in notes[0]


# ---------------------------------------------------------------- resumable writing
def _provenance_header(name: str = "s") -> dict:
    return {
        "reasondiff_traces": 1,
        "name": name,
        "tokenizer": "sha256:abc",
        "generator": {"key": "m", "source": "org/m", "fingerprint": "f" * 64},
    }


def test_appender_writes_the_header_then_whole_lines(tmp_path: Path) -> None:
    out = tmp_path / "d" / "s.jsonl"
    assert read_partial(out) is None
    t1 = Trace("a", "x", (1, 2, 3, 4))
    with TraceAppender(out, _provenance_header()) as app:
        app.append(t1)
        assert out.read_text().count("\n") == 2  # on disk before the file is closed
    part = read_partial(out)
    assert part is not None and part.traces == (t1,) and part.notes == ()
    assert part.header["generator"]["key"] == "m" and part.good_bytes == out.stat().st_size


def test_read_partial_drops_only_a_half_written_last_line(tmp_path: Path) -> None:
    out = tmp_path / "s.jsonl"
    with TraceAppender(out, _provenance_header()) as app:
        app.append(Trace("a", "x", (1, 2, 3, 4)))
    whole = out.stat().st_size
    with out.open("a") as fh:
        fh.write('{"id": "b", "text": "y", "token_ids": [1, 2')
    part = read_partial(out)
    assert part is not None and [t.id for t in part.traces] == ["a"]
    assert part.good_bytes == whole and "dropped a half-written last line" in part.notes[0]
    with TraceAppender(out, {}, keep_bytes=part.good_bytes) as app:  # resume cuts it off
        app.append(Trace("b", "y", (5, 6, 7, 8)))
    assert [t.id for t in load_trace_set(out).traces] == ["a", "b"]

    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + "not json\n" + lines[2])  # damage in the middle: refused
    with pytest.raises(TraceError, match=r"s\.jsonl:2: not a trace set line; cannot resume"):
        read_partial(out)
    out.write_text('{"reasondiff_traces": 1, "na')  # killed while writing the header
    part = read_partial(out)
    assert part is not None and part.header == {} and part.good_bytes == 0


def test_read_partial_refuses_a_file_without_provenance(tmp_path: Path) -> None:
    out = tmp_path / "s.jsonl"
    out.write_text('{"id": "a", "text": "x", "token_ids": [1, 2, 3, 4]}\n')
    with pytest.raises(TraceError, match="was not written by reasondiff-traces"):
        read_partial(out)


def test_provenance_round_trips_and_names_the_generator(tmp_path: Path) -> None:
    ts = TraceSet("s", (Trace("a", "x", (1, 2, 3, 4)),), tokenizer="sha256:abc")
    assert trace_set_generator(ts) == "unknown (no provenance in the trace set's header)"
    header = _provenance_header()
    prov = {k: v for k, v in header.items() if k not in ("reasondiff_traces", "name", "tokenizer")}
    save_trace_set(tmp_path / "s.jsonl", TraceSet("s", ts.traces, "sha256:abc", provenance=prov))
    back = load_trace_set(tmp_path / "s.jsonl")
    assert back.provenance == prov
    assert trace_set_generator(back) == "m (org/m, fingerprint ffffffffffff)"
