"""Results bundle: write, read back exactly, and refuse broken bundles clearly."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from reasondiff import bundle_writer as bundle_mod
from reasondiff.bundle import atomic_write_text, bundle_schema, read_bundle, write_bundle
from reasondiff.errors import BundleError
from reasondiff.records import (
    CkaRecord,
    DominantRecord,
    MassiveRecord,
    PairInfo,
    PairResult,
    Verdict,
    WeightRecord,
)

#: Token texts a CSV must carry unchanged: a leading space, a separator, quotes, a
#: newline, a special token and non-ASCII text.
TRICKY_TOKENS = ("<|bos|>", ' a;"b",', "\n", " ", "▁über")


def _info(desc: str, method: str | None = "SFT") -> PairInfo:
    return PairInfo(
        pair_id=f"toy-base--{desc}",
        base="toy-base",
        descendant=desc,
        base_source="toy:base",
        descendant_source=f"toy:{desc}",
        method=method,
        group="toy",
        expect={"bathtub": True, "trace_invariant": True},
        num_layers=4,
    )


def _result(desc: str, seed: int) -> PairResult:
    rng = np.random.default_rng(seed)
    weights = [
        WeightRecord(
            "toy-base",
            desc,
            f"model.layers.{i}.mlp.up_proj.weight",
            i,
            "mlp.up_proj.weight",
            (64, 128),
            float(rng.random()) / 3,  # floats that need all 17 digits
            float(rng.random()),
            float(rng.random()) * 1e-7,
        )
        for i in range(4)
    ]
    weights += [
        WeightRecord(
            "toy-base",
            desc,
            "lm_head.weight",
            -1,
            "lm_head.weight",
            (10, 64),
            math.nan,
            math.nan,
            math.nan,
            "tied",
        ),
        WeightRecord(
            "toy-base", desc, "scale", -1, "scale", (), 0.0, 0.0, 0.0, "renamed:old, name"
        ),
    ]
    cka = [
        CkaRecord("toy-base", desc, f"{s}:{t}", layer, metric, float(rng.random()))
        for s in ("a", "b")
        for t in range(2)
        for layer in range(5)
        for metric in ("linear", "rbf")
    ]
    massive = [
        MassiveRecord("toy-base", "a:0", 2, (0,), 3.6e4, (1,), ("<|bos|>",)),
        MassiveRecord(desc, "a:0", 2, (0, 17), 1234.5, (1, 40), ("<|bos|>", ' a;"b",')),
        MassiveRecord(desc, "a:1", 3, (), 12.0),
    ]
    dominant = [
        DominantRecord(
            "toy-base",
            desc,
            trace,
            2,
            model,
            pos,
            10 + pos,
            TRICKY_TOKENS[(pos + j) % len(TRICKY_TOKENS)],
            float(rng.random()) * 1e3,
        )
        for trace in ("a:0", "a:1")
        for j, model in enumerate(("toy-base", desc))
        for pos in (0, 2, 4)
    ]
    res = PairResult(
        _info(desc), weights, cka, massive, ["a", "b"], ["trace a:1 truncated to 300 tokens"]
    )
    res.dominant = dominant
    return res


VERDICTS = [
    Verdict(
        "bathtub",
        "toy-base--toy-massive",
        True,
        True,
        "bathtub ...",
        {"depth": 0.98, "band": (0.15, 0.85)},
    ),
    Verdict("weight_distributed", "toy-base--toy-copy", None, None, "no weight change", {}),
    Verdict(
        "sft_more_than_rl",
        "base:toy-base",
        False,
        True,
        "SFT does not change more",
        {"p": np.float64(0.2)},
    ),
]


def _records_equal(a: Any, b: Any) -> bool:
    """Dataclass equality where NaN equals NaN (NaN marks 'not comparable' tensors)."""
    if type(a) is not type(b):
        return False
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            continue
        if x != y:
            return False
    return True


def _assert_same_results(got: list[PairResult], want: list[PairResult]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.info == w.info and g.trace_sets == w.trace_sets and g.notes == w.notes
        for field in ("weights", "cka", "massive", "dominant"):
            gl, wl = getattr(g, field), getattr(w, field)
            assert len(gl) == len(wl), field
            assert all(_records_equal(x, y) for x, y in zip(gl, wl, strict=True)), field


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, list[PairResult]]:
    results = [_result("toy-massive", 1), _result("toy-copy", 2)]
    write_bundle(
        tmp_path / "bundle",
        results,
        VERDICTS,
        config={"delta": 0.1, "layers": None},
        versions={"torch": "9.9"},
    )
    return tmp_path / "bundle", results


def test_round_trip_is_exact(written: tuple[Path, list[PairResult]]) -> None:
    out, results = written
    got = read_bundle(out)
    _assert_same_results(got.results, results)
    assert [v.to_dict() for v in got.verdicts] == [
        {**v.to_dict(), "details": json.loads(json.dumps(v.details, default=float))}
        for v in VERDICTS
    ]
    assert [v.status for v in got.verdicts] == ["pass", "n/a", "fail"]
    assert got.config == {"delta": 0.1, "layers": None}
    assert (
        got.versions["torch"] == "9.9"
        and "python" in got.versions
        and "transformers" in got.versions
    )


def test_written_files_have_exact_columns(written: tuple[Path, list[PairResult]]) -> None:
    out, _ = written
    with (out / "weights.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == [
        "base", "descendant", "tensor", "block", "component", "shape",
        "normalized_diff", "relative_diff", "mean_abs_diff", "note",
    ]  # fmt: skip
    assert rows[1][5] == "64x128" and rows[5][6] == "nan" and rows[6][5] == ""
    assert (out / "cka.csv").read_text().splitlines()[
        0
    ] == "base,descendant,trace,layer,metric,value"
    with (out / "massive.csv").open(newline="") as f:
        massive = list(csv.reader(f))
    assert massive[0] == ["model", "trace", "layer", "positions", "max_abs", "token_ids", "tokens"]
    assert [
        "toy-massive",
        "a:0",
        "2",
        "0;17",
        "1234.5",
        "1;40",
        '["<|bos|>", " a;\\"b\\","]',
    ] in massive
    assert massive.count(["toy-base", "a:0", "2", "0", "36000.0", "1", '["<|bos|>"]']) == 1
    assert ["toy-massive", "a:1", "3", "", "12.0", "", ""] in massive  # nothing to name
    with (out / "dominant.csv").open(newline="") as f:
        dominant = list(csv.reader(f))
    assert dominant[0] == [
        "base", "descendant", "trace", "layer", "model", "position", "token_id", "token",
        "projection",
    ]  # fmt: skip
    assert len(dominant) == 1 + 2 * 12  # per pair: 2 traces x 2 sides x 3 positions
    assert {row[7] for row in dominant[1:]} == set(TRICKY_TOKENS)  # text written as is
    doc = json.loads((out / "results.json").read_text())
    assert doc["format"] == "reasondiff-bundle" and doc["version"] == 2
    assert (
        doc["verdicts"][0]["status"] == "pass"
        and doc["pairs"][1]["info"]["descendant"] == "toy-copy"
    )
    assert not list(out.glob(".*.tmp"))


def test_rows_are_matched_to_pairs_by_names(written: tuple[Path, list[PairResult]]) -> None:
    out, _ = written
    # Reverse the CSV rows: each pair must still get exactly its own rows.
    lines = (out / "cka.csv").read_text().splitlines()
    (out / "cka.csv").write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    got = {r.info.descendant: r for r in read_bundle(out).results}
    assert {c.descendant for c in got["toy-copy"].cka} == {"toy-copy"}
    assert len(got["toy-copy"].cka) == len(got["toy-massive"].cka) == 40
    assert got["toy-copy"].cka[0].trace == "b:1"


def test_a_bundle_without_dominant_csv_or_token_columns_replays(
    written: tuple[Path, list[PairResult]],
) -> None:
    """An older bundle: no dominant.csv, massive.csv without the token columns, and a
    results.json whose file record knows neither."""
    out, results = written
    (out / "dominant.csv").unlink()
    with (out / "massive.csv").open(newline="") as f:
        rows = [row[:5] for row in csv.reader(f)]
    with (out / "massive.csv").open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    doc = json.loads((out / "results.json").read_text())
    del doc["files"]["dominant.csv"]
    doc["files"]["massive.csv"] = bundle_mod.file_manifest((out / "massive.csv").read_bytes())
    (out / "results.json").write_text(json.dumps(doc))
    got = read_bundle(out)
    assert got.notes == []
    assert all(r.dominant == [] for r in got.results)
    massive = got.results[0].massive
    assert [(m.positions, m.token_ids, m.tokens) for m in massive][:2] == [
        ((0,), (), ()),
        ((0, 17), (), ()),
    ]
    assert len(got.results[0].cka) == len(results[0].cka)


def test_a_dominant_csv_recorded_but_missing_is_named_and_replays_once_refreshed(
    written: tuple[Path, list[PairResult]],
) -> None:
    """Like every listed CSV (issue 15.2): an error naming it; after a deliberate removal
    and ``refresh_manifest`` the bundle replays without dominant rows."""
    from reasondiff.bundle import refresh_manifest

    out, _ = written
    (out / "dominant.csv").unlink()
    with pytest.raises(BundleError, match=r"dominant[.]csv: missing from the bundle"):
        read_bundle(out)
    refresh_manifest(out)
    got = read_bundle(out)
    assert all(r.dominant == [] for r in got.results)


@pytest.mark.parametrize(
    ("fname", "column", "bad", "message"),
    [
        ("massive.csv", 5, "1;2;3", "3 ids for 2 positions"),
        ("massive.csv", 6, "not json", "is not a JSON list of strings"),
        ("dominant.csv", 4, "someone-else", "neither base 'toy-base' nor descendant"),
        ("dominant.csv", 6, "x", "column 'token_id': 'x' is not an integer"),
    ],
)
def test_bad_token_columns_are_named(
    written: tuple[Path, list[PairResult]], fname: str, column: int, bad: str, message: str
) -> None:
    out, _ = written
    with (out / fname).open(newline="") as f:
        rows = list(csv.reader(f))
    # massive.csv: the descendant's row with two positions; dominant.csv: the first row
    line = 1 if fname == "dominant.csv" else rows.index(next(r for r in rows if r[3] == "0;17"))
    rows[line][column] = bad
    with (out / fname).open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    bundle_mod.refresh_manifest(out)
    with pytest.raises(BundleError, match=f"{fname} line .*{message}"):
        read_bundle(out)


def test_massive_csv_is_optional(written: tuple[Path, list[PairResult]]) -> None:
    from reasondiff.bundle import refresh_manifest

    out, results = written
    (out / "massive.csv").unlink()
    refresh_manifest(out)  # removed on purpose: results.json no longer lists it
    got = read_bundle(out)
    assert all(r.massive == [] for r in got.results)
    assert len(got.results[0].cka) == len(results[0].cka)


def test_bundles_from_other_tools_bom_crlf_extra_columns(
    written: tuple[Path, list[PairResult]],
) -> None:
    out, results = written
    lines = (out / "cka.csv").read_text().splitlines()
    lines = [lines[0] + ",comment", *(line + ",hi" for line in lines[1:])]
    (out / "cka.csv").write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())
    got = read_bundle(out)
    _assert_same_results(got.results, results)


def _replace_line(path: Path, lineno: int, old: str, new: str) -> None:
    lines = path.read_text().splitlines()
    assert old in lines[lineno - 1]
    lines[lineno - 1] = lines[lineno - 1].replace(old, new, 1)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("fname", "lineno", "old", "new", "match"),
    [
        (
            "cka.csv",
            1,
            "metric,",
            "measure,",
            r"cka\.csv line 1: missing column\(s\) metric; required columns: base, descendant, trace, layer, metric, value",
        ),
        (
            "weights.csv",
            1,
            ",normalized_diff",
            ",norm_diff",
            r"weights\.csv line 1: missing column\(s\) normalized_diff; required columns: base, descendant, tensor, normalized_diff",
        ),
        (
            "weights.csv",
            2,
            "toy-base,toy-massive,model.layers.0.mlp.up_proj.weight,0,",
            "toy-base,toy-massive,model.layers.0.mlp.up_proj.weight,zero,",
            r"weights\.csv line 2: column 'block': 'zero' is not an integer",
        ),
        (
            "cka.csv",
            3,
            ",rbf,0.",
            ",rbf,x0.",
            r"cka\.csv line 3: column 'value': 'x0\.\d+' is not a number",
        ),
        (
            "weights.csv",
            2,
            "64x128",
            "64 by 128",
            r"weights\.csv line 2: column 'shape': '64 by 128' is not a shape like 64x128",
        ),
        (
            "cka.csv",
            4,
            "toy-base,toy-massive",
            "toy-base,toy-unknown",
            r"cka\.csv line 4: base='toy-base', descendant='toy-unknown' is not a pair in results\.json \(known pairs: toy-base/toy-massive, toy-base/toy-copy\)",
        ),
        (
            "massive.csv",
            2,
            "toy-base",
            "stranger",
            r"massive\.csv line 2: model 'stranger' is neither base nor descendant",
        ),
        ("massive.csv", 3, "0;17", "0;x", r"massive\.csv line 3: column 'positions'"),
    ],
)
def test_validation_errors_name_file_line_and_expectation(
    written: tuple[Path, list[PairResult]], fname: str, lineno: int, old: str, new: str, match: str
) -> None:
    out, _ = written
    _replace_line(out / fname, lineno, old, new)
    with pytest.raises(BundleError, match=match):
        read_bundle(out)


def test_bad_layer_integer_is_named(written: tuple[Path, list[PairResult]]) -> None:
    out, _ = written
    _replace_line(out / "cka.csv", 2, "a:0,0,", "a:0,zero,")
    with pytest.raises(
        BundleError, match=r"cka\.csv line 2: column 'layer': 'zero' is not an integer"
    ):
        read_bundle(out)


def test_missing_weights_file_is_named(written: tuple[Path, list[PairResult]]) -> None:
    out, _ = written
    (out / "weights.csv").unlink()
    with pytest.raises(BundleError, match=r"weights\.csv: missing from the bundle"):
        read_bundle(out)


def test_broken_results_json(written: tuple[Path, list[PairResult]], tmp_path: Path) -> None:
    out, _ = written
    doc = json.loads((out / "results.json").read_text())
    del doc["pairs"][0]["info"]["descendant_source"]
    (out / "results.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=r"pairs\[0\]\.info: missing key\(s\) descendant_source"):
        read_bundle(out)
    (out / "results.json").write_text("{not json")
    with pytest.raises(BundleError, match="not readable JSON"):
        read_bundle(out)
    with pytest.raises(BundleError, match="does not exist"):
        read_bundle(tmp_path / "nowhere")


def test_duplicate_pairs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="same pair"):
        write_bundle(tmp_path, [_result("x", 1), _result("x", 2)], [], config={})


def test_schema_lists_the_written_columns(written: tuple[Path, list[PairResult]]) -> None:
    out, _ = written
    schema = bundle_schema()["files"]
    for name in ("weights.csv", "cka.csv", "massive.csv"):
        header = (out / name).read_text().splitlines()[0].split(",")
        assert header == list(schema[name]["columns"])
    assert schema["weights.csv"]["required"] is True
    assert not any(schema[n]["required"] for n in ("cka.csv", "massive.csv", "results.json"))
    assert schema["weights.csv"]["required_columns"] == [
        "base", "descendant", "tensor", "normalized_diff",
    ]  # fmt: skip


def test_interrupted_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "results.json"
    target.write_text("old")

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(bundle_mod.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new" * 1000)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    monkeypatch.undo()
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["results.json"]


def test_bundle_files_are_readable_like_any_new_file(tmp_path: Path) -> None:
    """mkstemp creates 0600 files; bundle files get the mode ``open()`` would give."""
    import os

    from reasondiff.bundle import atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "x.csv", "a\n")
    finally:
        os.umask(mask)
    assert (tmp_path / "x.csv").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------ format versions and imports
def test_version_1_bundle_with_a_layer_column_is_still_read(
    written: tuple[Path, list[PairResult]],
) -> None:
    """Version 1 named the block column ``layer``; the numbers mean the same."""
    out, results = written
    _replace_line(out / "weights.csv", 1, ",block,", ",layer,")
    doc = json.loads((out / "results.json").read_text())
    doc["version"] = 1
    (out / "results.json").write_text(json.dumps(doc))
    got = read_bundle(out)
    _assert_same_results(got.results, results)
    assert [w.block for w in got.results[0].weights][:4] == [0, 1, 2, 3]


def test_a_newer_bundle_version_is_refused_by_name(written: tuple[Path, list[PairResult]]) -> None:
    out, _ = written
    doc = json.loads((out / "results.json").read_text())
    doc["version"] = 3
    (out / "results.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=r"version 3; this reasondiff reads .* versions 1 to 2"):
        read_bundle(out)


def test_weights_only_import_infers_pairs_blocks_components_and_layer_count(
    tmp_path: Path,
) -> None:
    """Another tool's per-tensor CSV: four columns, no cka.csv, no results.json."""
    (tmp_path / "weights.csv").write_text(
        "base,descendant,tensor,normalized_diff,relative_diff\n"
        "Qwen/Qwen2.5-Math-7B,sail/Qwen2.5-Math-7B-Oat-Zero,model.layers.0.mlp.up_proj.weight,0.002,\n"
        "Qwen/Qwen2.5-Math-7B,sail/Qwen2.5-Math-7B-Oat-Zero,model.layers.27.self_attn.q_proj.bias,0.003,0.5\n"
        "Qwen/Qwen2.5-Math-7B,sail/Qwen2.5-Math-7B-Oat-Zero,model.embed_tokens.weight,0.001,\n"
        "Qwen/Qwen2.5-Math-7B,deepseek-ai/DeepSeek-R1-Distill-Qwen-7B,model.layers.3.mlp.down_proj.weight,0.2,\n"
    )
    got = read_bundle(tmp_path)
    assert got.verdicts == [] and got.config == {}
    rl, sft = got.results
    assert rl.info == PairInfo(
        "qwen-qwen2.5-math-7b__sail-qwen2.5-math-7b-oat-zero",
        "Qwen/Qwen2.5-Math-7B",
        "sail/Qwen2.5-Math-7B-Oat-Zero",
        "Qwen/Qwen2.5-Math-7B",
        "sail/Qwen2.5-Math-7B-Oat-Zero",
        num_layers=28,  # blocks 0..27 seen
    )
    assert [(w.block, w.component) for w in rl.weights] == [
        (0, "mlp.up_proj.weight"),
        (27, "self_attn.q_proj.bias"),
        (-1, "model.embed_tokens.weight"),
    ]
    assert [w.normalized_diff for w in rl.weights] == [0.002, 0.003, 0.001]
    assert math.isnan(rl.weights[0].relative_diff) and rl.weights[1].relative_diff == 0.5
    assert all(math.isnan(w.mean_abs_diff) and w.note == "" and w.shape == () for w in rl.weights)
    assert rl.cka == [] and rl.trace_sets == [] and sft.info.num_layers == 4


def test_import_with_empty_block_column_and_cka_rows_infers_from_names_and_rows(
    tmp_path: Path,
) -> None:
    (tmp_path / "weights.csv").write_text(
        "base,descendant,tensor,block,component,shape,normalized_diff,relative_diff,mean_abs_diff,note\n"
        "b,d,model.layers.1.mlp.up_proj.weight,,,4x2,0.1,,,\n"
        "b,d,model.norm.weight,-1,final norm,,0.2,,,\n"
    )
    (tmp_path / "cka.csv").write_text(
        "base,descendant,trace,layer,metric,value\n"
        + "".join(f"b,d,s:t0,{layer},linear,1.0\n" for layer in range(6))
    )
    (res,) = read_bundle(tmp_path).results
    assert [(w.block, w.component, w.shape) for w in res.weights] == [
        (1, "mlp.up_proj.weight", (4, 2)),
        (-1, "final norm", ()),
    ]
    assert res.info.num_layers == 5 and res.trace_sets == ["s"]  # L = largest hidden state


def test_results_json_without_method_group_or_layer_count(
    written: tuple[Path, list[PairResult]],
) -> None:
    """The reader treats method, group and num_layers as optional: so must PairInfo."""
    out, results = written
    doc = json.loads((out / "results.json").read_text())
    for p in doc["pairs"]:
        for key in ("method", "group", "num_layers", "expect"):
            del p["info"][key]
    (out / "results.json").write_text(json.dumps(doc))
    got = read_bundle(out).results
    assert [(r.info.method, r.info.group, r.info.expect) for r in got] == [(None, None, {})] * 2
    assert [r.info.num_layers for r in got] == [4, 4]  # from cka.csv: hidden states 0..4
    assert len(got[0].cka) == len(results[0].cka)


def test_cka_csv_is_optional(written: tuple[Path, list[PairResult]]) -> None:
    from reasondiff.bundle import refresh_manifest

    out, results = written
    (out / "cka.csv").unlink()
    refresh_manifest(out)  # removed on purpose: results.json no longer lists it
    got = read_bundle(out).results
    assert [len(r.cka) for r in got] == [0, 0]
    assert [len(r.weights) for r in got] == [len(r.weights) for r in results]
    assert got[0].info.num_layers == 4 and got[0].trace_sets == ["a", "b"]


# ------------------------------------------------------------ integrity (issue 15.2)
def test_results_json_records_rows_and_checksums(written: tuple[Path, list[PairResult]]) -> None:
    import hashlib

    out, results = written
    files = json.loads((out / "results.json").read_text())["files"]
    assert files["cka.csv"]["rows"] == sum(len(r.cka) for r in results) == 80
    assert files["weights.csv"]["rows"] == sum(len(r.weights) for r in results)
    for name, rec in files.items():
        assert rec["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()


@pytest.mark.parametrize(("name", "rows"), [("cka.csv", 80), ("massive.csv", None)])
def test_a_listed_csv_that_is_absent_is_named_with_its_rows(
    written: tuple[Path, list[PairResult]], name: str, rows: int | None
) -> None:
    """Issue 15.2: not a note and a "weights only" replay: the file and its expected rows."""
    out, _ = written
    expected = json.loads((out / "results.json").read_text())["files"][name]["rows"]
    assert rows is None or expected == rows
    (out / name).unlink()
    with pytest.raises(
        BundleError,
        match=rf"{name.replace('.', '[.]')}: missing from the bundle, although results\.json "
        rf"records {expected} rows for it",
    ):
        read_bundle(out)


def test_csv_cut_at_a_line_boundary_names_expected_and_found_rows(
    written: tuple[Path, list[PairResult]],
) -> None:
    out, _ = written
    lines = (out / "cka.csv").read_text().splitlines(keepends=True)
    (out / "cka.csv").write_text("".join(lines[:-40]))  # one pair's rows gone
    with pytest.raises(BundleError, match=r"cka\.csv: 40 rows found, results\.json records 80"):
        read_bundle(out)


def test_csv_cut_mid_row_is_named_truncated_with_its_line(
    written: tuple[Path, list[PairResult]],
) -> None:
    out, _ = written
    data = (out / "weights.csv").read_bytes()
    n_lines = data.count(b"\n")
    (out / "weights.csv").write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 7])
    with pytest.raises(BundleError, match=rf"weights\.csv line {n_lines}: truncated"):
        read_bundle(out)


def test_csv_cut_mid_row_without_results_json_is_named_truncated(
    written: tuple[Path, list[PairResult]],
) -> None:
    out, _ = written
    (out / "results.json").unlink()
    data = (out / "cka.csv").read_bytes()
    (out / "cka.csv").write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 7])
    with pytest.raises(BundleError, match=r"cka\.csv line 81: truncated: the file ends mid-row"):
        read_bundle(out)


def test_a_complete_last_row_without_newline_is_read(tmp_path: Path) -> None:
    """Hand-made import files often lack the final newline; that is not a cut."""
    (tmp_path / "weights.csv").write_text(
        "base,descendant,tensor,normalized_diff\nb,d,model.layers.0.mlp.up_proj.weight,0.1"
    )
    (res,) = read_bundle(tmp_path).results
    assert res.weights[0].normalized_diff == 0.1


def test_same_rows_edited_replays_with_a_note_and_refresh_accepts(
    written: tuple[Path, list[PairResult]],
) -> None:
    from reasondiff.bundle import refresh_manifest

    out, _ = written
    lines = (out / "cka.csv").read_text().splitlines()
    (out / "cka.csv").write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    got = read_bundle(out)
    assert any("cka.csv: differs from the checksum" in n for n in got.notes), got.notes
    refresh_manifest(out)
    assert read_bundle(out).notes == []


def test_from_results_naming_a_file_is_an_error(written: tuple[Path, list[PairResult]]) -> None:
    out, _ = written
    with pytest.raises(BundleError, match=r"is a file; --from-results takes the bundle directory"):
        read_bundle(out / "results.json")
