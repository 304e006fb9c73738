"""DiffSession bookkeeping that needs no model: pair selection, groups, bundle matching."""

from __future__ import annotations

from pathlib import Path

import pytest

from reasondiff.bundle import Bundle
from reasondiff.errors import RegistryError
from reasondiff.options import DiffOptions
from reasondiff.records import PairInfo, PairResult
from reasondiff.session import DiffSession


def test_unknown_group_lists_the_choices() -> None:
    with pytest.raises(
        RegistryError, match=r"choose one of: distill1\.5b, distill7b, qwenmath7b, toy"
    ):
        DiffSession.create(DiffOptions(model_group="nope"))


def test_group_subjects_carry_the_group_expectation() -> None:
    session = DiffSession.create(DiffOptions())
    (subject,) = session.group_subjects()
    assert subject.subject == "base:toy-base"
    assert subject.expect == {"sft_more_than_rl": True}
    assert [p.pair_id for p in subject.pairs] == [p.pair_id for p in session.pairs]
    assert session.snapshot_scope() == "toy"


def test_adhoc_session_has_one_pair_without_expectations() -> None:
    opts = DiffOptions(base="org/base@main", candidate="/ckpt/my-run", label="Run 7", method="RL")
    session = DiffSession.create(opts)
    (pair,) = session.pairs
    assert (pair.pair_id, pair.expect, pair.method) == ("run-7", {}, "RL")
    assert session.snapshot_scope() == "labels/run-7"
    assert session.group_subjects()[0].expect == {}


def _bundle(*infos: PairInfo) -> Bundle:
    return Bundle(results=[PairResult(info=i, trace_sets=["a"]) for i in infos], verdicts=[])


def test_bundle_pairs_get_the_registry_expectations_by_hub_id_or_key() -> None:
    by_hub = PairInfo(
        "x__y",
        "Distill-7B",
        "Skywork",
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
        "Skywork/Skywork-OR1-7B@abc123",
        None,
        None,
    )
    by_key = PairInfo(
        "toy-base__toy-massive", "toy-base", "toy-massive", "elsewhere", "elsewhere", None, None
    )
    unknown = PairInfo("mine__theirs", "mine", "theirs", "/a", "/b", "RL", None)
    session = DiffSession.create(
        DiffOptions(from_results=("bundle",)), bundle=_bundle(by_hub, by_key, unknown)
    )
    ids = [p.pair_id for p in session.pairs]
    assert ids == ["r1-distill-qwen-7b__skywork-or1-7b", "toy-base__toy-massive", "mine__theirs"]
    skywork = session.pair_result(session.pairs[0])
    assert skywork.info.expect["bathtub"] is True and skywork.info.group == "distill7b"
    assert session.pair_result(session.pairs[1]).info.expect["bathtub_explained"] is True
    mine = session.pair_result(session.pairs[2])
    assert (mine.info.expect, mine.info.method) == ({}, "RL")


def test_layers_subset_always_keeps_the_final_layer(tmp_path: Path) -> None:
    session = DiffSession.create(DiffOptions(layers=(0, 4)))
    assert session.engine._layers(10, "toy-massive") == [0, 4, 10]
    with pytest.raises(
        Exception,
        match=r"--layers 12 out of range for toy-massive: hidden-state layers are 0\.\.10",
    ):
        DiffSession.create(DiffOptions(layers=(12,))).engine._layers(10, "toy-massive")
