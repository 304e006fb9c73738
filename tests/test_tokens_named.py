"""Tokens named end to end on the toy family (issue 18.3): the planted sink is named.

toy-massive writes a massive activation at position 0, the BOS token ``<|bos|>`` (id 1),
into hidden states 4..7 (``fixtures/toy.py``); its linear CKA dips there. So the report
and dominant.csv must name ``'<|bos|>'`` in those layers, while toy-copy (a byte copy of
the base: no dip) must get no line claiming a dip. One module-scoped cold run, then a
warm run, a bundle replay and an xdist round trip of the same results.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from reasondiff.api import Comparison, compare
from reasondiff.bundle import read_bundle
from reasondiff.fixtures.toy import ERASE_LAYER, WRITE_LAYER, ensure_toy_model
from reasondiff.fixtures.toy_traces import BOS
from reasondiff.records import PairResult
from reasondiff.report_data import build_report_data
from reasondiff.reports import make_console, render_terminal
from reasondiff.xdist_support import pair_result_from_dict, pair_result_to_dict

pytestmark = pytest.mark.slow  # builds toy checkpoints (seconds, once per module)

FAST = {"bootstrap": 100, "torch_threads": 1, "max_tokens": 128}  # the dip is at position 0
DIP = list(range(WRITE_LAYER + 1, ERASE_LAYER + 1))  # hidden states 4..7 carry the sink
SINK = f"'{BOS}'"  # as the report quotes it
N_TRACES = 16  # toy trace set a


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tokens-toy")
    for recipe in ("base", "massive", "copy"):
        ensure_toy_model(root / "toy", recipe)
    return root


@pytest.fixture(scope="module")
def cold(toy_root: Path) -> Comparison:
    return compare("toy:base", ["toy:massive", "toy:copy"], cache_dir=toy_root, **FAST)


@pytest.fixture(scope="module")
def bundle(cold: Comparison, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cold.write(tmp_path_factory.mktemp("tokens-bundle") / "out")


def _report(comparison: Comparison | None = None, **kwargs: object) -> str:
    buffer = io.StringIO()
    console = make_console(buffer, color="no", width=240, environ={})
    data = comparison.report_data() if comparison is not None else build_report_data(**kwargs)  # type: ignore[arg-type]
    render_terminal(data, console=console)
    return buffer.getvalue()


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _by_name(c: Comparison | list[PairResult]) -> dict[str, PairResult]:
    return {r.info.descendant: r for r in c}


def test_the_records_name_the_sink_in_the_dip(cold: Comparison) -> None:
    massive = _by_name(cold)["toy-massive"]
    assert massive.error is None and massive.verdicts["bathtub"].observed is True
    for layer in DIP:
        tops = {}
        for r in massive.dominant:
            if r.layer == layer and r.model == "toy-massive":
                best = tops.get(r.trace)
                if best is None or r.projection > best.projection:
                    tops[r.trace] = r
        assert len(tops) == N_TRACES
        assert {(r.position, r.token_id, r.token) for r in tops.values()} == {(0, 1, BOS)}
        carriers = [m for m in massive.massive if m.layer == layer and m.model == "toy-massive"]
        assert len(carriers) == N_TRACES
        assert all(m.positions == (0,) and m.token_ids == (1,) for m in carriers)
        assert all(m.tokens == (BOS,) for m in carriers)
    # outside the planted layers no massive activation, so nothing to name
    assert all(not m.positions and not m.tokens for m in massive.massive if m.layer not in DIP)
    # every dominant row is named: an id of the trace, decoded on its own
    assert all(r.token_id >= 0 and r.token for r in massive.dominant)


def test_the_report_names_the_sink_and_the_control_claims_no_dip(cold: Comparison) -> None:
    text = _report(cold)
    lines = [ln.strip() for ln in text.splitlines()]
    dip = [ln for ln in lines if ln.startswith("toy-massive dominant in dip")]
    assert len(dip) == 1
    assert dip[0].startswith(
        f"toy-massive dominant in dip (layers {DIP[0]}-{DIP[-1]}): "
        f"{SINK} {N_TRACES}/{N_TRACES} traces (position 0)"
    )
    copy = [ln for ln in lines if ln.startswith("toy-copy ") and "dominant" in ln]
    assert copy and not any("dip (layers" in ln for ln in copy)
    assert copy[0].startswith("toy-copy dominant (no dip; all layers): ")
    overlap = next(ln for ln in lines if ln.startswith("toy-massive share of dominant"))
    # only the descendant's sink is massive: 1 of the 2k pooled dominant tokens in the dip
    assert f"{DIP[0]}-{DIP[-1]} 0.05" in overlap
    assert text.count("reasondiff cache: ") == 1


def test_dominant_csv_names_the_sink_and_the_frames_hold_its_rows(
    cold: Comparison, bundle: Path
) -> None:
    rows = _csv(bundle / "dominant.csv")
    assert len(rows) == sum(len(r.dominant) for r in cold)
    sink = {
        (r["trace"], int(r["layer"]))
        for r in rows
        if r["descendant"] == "toy-massive"
        and r["model"] == "toy-massive"
        and (r["position"], r["token_id"], r["token"]) == ("0", "1", BOS)
    }
    assert {layer for _, layer in sink} >= set(DIP)
    assert len({t for t, layer in sink if layer in DIP}) == N_TRACES
    doc = json.loads((bundle / "results.json").read_text())
    assert doc["files"]["dominant.csv"]["rows"] == len(rows)
    massive = [
        r for r in _csv(bundle / "massive.csv") if r["model"] == "toy-massive" and r["positions"]
    ]
    assert len(massive) == N_TRACES * len(DIP)
    assert all(r["token_ids"] == "1" and json.loads(r["tokens"]) == [BOS] for r in massive)
    assert (bundle / "fig6_dominant_tokens.png").is_file()
    assert "fig6_dominant_tokens.png" in (bundle / "index.md").read_text()
    pytest.importorskip("pandas")
    frames = cold.frames()
    assert len(frames["dominant"]) == len(rows)
    assert list(frames["dominant"].columns) == list(rows[0])
    assert len(frames["massive"]) == len(_csv(bundle / "massive.csv"))


def test_a_replay_from_the_bundle_gives_the_same_rows_and_lines(
    cold: Comparison, bundle: Path
) -> None:
    replay = read_bundle(bundle)
    for r in replay.results:
        live = _by_name(cold)[r.info.descendant]
        assert r.dominant == live.dominant
        assert set(r.massive) == set(live.massive)  # per model in massive.csv: order differs
    data = build_report_data(
        replay.results, replay.verdicts, curves=lambda res, ts: cold._curves(res, ts)
    )
    assert data.tokens["toy-base__toy-massive"].dip_line() == (
        cold.report_data().tokens["toy-base__toy-massive"].dip_line()
    )


def test_a_warm_run_names_them_from_the_cache_without_a_model(
    cold: Comparison, toy_root: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "warm"
    shutil.copytree(toy_root, cache, symlinks=True)  # the cold run's metric cache too
    warm = compare("toy:base", ["toy:massive", "toy:copy"], cache_dir=cache, **FAST)
    assert warm.cache.metrics_computed == 0 and warm.cache.metrics_loaded > 0
    assert warm.cache.activations_computed == 0
    assert "load" not in warm.stage_seconds and "forwards" not in warm.stage_seconds
    for r in warm:
        live = _by_name(cold)[r.info.descendant]
        assert r.dominant == live.dominant and r.massive == live.massive


def test_xdist_worker_output_keeps_the_tokens(cold: Comparison) -> None:
    for r in cold:
        back = pair_result_from_dict(json.loads(json.dumps(pair_result_to_dict(r))))
        assert back.dominant == r.dominant and back.massive == r.massive
    # an older worker's output (no dominant rows, massive without tokens) still unpacks
    old = pair_result_to_dict(cold[0])
    del old["dominant"]
    old["massive"] = [row[:5] for row in old["massive"]]
    back = pair_result_from_dict(old)
    assert back.dominant == [] and all(m.tokens == () for m in back.massive)
