"""Issue 15.1: a failed or errored pair never loses its accepted curve snapshots.

A replayed bundle holds two toy-group pairs. Their snapshots are accepted once from the
intact bundle (``--snapshot-update`` into a scratch ``--snapshot-dir``); then one pair's
data is damaged (NaN / Inf in a CSV, a cut file, the pair left out) and the run is
repeated *with* ``--snapshot-update``. Before the fix syrupy counted the failed pair's
four snapshots as unused and deleted them. Each case checks the files still exist with
identical bytes, and that the healthy pair still replays.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reasondiff.records import CkaRecord, MassiveRecord, PairInfo, PairResult, WeightRecord

LAYERS = range(5)
PAIRS = ("toy-massive", "toy-copy")
BAD = "toy-base__toy-massive"
GOOD = "toy-base__toy-copy"


def _result(desc: str, curve: list[float]) -> PairResult:
    pair_id = f"toy-base__{desc}"
    recipe = desc.removeprefix("toy-")
    info = PairInfo(pair_id, "toy-base", desc, "toy:base", f"toy:{recipe}", "SFT", "toy", {}, 4)
    cka = [
        CkaRecord("toy-base", desc, f"toy:t{t}", layer, metric, value)
        for t in range(2)
        for layer, value in zip(LAYERS, curve, strict=True)
        for metric in ("linear", "rbf", "linear_without_dominant")
    ]
    weights = [
        WeightRecord(
            "toy-base",
            desc,
            f"model.layers.{i}.mlp.up_proj.weight",
            i,
            "mlp.up_proj.weight",
            (4, 4),
            0.1 + 0.01 * i,
            0.1,
            0.01,
        )
        for i in range(4)
    ]
    massive = [
        MassiveRecord(model, f"toy:t{t}", layer, (0,), 3.0e4)
        for model in ("toy-base", desc)
        for t in range(2)
        for layer in (4, 5)
    ]
    return PairResult(info=info, weights=weights, cka=cka, massive=massive, trace_sets=["toy"])


def _bundle(root: Path, descs: tuple[str, ...] = PAIRS) -> Path:
    from reasondiff.bundle import write_bundle

    curves = {"toy-massive": [1.0, 0.9, 0.5, 0.9, 1.0], "toy-copy": [1.0] * 5}
    write_bundle(root, [_result(d, curves[d]) for d in descs], [], config={})
    return root


def _snapshots(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.json"))}


def _set_csv_value(bundle: Path, fname: str, desc: str, column: str, value: str) -> None:
    """Put ``value`` in ``column`` of the first row of ``desc`` in ``fname`` (results.json updated)."""
    path = bundle / fname
    lines = path.read_text("utf-8").splitlines()
    header = lines[0].split(",")
    col = header.index(column)
    for i, line in enumerate(lines[1:], start=1):
        cells = line.split(",")
        if cells[1] == desc:
            cells[col] = value
            lines[i] = ",".join(cells)
            break
    path.write_text("\n".join(lines) + "\n", "utf-8")
    _refresh_manifest(bundle)


def _refresh_manifest(bundle: Path) -> None:
    """Re-record the checksums, as a tool that edits a bundle on purpose would.

    The damage must reach the pair (not be stopped by the manifest) for these cases.
    """
    from reasondiff import bundle as bundle_mod

    refresh = getattr(bundle_mod, "refresh_manifest", None)
    if refresh is not None:
        refresh(bundle)


def _cut_mid_row(bundle: Path, fname: str) -> None:
    path = bundle / fname
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 7])


DAMAGE: dict[str, Callable[[Path], None]] = {
    "nan-cka": lambda b: _set_csv_value(b, "cka.csv", "toy-massive", "value", "nan"),
    "inf-cka": lambda b: _set_csv_value(b, "cka.csv", "toy-massive", "value", "inf"),
    "nan-weights": lambda b: _set_csv_value(
        b, "weights.csv", "toy-massive", "normalized_diff", "nan"
    ),
    "inf-weights": lambda b: _set_csv_value(
        b, "weights.csv", "toy-massive", "normalized_diff", "-inf"
    ),
}


_W = "model.layers.0.mlp.up_proj.weight (block 0) of toy-massive vs toy-base"
#: The exact one-line failure each damage gives the pair (value, column, layer, trace).
EXPECTED_FAILURE = {
    "nan-cka": f"{BAD}: linear is nan for toy-massive vs toy-base at layer 0, trace toy:t0",
    "inf-cka": f"{BAD}: linear is inf for toy-massive vs toy-base at layer 0, trace toy:t0",
    "nan-weights": f"{BAD}: normalized_diff is nan for tensor {_W}",
    "inf-weights": f"{BAD}: normalized_diff is -inf for tensor {_W}",
}


def _set_massive_value(bundle: Path, value: str) -> None:
    """Put ``value`` in ``max_abs`` of toy-massive's first massive.csv row (manifest refreshed)."""
    path = bundle / "massive.csv"
    lines = path.read_text("utf-8").splitlines()
    header = lines[0].split(",")
    model, col = header.index("model"), header.index("max_abs")
    for i, line in enumerate(lines[1:], start=1):
        cells = line.split(",")
        if cells[model] == "toy-massive":
            cells[col] = value
            lines[i] = ",".join(cells)
            break
    path.write_text("\n".join(lines) + "\n", "utf-8")
    _refresh_manifest(bundle)


@pytest.fixture
def accepted(tmp_path: Path, run_pytest: Any) -> tuple[Path, Path, dict[str, bytes]]:
    """A bundle of the two pairs and their four snapshots each, accepted from it."""
    bundle = _bundle(tmp_path / "bundle")
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    result = run_pytest(
        "--from-results", str(bundle), "--snapshot-dir", str(snaps), "--snapshot-update",
        "-k", "test_curves", "-p", "no:randomly", timeout=180,
    )  # fmt: skip
    before = _snapshots(snaps)
    assert len(before) == 8, "\n".join(result.outlines[-30:])
    return bundle, snaps, before


def _replay(run_pytest: Any, bundle: Path, snaps: Path, *extra: str) -> Any:
    return run_pytest(
        "--from-results", str(bundle), "--snapshot-dir", str(snaps), "-p", "no:randomly",
        *extra, timeout=180,
    )  # fmt: skip


@pytest.mark.parametrize("update", [True, False], ids=["update", "check"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_non_finite_value_keeps_the_pairs_snapshots(
    run_pytest: Any, accepted: tuple[Path, Path, dict[str, bytes]], damage: str, update: bool
) -> None:
    bundle, snaps, before = accepted
    DAMAGE[damage](bundle)
    result = _replay(run_pytest, bundle, snaps, *(["--snapshot-update"] if update else []))
    out = "\n".join(result.outlines + result.errlines)
    assert _snapshots(snaps) == before, out[-3000:]
    assert "deleted" not in out and "unused" not in out, out[-3000:]
    assert result.ret == pytest.ExitCode.TESTS_FAILED, out[-3000:]
    assert EXPECTED_FAILURE[damage] in " ".join(out.split()), out[-3000:]


def test_weights_cut_mid_row_is_named_and_deletes_nothing(
    run_pytest: Any, accepted: tuple[Path, Path, dict[str, bytes]]
) -> None:
    bundle, snaps, before = accepted
    _cut_mid_row(bundle, "weights.csv")
    result = _replay(run_pytest, bundle, snaps, "--snapshot-update")
    out = "\n".join(result.outlines + result.errlines)
    assert _snapshots(snaps) == before, out[-3000:]
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out[-3000:]
    assert "weights.csv" in out and "truncated" in out and "line" in out, out[-3000:]


def test_pair_missing_from_the_bundle_keeps_its_snapshots(
    run_pytest: Any, accepted: tuple[Path, Path, dict[str, bytes]], tmp_path: Path
) -> None:
    _, snaps, before = accepted
    partial = _bundle(tmp_path / "partial", descs=("toy-copy",))
    result = _replay(run_pytest, partial, snaps, "--snapshot-update", "-k", "test_curves")
    out = "\n".join(result.outlines + result.errlines)
    assert _snapshots(snaps) == before, out[-3000:]
    assert result.ret == 0, out[-3000:]
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("damage", ["nan", "inf", "cut-mid-row"])
def test_massive_csv_damage_is_named_and_deletes_nothing(
    run_pytest: Any, accepted: tuple[Path, Path, dict[str, bytes]], damage: str
) -> None:
    """NaN / Inf max_abs, or a massive.csv cut mid-row: a usage error naming the file."""
    bundle, snaps, before = accepted
    lines = (bundle / "massive.csv").read_text("utf-8").splitlines()
    row = next(i for i, ln in enumerate(lines) if ",toy-massive," in f",{ln},")
    if damage == "cut-mid-row":
        _cut_mid_row(bundle, "massive.csv")
        needle = f"massive.csv line {len(lines)}: truncated: the file ends mid-row"
    else:
        _set_massive_value(bundle, damage)
        needle = f"massive.csv line {row + 1}: column 'max_abs': '{damage}' is not finite"
    result = _replay(run_pytest, bundle, snaps, "--snapshot-update")
    out = "\n".join(result.outlines + result.errlines)
    assert _snapshots(snaps) == before, out[-3000:]
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out[-3000:]
    assert needle in out, out[-3000:]


# --------------------------------------------------------------------- live runs
@dataclass(frozen=True)
class LiveSeries:
    base: Path
    candidate: Path  # a user's checkpoint (a byte copy of the toy copy): safe to damage
    traces: Path
    cache: Path
    snaps: Path  # accepted snapshots of --label a-b (copy before changing)


def _live_args(s: LiveSeries, candidate: Path, snaps: Path, label: str) -> list[str]:
    return [
        "--base", str(s.base), "--candidate", str(candidate), "--label", label,
        "--traces", str(s.traces), "--diff-cache", str(s.cache), "--snapshot-dir", str(snaps),
        "--max-tokens", "32", "--bootstrap", "20", "-k", "test_curves", "-p", "no:randomly",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def live_series(
    tmp_path_factory: pytest.TempPathFactory, toy_base: Path, toy_copy: Path, toy_traces: Path
) -> LiveSeries:
    """A live ad-hoc series ``--label a-b`` whose curve snapshots are accepted once."""
    from _faultkit import copy_checkpoint, make_project, run_pytest_in, small_trace_file

    root = tmp_path_factory.mktemp("live")
    series = LiveSeries(
        base=toy_base,
        candidate=copy_checkpoint(toy_copy, root / "cand"),
        traces=small_trace_file(toy_traces, root / "traces.jsonl", count=2),
        cache=root / "cache",
        snaps=root / "snaps",
    )
    series.snaps.mkdir()
    args = _live_args(series, series.candidate, series.snaps, "a-b")
    result = run_pytest_in(make_project(root / "proj"), *args, "--snapshot-update", timeout=300)
    assert result.ret == 0, "\n".join(result.outlines[-40:])
    assert len(_snapshots(series.snaps)) == 4, "\n".join(result.outlines[-40:])
    return series


def test_a_live_pair_that_errors_keeps_its_snapshots_under_update(
    run_pytest: Any, live_series: LiveSeries, tmp_path: Path
) -> None:
    """Not a replay: the candidate's checkpoint is cut, its pair errors in setup."""
    from _faultkit import copy_checkpoint, truncate_file

    snaps = tmp_path / "snaps"
    shutil.copytree(live_series.snaps, snaps)
    before = _files(snaps)
    cand = copy_checkpoint(live_series.candidate, tmp_path / "cand")
    truncate_file(sorted(cand.glob("*.safetensors"))[0], keep=0.5)
    # same pair id as the accepted series: the candidate folder has the same name
    result = run_pytest(*_live_args(live_series, cand, snaps, "a-b"), "--snapshot-update")
    out = "\n".join(result.outlines + result.errlines)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, out[-3000:]
    assert "re-download it" in out, out[-3000:]
    assert _files(snaps) == before, out[-3000:]  # nothing deleted, added or rewritten
    assert "deleted" not in out and "unused" not in out, out[-3000:]


def test_a_second_label_with_the_same_scope_is_refused_end_to_end(
    run_pytest: Any, live_series: LiveSeries, tmp_path: Path
) -> None:
    """--label a-b accepted, then --label a/b (same slug): refused, a-b's files untouched."""
    snaps = tmp_path / "snaps"
    shutil.copytree(live_series.snaps, snaps)
    before = _files(snaps)
    args = _live_args(live_series, live_series.candidate, snaps, "a/b")
    result = run_pytest(*args, "--snapshot-update")
    out = " ".join("\n".join(result.outlines + result.errlines).split())
    assert result.ret == pytest.ExitCode.TESTS_FAILED, out[-3000:]
    assert "--label 'a/b' and --label 'a-b' share the snapshot folder" in out, out[-3000:]
    assert _files(snaps) == before, out[-3000:]


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (a git-status-like view: added, deleted or changed)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
