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


def _noted(res: PairResult, note: str) -> PairResult:
    res.notes.append(note)
    return res


def _cuda_bf16(desc: str) -> PairResult:
    return _noted(_result(desc), "activations computed in bfloat16; --dtype auto on cuda")


def _cpu_f32(desc: str) -> PairResult:
    return _noted(_result(desc), "activations computed in float32; --dtype auto on cpu")


CPU = {"dtype_resolved": {"activations": ["float32"], "device": "cpu"}}
CUDA = {"dtype_resolved": {"activations": ["bfloat16"], "device": "cuda"}}


def test_bundles_from_different_devices_conflict_naming_both() -> None:
    with pytest.raises(
        BundleError, match=r"s1 and s2 were measured differently: .*'cpu' vs 'cuda'"
    ):
        merge_bundles(
            [
                (Path("s1"), _bundle(_cpu_f32("x"), **CPU)),
                (Path("s2"), _bundle(_cuda_bf16("y"), **CUDA)),
            ]
        )


def test_one_model_in_two_resolved_dtypes_conflicts_naming_both() -> None:
    """Same device kind and --dtype, but the shared base ran in bf16 in one shard and
    float32 in the other (e.g. a checkpoint re-saved in another dtype)."""
    odd = _noted(_result("y"), "activations computed in float32; --dtype auto on cuda")
    f32 = {"dtype_resolved": {"activations": ["float32"], "device": "cuda"}}
    with pytest.raises(
        BundleError, match=r"s1 and s2 were measured differently: model b's .* bfloat16 vs float32"
    ):
        merge_bundles(
            [(Path("s1"), _bundle(_cuda_bf16("x"), **CUDA)), (Path("s2"), _bundle(odd, **f32))]
        )


def test_different_trace_sets_under_one_name_conflict_naming_both() -> None:
    with pytest.raises(BundleError, match=r"s1 and s3 were measured differently: trace set 't'"):
        merge_bundles(
            [
                (Path("s1"), _bundle(_result("x"), trace_hashes={"t": "aaaa"})),
                (Path("s2"), _bundle(_result("y"))),  # an older bundle: no hashes recorded
                (Path("s3"), _bundle(_result("z"), trace_hashes={"t": "bbbb"})),
            ]
        )
    with pytest.raises(BundleError, match=r"trace set 't' has generator 'm1' vs 'm2'"):
        merge_bundles(
            [
                (Path("s1"), _bundle(_result("x"), trace_generators={"t": "m1"})),
                (Path("s2"), _bundle(_result("y"), trace_generators={"t": "m2"})),
            ]
        )


def test_per_pair_facts_are_unioned_in_the_merged_config() -> None:
    """Different checkpoints may resolve to different dtypes on one device kind, and each
    shard records only its own trace sets: the merge keeps all of them, as an unsplit run
    would, instead of the first bundle's."""
    other = _result("y", 0.7)
    other.info = PairInfo("c__y", "c", "y", "src/c", "src/y", method="RL", num_layers=2)
    other.notes.append("activations computed in float32; --dtype auto on cuda")
    a = _bundle(_cuda_bf16("x"), **CUDA, trace_generators={"t": "m1"}, trace_hashes={"t": "aaaa"})
    b = _bundle(
        other,
        dtype_resolved={"activations": ["float32"], "device": "cuda"},
        trace_generators={"t": "m1", "u": "m2"},
        trace_hashes={"t": "aaaa", "u": "cccc"},
    )
    merged = merge_bundles([(Path("s1"), a), (Path("s2"), b)])
    assert merged.config["dtype_resolved"] == {
        "activations": ["bfloat16", "float32"],
        "device": "cuda",
    }
    assert merged.config["trace_generators"] == {"t": "m1", "u": "m2"}
    assert merged.config["trace_hashes"] == {"t": "aaaa", "u": "cccc"}
