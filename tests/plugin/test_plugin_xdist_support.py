"""Worker -> controller exchange and scheduling defaults (pure, no pytest run inside)."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest

from reasondiff.options import DiffOptions
from reasondiff.records import (
    CacheStats,
    CkaRecord,
    MassiveRecord,
    PairInfo,
    PairResult,
    Verdict,
    WeightRecord,
)
from reasondiff.registry import Registry
from reasondiff.session import DiffSession
from reasondiff.xdist_support import (
    apply_loadgroup_on_worker,
    default_to_loadgroup,
    pack_worker_output,
    pair_result_from_dict,
    pair_result_to_dict,
    tell_worker_about_loadgroup,
    unpack_worker_output,
)


def make_result(pair_id: str = "toy-base__toy-massive") -> PairResult:
    info = PairInfo(
        pair_id,
        "toy-base",
        "toy-massive",
        "toy:base",
        "toy:massive",
        "SFT",
        "toy",
        {"bathtub": True},
        10,
    )
    return PairResult(
        info=info,
        weights=[
            WeightRecord(
                "toy-base",
                "toy-massive",
                "model.layers.3.mlp.up_proj.weight",
                3,
                "mlp.up_proj.weight",
                (128, 64),
                0.5,
                0.25,
                1e-3,
            ),
            WeightRecord(
                "toy-base",
                "toy-massive",
                "lm_head.weight",
                -1,
                "lm_head.weight",
                (256, 64),
                math.nan,
                math.nan,
                math.nan,
                "tied",
            ),
        ],
        cka=[CkaRecord("toy-base", "toy-massive", "toy-a:t00", 4, "linear", 0.0123)],
        massive=[MassiveRecord("toy-massive", "toy-a:t00", 4, (0,), 3.6e4)],
        trace_sets=["toy-a", "toy-b"],
        notes=["a note"],
    )


def test_pair_result_round_trip_keeps_every_field() -> None:
    original = make_result()
    back = pair_result_from_dict(pair_result_to_dict(original))
    assert back.info == original.info
    assert back.cka == original.cka and back.massive == original.massive
    assert back.weights[0] == original.weights[0]
    tied = back.weights[1]
    assert tied.note == "tied" and tied.shape == (256, 64) and math.isnan(tied.normalized_diff)
    assert (back.trace_sets, back.notes) == (original.trace_sets, original.notes)


def test_worker_output_round_trip() -> None:
    verdict = Verdict("bathtub", "toy-base__toy-massive", True, True, "dip at 4", {"bottom": 4})
    stats = CacheStats(
        activations_computed=3, metrics_loaded=7, caching_disabled_reason="read-only"
    )
    packed = pack_worker_output(
        results=[make_result()],
        verdicts=[verdict],
        stats=stats,
        stage_seconds={"load": 1.5},
        notes=["n"],
    )
    results, verdicts, stats_back, stages, notes = unpack_worker_output(packed)
    assert results[0].info.pair_id == "toy-base__toy-massive"
    assert verdicts == [verdict]
    assert stats_back == stats
    assert (stages, notes) == ({"load": 1.5}, ["n"])


def test_controller_merge_deduplicates_pairs_and_sums_counts() -> None:
    session = DiffSession(DiffOptions(), Registry.load())
    for worker in range(2):
        session.merge(
            [make_result()],
            [Verdict("bathtub", "toy-base__toy-massive", True, True, f"from gw{worker}")],
            CacheStats(activations_computed=2, weight_diffs_loaded=1),
            {"metrics": 1.0},
            ["same note"],
        )
    assert list(session.results) == ["toy-base__toy-massive"]
    assert len(session.verdicts) == 1
    assert session.stats.activations_computed == 4 and session.stats.weight_diffs_loaded == 2
    assert session.stage_seconds == {"metrics": 2.0}
    assert session.notes == ["same note"]


def _config(**option: Any) -> Any:
    return SimpleNamespace(option=SimpleNamespace(**option))


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ({"numprocesses": 2, "dist": "no", "tx": []}, "loadgroup"),
        ({"numprocesses": None, "dist": "no", "tx": ["2*popen"]}, "loadgroup"),
        ({"numprocesses": 2, "dist": "load", "tx": []}, "load"),
        ({"numprocesses": 2, "dist": "no", "tx": [], "distload": True}, "no"),
        ({"numprocesses": None, "dist": "no", "tx": []}, "no"),
    ],
)
def test_default_to_loadgroup(option: dict[str, Any], expected: str) -> None:
    config = _config(**option)
    default_to_loadgroup(config)
    assert config.option.dist == expected


def test_workers_never_change_dist_but_follow_the_controller() -> None:
    worker = _config(numprocesses=None, dist="no", tx=["2*popen"], loadgroup=False)
    worker.workerinput = {}
    default_to_loadgroup(worker)
    assert worker.option.dist == "no"
    node = SimpleNamespace(config=_config(dist="loadgroup"), workerinput={})
    tell_worker_about_loadgroup(node)
    worker.workerinput = node.workerinput
    apply_loadgroup_on_worker(worker)
    assert worker.option.loadgroup is True
