"""Merging bundles: the union of pairs; conflicting pairs or settings name both bundles."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from reasondiff.bundle import Bundle, read_bundle, write_bundle
from reasondiff.bundle_merge import merge_bundles
from reasondiff.errors import BundleError
from reasondiff.records import CkaRecord, PairInfo, PairResult, Verdict, WeightRecord


def _result(desc: str, value: float = 0.5) -> PairResult:
    info = PairInfo(f"b__{desc}", "b", desc, "src/b", f"src/{desc}", method="RL", num_layers=2)
    return PairResult(
        info=info,
        weights=[
            WeightRecord(
                "b",
                desc,
                "model.layers.0.mlp.up_proj.weight",
                0,
                "mlp.up_proj.weight",
                (4, 4),
                value,
                0.1,
                math.nan,
            )
        ],
        cka=[CkaRecord("b", desc, "t:1", lay, "linear", value) for lay in range(3)],
        trace_sets=["t"],
    )


def _bundle(*results: PairResult, **config: object) -> Bundle:
    cfg = {
        "dtype": "float32",
        "layers": None,
        "max_tokens": 4096,
        "dominant_k": 10,
        "rbf_median": "offdiag",
    }
    cfg.update(config)
    verdicts = [Verdict("bathtub", r.info.pair_id, False, None, "s") for r in results]
    verdicts.append(Verdict("sft_vs_rl", "base:b", None, None, "undecided inside a shard"))
    return Bundle(results=list(results), verdicts=verdicts, config=cfg)


def test_union_of_disjoint_bundles() -> None:
    merged = merge_bundles(
        [(Path("s1"), _bundle(_result("x"))), (Path("s2"), _bundle(_result("y"), shard="2/2"))]
    )
    assert [r.info.descendant for r in merged.results] == ["x", "y"]
    # group verdicts from shards are dropped: the replay decides them over all pairs
    assert {v.subject for v in merged.verdicts} == {"b__x", "b__y"}
    assert merged.config["merged_from"] == ["s1", "s2"] and "shard" not in merged.config


def test_identical_pair_in_two_bundles_is_kept_once() -> None:
    merged = merge_bundles(
        [(Path("s1"), _bundle(_result("x"))), (Path("s2"), _bundle(_result("x")))]
    )
    assert len(merged.results) == 1


def test_conflicting_rows_name_both_bundles() -> None:
    with pytest.raises(BundleError, match=r"b__x.*both s1 and s2.*weights rows differ"):
        merge_bundles(
            [(Path("s1"), _bundle(_result("x", 0.5))), (Path("s2"), _bundle(_result("x", 0.6)))]
        )


def test_conflicting_settings_name_both_bundles() -> None:
    with pytest.raises(BundleError, match=r"s1 and s2 were measured differently: config dtype"):
        merge_bundles(
            [
                (Path("s1"), _bundle(_result("x"))),
                (Path("s2"), _bundle(_result("y"), dtype="bfloat16")),
            ]
        )


def test_merge_round_trips_through_written_bundles(tmp_path: Path) -> None:
    for name, res in (("s1", _result("x")), ("s2", _result("y"))):
        b = _bundle(res)
        write_bundle(tmp_path / name, results=b.results, verdicts=b.verdicts, config=b.config)
    bundles = [(tmp_path / n, read_bundle(tmp_path / n)) for n in ("s1", "s2")]
    merged = merge_bundles(bundles)
    assert sorted(r.info.pair_id for r in merged.results) == ["b__x", "b__y"]
    assert all(len(r.cka) == 3 for r in merged.results)


def test_nothing_to_merge() -> None:
    with pytest.raises(BundleError, match="no results bundle"):
        merge_bundles([])
