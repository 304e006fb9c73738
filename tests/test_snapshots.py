"""The curve snapshot extension: format, tolerant comparison, diff lines, atomic writes,
and the whole create / pass / drift / fail / update / pass workflow under pytester."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from syrupy.data import Snapshot, SnapshotCollection

from reasondiff import bundle_writer as bundle_mod
from reasondiff.options import DiffOptions
from reasondiff.records import Curve
from reasondiff.registry import Registry, adhoc_pair
from reasondiff.snapshots import (
    CurveSnapshotExtension,
    curve_extension,
    make_curve_extension,
    parse_curve,
    run_snapshot_scope,
    scoped_curve_extension,
    snapshot_scope,
)

pytest_plugins = ["pytester"]

VALUES = [1.0, 0.999712, 0.998104, 0.9981, 0.9981, 0.9975, 0.9968, 0.9979, 0.9990, 0.9541]


def _ser(data: object, ext: type[CurveSnapshotExtension] = CurveSnapshotExtension) -> str:
    return str(ext().serialize(data))


# --------------------------------------------------------------------------- serialize
def test_serialized_form_is_readable_json_one_layer_per_line() -> None:
    text = _ser({"metric": "linear", "layers": [0, 4, 8], "values": [1.0, 0.12345678, -0.0]})
    assert text == (
        "{\n"
        '  "metric": "linear",\n'
        '  "points": [\n'
        '    {"layer": 0, "value": 1.0},\n'
        '    {"layer": 4, "value": 0.123457},\n'
        '    {"layer": 8, "value": 0.0}\n'
        "  ]\n"
        "}\n"
    )
    assert json.loads(text)["points"][1] == {"layer": 4, "value": 0.123457}


def test_accepted_inputs_serialize_alike() -> None:
    curve = Curve("linear", [0, 1, 2], [1.0, 0.5, 0.25], [0.9] * 3, [1.0] * 3, 4)
    as_curve = parse_curve(_ser(curve))
    assert as_curve.metric == "linear" and as_curve.layers == (0, 1, 2)
    assert as_curve.values == (1.0, 0.5, 0.25)
    assert parse_curve(_ser({2: 0.25, 0: 1.0, 1: 0.5})).values == (1.0, 0.5, 0.25)
    assert parse_curve(_ser([1.0, 0.5, 0.25])).layers == (0, 1, 2)
    assert parse_curve(_ser([])).layers == ()


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (
            {"metric": "rbf", "layers": [0, 1], "values": [1.0, math.nan]},
            ValueError,
            "'rbf'.*layer 1",
        ),
        ({"layers": [0, 1, 2], "values": [1.0]}, ValueError, "1 value"),
        ({"layers": [3, 3], "values": [1.0, 1.0]}, ValueError, "repeated layer"),
        ([1.0, "high"], ValueError, "layer 1 is 'high'"),
        ("0.5", TypeError, "got str"),
    ],
)
def test_bad_curves_are_refused(data: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        _ser(data)


# --------------------------------------------------------------------------- compare
def test_matches_within_absolute_and_relative_tolerance() -> None:
    ext = make_curve_extension(atol=0.02, rtol=0.0)()
    snap = _ser({"metric": "linear", "values": [1.0, 0.5]})
    assert ext.matches(
        serialized_data=_ser({"metric": "linear", "values": [0.99, 0.519]}), snapshot_data=snap
    )
    assert not ext.matches(
        serialized_data=_ser({"metric": "linear", "values": [1.0, 0.521]}), snapshot_data=snap
    )
    rel = make_curve_extension(atol=0.0, rtol=0.1)()
    big = _ser({"metric": "m", "values": [100.0, 1.0]})
    assert rel.matches(
        serialized_data=_ser({"metric": "m", "values": [109.0, 1.09]}), snapshot_data=big
    )
    assert not rel.matches(
        serialized_data=_ser({"metric": "m", "values": [109.0, 1.11]}), snapshot_data=big
    )


def test_layer_or_metric_change_never_matches() -> None:
    ext = CurveSnapshotExtension()
    snap = _ser({"metric": "linear", "values": [1.0, 0.5]})
    assert not ext.matches(
        serialized_data=_ser({"metric": "linear", "values": [1.0, 0.5, 0.5]}), snapshot_data=snap
    )
    assert not ext.matches(
        serialized_data=_ser({"metric": "rbf", "values": [1.0, 0.5]}), snapshot_data=snap
    )
    assert not ext.matches(serialized_data=snap, snapshot_data="[1, 2]")
    assert not ext.matches(serialized_data=snap, snapshot_data="")


def test_diff_lines_name_each_layer_beyond_tolerance() -> None:
    ext = make_curve_extension(atol=0.02)()
    now = list(VALUES)
    now[4] = 0.412
    now[7] = 0.9979 + 0.01  # within tolerance: no line
    lines = list(
        ext.diff_lines(
            _ser({"metric": "linear", "values": now}), _ser({"metric": "linear", "values": VALUES})
        )
    )
    assert lines == [
        "linear: 1 of 10 layer(s) beyond tolerance; worst layer 4 |diff| 0.586",
        "layer 4: snapshot 0.9981 -> now 0.4120 (|diff| 0.586 > atol 0.02)",
    ]


def test_diff_lines_for_changed_layers_and_rtol() -> None:
    ext = make_curve_extension(atol=0.01, rtol=0.5)()
    lines = list(
        ext.diff_lines(
            _ser({"metric": "rbf", "values": [1.0, 0.1, 0.9]}),
            _ser({"metric": "linear", "values": [1.0, 0.5]}),
        )
    )
    assert lines[0] == "metric: snapshot 'linear' -> now 'rbf'"
    assert lines[1] == "layers changed: snapshot has 2 layer(s) (0..1), now 3 (0..2); added [2]"
    assert (
        lines[3]
        == "layer 1: snapshot 0.5000 -> now 0.1000 (|diff| 0.4 > tol 0.26 = atol 0.01 + rtol 0.5 x |snapshot|)"
    )
    assert "not a curve snapshot" in next(iter(ext.diff_lines(_ser([1.0]), "garbage")))


def test_make_curve_extension_caches_and_validates() -> None:
    a = make_curve_extension(atol=0.05, rtol=0.01)
    assert a is make_curve_extension(atol=0.05, rtol=0.01)
    assert issubclass(a, CurveSnapshotExtension) and (a.atol, a.rtol) == (0.05, 0.01)
    assert make_curve_extension(atol=0.02) is not a
    with pytest.raises(ValueError, match="atol"):
        make_curve_extension(atol=-1.0)
    with pytest.raises(ValueError, match="rtol"):
        make_curve_extension(atol=0.0, rtol=math.nan)


# --------------------------------------------------------------------------- blocks
def test_a_weight_curve_is_indexed_by_block() -> None:
    text = _ser({"metric": "weight_diff", "blocks": [0, 3], "values": [0.0, 0.25]})
    assert '{"block": 3, "value": 0.25}' in text and '"layer"' not in text
    parsed = parse_curve(text)
    assert (parsed.axis, parsed.layers, parsed.values) == ("block", (0, 3), (0.0, 0.25))
    assert parse_curve(_ser({"metric": "linear", "layers": [0], "values": [1.0]})).axis == "layer"
    with pytest.raises(ValueError, match="'layers' or 'blocks', not both"):
        _ser({"metric": "w", "layers": [0], "blocks": [0], "values": [1.0]})
    with pytest.raises(ValueError, match="value at block 1"):
        _ser({"metric": "w", "blocks": [0, 1], "values": [1.0, math.inf]})


def test_block_and_layer_snapshots_never_match_and_diff_lines_say_block() -> None:
    ext = make_curve_extension(atol=0.02)()
    by_block = _ser({"metric": "weight_diff", "blocks": [0, 1, 2], "values": [0.0, 0.3, 0.0]})
    by_layer = _ser({"metric": "weight_diff", "layers": [0, 1, 2], "values": [0.0, 0.3, 0.0]})
    assert ext.matches(serialized_data=by_block, snapshot_data=by_block)
    assert not ext.matches(serialized_data=by_block, snapshot_data=by_layer)
    assert list(ext.diff_lines(by_block, by_layer)) == [
        "axis: snapshot indexed by layer, now by block; run --snapshot-update to accept the new form"
    ]
    drifted = _ser({"metric": "weight_diff", "blocks": [0, 1, 2], "values": [0.0, 0.1, 0.0]})
    assert list(ext.diff_lines(drifted, by_block)) == [
        "weight_diff: 1 of 3 block(s) beyond tolerance; worst block 1 |diff| 0.2",
        "block 1: snapshot 0.3000 -> now 0.1000 (|diff| 0.2 > atol 0.02)",
    ]


def test_committed_weight_snapshots_are_indexed_by_block() -> None:
    root = Path(__file__).resolve().parents[1] / "diffs" / "snapshots"
    files = sorted(root.glob("*/test_curves/*[[]weight_diff[]].json"))
    assert files, f"no weight_diff snapshots under {root}"
    for f in files:
        assert parse_curve(f.read_text()).axis == "block", f


# --------------------------------------------------------------------------- scopes
class _Loc:
    """The two attributes of syrupy's PyTestLocation that the storage layout reads."""

    def __init__(self, test_file: Path) -> None:
        self.filepath = str(test_file)
        self.basename = test_file.stem


def test_scope_is_the_group_or_the_label() -> None:
    registry = Registry.load([])
    toy = registry.pairs("toy")
    assert {snapshot_scope(p) for p in toy} == {"toy"}
    labelled = adhoc_pair("org/base", "./ckpt-42", label="My Run 7")
    assert snapshot_scope(labelled) == "labels/my-run-7"
    assert snapshot_scope(adhoc_pair("org/base", "./ckpt-42")) is None
    assert run_snapshot_scope(DiffOptions(), [*toy, labelled]) == "labels/my-run-7+toy"
    assert run_snapshot_scope(DiffOptions(), [adhoc_pair("a/b", "c")]) == ""


def test_snapshots_live_under_the_snapshot_dir_or_next_to_the_tests(tmp_path: Path) -> None:
    loc = _Loc(tmp_path / "diffs" / "test_curves.py")
    here = scoped_curve_extension(root=None, scope="toy", atol=0.02)
    assert here.dirname(test_location=loc) == str(tmp_path / "diffs/snapshots/toy/test_curves")  # type: ignore[arg-type]
    team = scoped_curve_extension(root=str(tmp_path / "team"), scope="labels/x", atol=0.02)
    assert team.discovery_dirname(test_location=loc) == str(tmp_path / "team/labels/x")  # type: ignore[arg-type]
    assert scoped_curve_extension(root=None, scope="toy", atol=0.02) is here
    with pytest.raises(ValueError, match="not a relative folder"):
        scoped_curve_extension(root=None, scope="../up", atol=0.02)
    pair = adhoc_pair("toy:base", "toy:massive", label="x")
    rel = curve_extension(DiffOptions(base="b", candidate="c", snapshot_dir="snaps"), pair)
    assert rel is not None and rel.snapshot_root == str(Path("snaps").resolve())  # type: ignore[attr-defined]


def test_discovery_sees_only_its_scope_and_not_the_unselected_pairs(tmp_path: Path) -> None:
    """Other scopes are never discovered (so never unused, never deleted); files of the
    group's pairs that this run did not select neither; an orphan of the scope is."""
    root = tmp_path / "snaps"
    for rel in (
        "toy/test_curves/test_curves[toy-base__toy-massive][linear].json",
        "toy/test_curves/test_curves[toy-base__toy-copy][linear].json",
        "toy/test_curves/test_curves[toy-base__toy-gone][linear].json",
        "mini/test_curves/test_curves[m__n][linear].json",
        "labels/x/test_curves/test_curves[x][linear].json",
        "labels/y/test_curves/test_curves[y][linear].json",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(_ser([1.0, 0.5]))
    loc = _Loc(tmp_path / "diffs" / "test_curves.py")
    registry = Registry.load([])
    toy = registry.pairs("toy")
    massive = next(p for p in toy if p.pair_id == "toy-base__toy-massive")
    options = DiffOptions(snapshot_dir=str(root))

    def found(ext: type[CurveSnapshotExtension] | None) -> list[str]:
        assert ext is not None
        return sorted(
            Path(c.location).relative_to(root).as_posix()
            for c in ext().discover_snapshots(test_location=loc)  # type: ignore[arg-type]
        )

    whole_group = curve_extension(options, massive, selected=toy, registry=registry)
    assert found(whole_group) == [
        "toy/test_curves/test_curves[toy-base__toy-copy][linear].json",
        "toy/test_curves/test_curves[toy-base__toy-gone][linear].json",
        "toy/test_curves/test_curves[toy-base__toy-massive][linear].json",
    ]
    one_pair = curve_extension(options, massive, selected=[massive], registry=registry)
    assert found(one_pair) == [
        "toy/test_curves/test_curves[toy-base__toy-gone][linear].json",
        "toy/test_curves/test_curves[toy-base__toy-massive][linear].json",
    ]
    series = curve_extension(options, adhoc_pair("a", "b", label="x"), registry=registry)
    assert found(series) == ["labels/x/test_curves/test_curves[x][linear].json"]


def test_an_orphan_belongs_to_every_test_of_its_folder(tmp_path: Path) -> None:
    """syrupy relates a snapshot file to a test by its name; an orphan's name names no
    test, so outside the given test paths syrupy would skip it. The scoped extension
    relates it to the folder's tests, and only it: files of the scope's pairs keep
    syrupy's name matching (so a deselected pair's snapshots are never judged)."""
    root = tmp_path / "team"
    registry = Registry.load([])
    toy = registry.pairs("toy")
    massive = next(p for p in toy if p.pair_id == "toy-base__toy-massive")
    ext = curve_extension(
        DiffOptions(snapshot_dir=str(root)), massive, selected=toy, registry=registry
    )
    assert ext is not None

    class Ran(_Loc):
        def matches_snapshot_location(self, location: str) -> bool:
            return Path(location).stem.startswith("test_curves[toy-base__toy-massive][")

        def matches_snapshot_site(self, location: str) -> bool:
            return True

        is_item_parametrized = True
        snapshot_name_parametrized = "test_curves[toy-base__toy-massive]"

    loc = Ran(tmp_path / "site-packages" / "reasondiff" / "diffs" / "test_curves.py")
    folder = root / "toy" / "test_curves"

    def claims(name: str, where: Path = folder) -> bool:
        return bool(
            ext.matches_test_location(test_location=loc, snapshot_location=str(where / name))  # type: ignore[arg-type]
        )

    assert claims("test_curves[toy-base__toy-massive][rbf].json")  # its own
    assert claims("test_curves[toy-base__toy-gone][rbf].json")  # an orphan
    assert not claims("test_curves[toy-base__toy-copy][rbf].json")  # another pair's
    assert not claims("test_curves[toy-base__toy-gone][rbf].json", root / "mini" / "test_curves")


# --------------------------------------------------------------------------- store
def test_interrupted_write_leaves_old_snapshot_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "test_x[linear].json"
    old = _ser([1.0, 0.5])
    target.write_text(old)
    coll = SnapshotCollection(location=str(target))
    coll.add(Snapshot(name="test_x[linear]", data=_ser([1.0, 0.25])))
    written: list[str] = []

    def crash(src: str, dst: object) -> None:
        written.append(Path(src).read_text())  # the new text was fully written to the temp file
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_mod.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        CurveSnapshotExtension.write_snapshot_collection(snapshot_collection=coll)
    assert written == [_ser([1.0, 0.25])]
    assert target.read_text() == old
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    monkeypatch.undo()
    CurveSnapshotExtension.write_snapshot_collection(snapshot_collection=coll)
    assert target.read_text() == _ser([1.0, 0.25])


# --------------------------------------------------------------------------- workflow
INNER_TEST = """
import json
from pathlib import Path

from reasondiff.snapshots import make_curve_extension

EXT = make_curve_extension(atol=0.02, rtol=0.0)


def test_curve(snapshot):
    values = json.loads((Path(__file__).parent / "curve.json").read_text())
    curve = {"metric": "linear", "layers": list(range(len(values))), "values": values}
    assert snapshot.use_extension(EXT)(name="linear") == curve
"""


@pytest.mark.slow
def test_snapshot_workflow(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    # Under xdist the inner pytest would inherit the worker's env and syrupy would then
    # behave as an xdist worker (no snapshot report): run it as a plain session.
    for var in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(var, raising=False)
    pytester.makepyfile(test_inner=INNER_TEST)
    curve_file = pytester.path / "curve.json"
    snap_file = pytester.path / "__snapshots__" / "test_inner" / "test_curve[linear].json"

    def run(values: list[float], *update: str) -> pytest.RunResult:
        curve_file.write_text(json.dumps(values))
        return pytester.runpytest_subprocess(
            "-p", "no:reasondiff.pytest_plugin", "-p", "no:cacheprovider", "-W", "error", *update
        )

    # 1. create
    r = run(VALUES, "--snapshot-update")
    r.assert_outcomes(passed=1)
    r.stdout.fnmatch_lines(["*1 snapshot generated*"])
    created = snap_file.read_bytes()
    assert parse_curve(created.decode()).values == tuple(VALUES)

    # 2. unchanged passes
    run(VALUES).assert_outcomes(passed=1)

    # 3. drift within tolerance passes and does not rewrite, even with --snapshot-update
    drift = [v - 0.004 for v in VALUES]
    run(drift).assert_outcomes(passed=1)
    r = run(drift, "--snapshot-update")
    r.assert_outcomes(passed=1)
    assert "updated" not in r.stdout.str()
    assert snap_file.read_bytes() == created

    # 4. drift beyond tolerance fails with per-layer lines
    broken = list(VALUES)
    broken[4] = 0.412
    r = run(broken)
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(
        [
            "*linear: 1 of 10 layer(s) beyond tolerance; worst layer 4 |diff| 0.586*",
            "*layer 4: snapshot 0.9981 -> now 0.4120 (|diff| 0.586 > atol 0.02)*",
        ]
    )
    assert "layer 3:" not in r.stdout.str()
    assert snap_file.read_bytes() == created

    # 5. accepted with --snapshot-update, 6. then passes
    r = run(broken, "--snapshot-update")
    r.assert_outcomes(passed=1)
    r.stdout.fnmatch_lines(["*1 snapshot updated*"])
    assert parse_curve(snap_file.read_text()).values[4] == 0.412
    run(broken).assert_outcomes(passed=1)

    # 7. a different layer count is a mismatch with its own line
    r = run([*broken, 0.9])
    r.assert_outcomes(failed=1)
    expected = "layers changed: snapshot has 10 layer(s) (0..9), now 11 (0..10); added [10]"
    assert expected in r.stdout.str()
    assert not list(snap_file.parent.glob("*.tmp"))
