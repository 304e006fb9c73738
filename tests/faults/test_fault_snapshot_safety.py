"""Issue 15.1: a failed or errored pair never loses its accepted curve snapshots.

A replayed bundle holds two toy-group pairs. Their snapshots are accepted once from the
intact bundle (``--snapshot-update`` into a scratch ``--snapshot-dir``); then one pair's
data is damaged (NaN / Inf in a CSV, a cut file, the pair left out) and the run is
repeated *with* ``--snapshot-update``. Before the fix syrupy counted the failed pair's
four snapshots as unused and deleted them. Each case checks the files still exist with
identical bytes, and that the healthy pair still replays.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reasondiff.records import CkaRecord, PairInfo, PairResult, WeightRecord

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
    return PairResult(info=info, weights=weights, cka=cka, trace_sets=["toy"])


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
    assert f"{BAD}" in out and ("nan" in out or "inf" in out), out[-3000:]


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
