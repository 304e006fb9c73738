"""A syrupy extension that snapshots per-layer curves and compares them with a tolerance.

One readable JSON file per snapshot (per pair and metric), one layer per line::

    {
      "metric": "linear",
      "points": [
        {"layer": 0, "value": 1.0},
        {"layer": 1, "value": 0.998123}
      ]
    }

What it changes with respect to syrupy's ``JSONSnapshotExtension``:

- ``serialize`` accepts a :class:`~reasondiff.records.Curve` (its ``mean``), a mapping
  ``{"metric": ..., "layers": [...], "values": [...]}``, a mapping ``{layer: value}`` or
  a plain sequence of values (layers 0..n-1), and rounds values to ``digits`` decimals.
  NaN/Inf is refused (the assertion fails with the layer named; nothing is written).
- ``matches`` parses both sides and compares per layer with ``|now - snap| <= atol +
  rtol * |snap|``. Different metric or different layers never match.
- ``diff_lines`` prints one line per layer beyond tolerance, e.g.
  ``layer 4: snapshot 0.9981 -> now 0.4120 (|diff| 0.586 > atol 0.02)``.
- Writes are atomic (temp file + ``os.replace``); syrupy 7.0.2's single-file extension
  opens the target with ``"w"`` and would leave a truncated file if interrupted.

Syrupy only writes a snapshot when ``matches`` is false (``SnapshotAssertion._assert``),
so a curve within tolerance is never rewritten, not even with ``--snapshot-update``:
small numeric drift does not churn the snapshot files.

Use::

    ext = make_curve_extension(atol=0.02, rtol=0.0)  # e.g. from a plugin option
    assert snapshot(name="linear").use_extension(ext) == curve

Where snapshots live (:func:`scoped_curve_extension`)::

    <root>/<scope>/<test file>/<test>[<pair>][<metric>].json

``<root>`` is ``--snapshot-dir`` (a team's own repository) or ``snapshots/`` next to the
finding tests (``diffs/snapshots/`` in this checkout); ``<scope>`` is the pair's model
group or ``labels/<label>`` for an ad-hoc ``--label`` series. The root is deliberately
*not* syrupy's ``__snapshots__`` folder: syrupy's default extension (registered by
every use of the ``snapshot`` fixture) walks all of ``__snapshots__/`` and would count
every other scope's files as unused, fail the run and delete them on
``--snapshot-update``. Each scope has its own extension class, whose discovery walks
only ``<root>/<scope>/``: a run judges and updates the snapshots of the scopes it ran,
still reports orphans inside them, and never sees the others.

A curve is indexed by ``layer`` (hidden states 0..L, 0 = embeddings) or, for weight
curves, by decoder ``block`` (0..L-1): pass ``"blocks"`` instead of ``"layers"``.

Note: pytest shortens assertion explanations to 8 lines unless ``-vv`` (or the
``truncation_limit_lines`` ini option); the first line therefore summarizes the worst
layer.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from syrupy.data import SnapshotCollections
from syrupy.extensions.json import JSONSnapshotExtension

from .bundle_writer import atomic_write_text
from .records import Curve
from .registry import slug

if TYPE_CHECKING:
    from syrupy.data import SnapshotCollection
    from syrupy.location import PyTestLocation
    from syrupy.types import PropertyFilter, PropertyMatcher, SerializableData, SerializedData

    from .options import DiffOptions
    from .registry import PairSpec, Registry

__all__ = [
    "DEFAULT_SNAPSHOT_DIRNAME",
    "CurveSnapshotExtension",
    "ParsedCurve",
    "curve_extension",
    "make_curve_extension",
    "parse_curve",
    "run_snapshot_scope",
    "scoped_curve_extension",
    "snapshot_scope",
]

#: The snapshot root next to the finding tests when ``--snapshot-dir`` is not given.
DEFAULT_SNAPSHOT_DIRNAME = "snapshots"


@dataclass(frozen=True)
class ParsedCurve:
    """The content of a curve snapshot."""

    metric: str | None
    layers: tuple[int, ...]
    values: tuple[float, ...]
    axis: str = "layer"  # what ``layers`` index: "layer" (hidden states) or "block"


def _finite(value: Any, layer: int, metric: str | None, axis: str = "layer") -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"curve {metric!r}: value at {axis} {layer} is {value!r}, not a number"
        ) from None
    if not math.isfinite(x):
        raise ValueError(
            f"curve {metric!r}: value at {axis} {layer} is {x!r}; refusing to snapshot a non-finite value"
        )
    return x


def _to_curve(data: Any) -> ParsedCurve:
    """Normalize the accepted inputs to (metric, layers, values), validating them."""
    metric: str | None = None
    axis = "layer"
    if isinstance(data, Curve):
        metric, layers, values = data.metric, list(data.layers), list(data.mean)
    elif isinstance(data, Mapping) and "values" in data:
        metric = data.get("metric")
        values = list(data["values"])
        if "layers" in data and "blocks" in data:
            raise ValueError(f"curve {metric!r}: give 'layers' or 'blocks', not both")
        if "blocks" in data:
            axis = "block"
        layers = list(data.get("blocks" if axis == "block" else "layers", range(len(values))))
    elif isinstance(data, Mapping):
        items = sorted((int(k), v) for k, v in data.items())
        layers, values = [k for k, _ in items], [v for _, v in items]
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        values = list(data)
        layers = list(range(len(values)))
    else:
        raise TypeError(
            f"CurveSnapshotExtension snapshots a Curve, a mapping with 'values' (and "
            f"'layers', 'metric'), a {{layer: value}} mapping or a sequence; got {type(data).__name__}"
        )
    if len(layers) != len(values):
        raise ValueError(f"curve {metric!r}: {len(values)} value(s) for {len(layers)} {axis}(s)")
    int_layers = tuple(int(x) for x in layers)
    if len(set(int_layers)) != len(int_layers):
        raise ValueError(f"curve {metric!r}: repeated {axis} numbers in {list(int_layers)}")
    return ParsedCurve(
        metric=None if metric is None else str(metric),
        layers=int_layers,
        values=tuple(
            _finite(v, lay, metric, axis) for lay, v in zip(int_layers, values, strict=True)
        ),
        axis=axis,
    )


def parse_curve(text: str) -> ParsedCurve:
    """Parse a curve snapshot file's text; ValueError when it is not one."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("points"), list):
        raise ValueError(
            'expected an object {"metric": ..., "points": [{"layer": l, "value": v}, ...]}'
        )
    metric = doc.get("metric")
    points = doc["points"]
    axis = "block" if points and isinstance(points[0], dict) and "block" in points[0] else "layer"
    layers, values = [], []
    for i, p in enumerate(points):
        if not isinstance(p, dict) or axis not in p or "value" not in p:
            raise ValueError(f'point #{i} is {p!r}; expected {{"{axis}": n, "value": v}}')
        layers.append(p[axis])
        values.append(p["value"])
    return _to_curve({"metric": metric, f"{axis}s": layers, "values": values})


class CurveSnapshotExtension(JSONSnapshotExtension):
    """Per-layer curve snapshots compared within ``atol`` / ``rtol`` (class attributes).

    Subclass, or call :func:`make_curve_extension`, to change the tolerances.
    """

    atol: ClassVar[float] = 0.02
    rtol: ClassVar[float] = 0.0
    digits: ClassVar[int] = 6

    # ------------------------------------------------------------------ serialize
    def serialize(
        self,
        data: SerializableData,
        *,
        exclude: PropertyFilter | None = None,
        include: PropertyFilter | None = None,
        matcher: PropertyMatcher | None = None,
    ) -> SerializedData:
        curve = _to_curve(data)
        points = ",\n".join(
            f'    {{"{curve.axis}": {layer}, "value": {json.dumps(round(v, self.digits) + 0.0)}}}'
            for layer, v in zip(curve.layers, curve.values, strict=True)
        )
        body = f"[\n{points}\n  ]" if points else "[]"
        return f'{{\n  "metric": {json.dumps(curve.metric)},\n  "points": {body}\n}}\n'

    # ------------------------------------------------------------------ compare
    @classmethod
    def _tolerance(cls, snap: float) -> float:
        return cls.atol + cls.rtol * abs(snap)

    def matches(
        self, *, serialized_data: SerializableData, snapshot_data: SerializableData
    ) -> bool:
        try:
            now = parse_curve(str(serialized_data))
            snap = parse_curve(str(snapshot_data))
        except ValueError:
            return False
        if now.metric != snap.metric or now.axis != snap.axis or now.layers != snap.layers:
            return False
        return all(
            abs(a - b) <= self._tolerance(b) for a, b in zip(now.values, snap.values, strict=True)
        )

    # ------------------------------------------------------------------ report
    def _tol_text(self, snap: float) -> str:
        if self.rtol == 0:
            return f"atol {self.atol:g}"
        return f"tol {self._tolerance(snap):.3g} = atol {self.atol:g} + rtol {self.rtol:g} x |snapshot|"

    def diff_lines(
        self, serialized_data: SerializedData, snapshot_data: SerializedData
    ) -> Iterator[str]:
        if not str(snapshot_data).strip():
            yield "no curve snapshot stored yet; run with --snapshot-update to create it"
            return
        try:
            snap = parse_curve(str(snapshot_data))
        except ValueError as exc:
            yield f"the stored snapshot is not a curve snapshot ({exc}); run --snapshot-update to replace it"
            return
        now = parse_curve(str(serialized_data))
        name = now.metric if now.metric is not None else "curve"
        if now.metric != snap.metric:
            yield f"metric: snapshot {snap.metric!r} -> now {now.metric!r}"
        axis = now.axis
        if now.axis != snap.axis:
            yield (
                f"axis: snapshot indexed by {snap.axis}, now by {now.axis}; "
                "run --snapshot-update to accept the new form"
            )
            return
        if now.layers != snap.layers:
            added = sorted(set(now.layers) - set(snap.layers))
            removed = sorted(set(snap.layers) - set(now.layers))
            yield (
                f"{axis}s changed: snapshot has {len(snap.layers)} {axis}(s) {_span(snap.layers)}, "
                f"now {len(now.layers)} {_span(now.layers)}"
                + (f"; added {added}" if added else "")
                + (f"; removed {removed}" if removed else "")
            )
        snap_by_layer = dict(zip(snap.layers, snap.values, strict=True))
        bad = [
            (layer, snap_by_layer[layer], v)
            for layer, v in zip(now.layers, now.values, strict=True)
            if layer in snap_by_layer
            and abs(v - snap_by_layer[layer]) > self._tolerance(snap_by_layer[layer])
        ]
        if bad:
            worst = max(bad, key=lambda t: abs(t[2] - t[1]))
            yield (
                f"{name}: {len(bad)} of {len(snap_by_layer.keys() & set(now.layers))} {axis}(s) "
                f"beyond tolerance; worst {axis} {worst[0]} |diff| {abs(worst[2] - worst[1]):.3g}"
            )
        for layer, s, v in bad:
            yield (
                f"{axis} {layer}: snapshot {s:.4f} -> now {v:.4f} "
                f"(|diff| {abs(v - s):.3g} > {self._tol_text(s)})"
            )

    # ------------------------------------------------------------------ store
    @classmethod
    def write_snapshot_collection(
        cls,
        *,
        snapshot_collection: SnapshotCollection,
        name_order: dict[str, int] | None = None,
    ) -> None:
        """Write the single snapshot atomically: old file or new file, never a torn one."""
        filepath = snapshot_collection.location
        data = next(iter(snapshot_collection)).data
        if not isinstance(data, str):
            raise TypeError(f"cannot write {type(data).__name__} to curve snapshot {filepath}")
        atomic_write_text(filepath, data)


def _span(layers: Sequence[int]) -> str:
    return f"({layers[0]}..{layers[-1]})" if layers else "(none)"


@functools.cache
def make_curve_extension(*, atol: float, rtol: float = 0.0) -> type[CurveSnapshotExtension]:
    """A :class:`CurveSnapshotExtension` subclass with these tolerances (cached per pair).

    The same (atol, rtol) gives the same class, which syrupy uses as a key for queued
    writes and snapshot discovery.
    """
    for name, value in (("atol", atol), ("rtol", rtol)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"curve snapshot {name} must be a finite number >= 0, got {value!r}")
    return type(
        f"CurveSnapshotExtension_atol{atol:g}_rtol{rtol:g}",
        (CurveSnapshotExtension,),
        {"atol": float(atol), "rtol": float(rtol), "__module__": __name__},
    )


# --------------------------------------------------------------------------- scopes
def snapshot_scope(pair: PairSpec) -> str | None:
    """The folder (under the snapshot root) that holds this pair's curve snapshots.

    ``labels/<label>`` for a ``--label`` series (also when replayed from a bundle), the
    model group for a registry pair, None for an unlabelled ad-hoc pair (measured and
    reported, never snapshotted). One folder per label, not one for all labels: a run
    of one series must not see another's files.
    """
    if pair.label:
        return f"labels/{slug(pair.label)}"
    if pair.group:
        return slug(pair.group)
    return None


def run_snapshot_scope(options: DiffOptions, pairs: Iterable[PairSpec]) -> str:
    """The scopes a run with these selected pairs judges, joined by ``+`` (for display).

    Empty when no pair is snapshotted (e.g. ``--base/--candidate`` without ``--label``).
    """
    return "+".join(sorted({s for p in pairs if (s := snapshot_scope(p)) is not None}))


def curve_extension(
    options: DiffOptions,
    pair: PairSpec,
    *,
    selected: Iterable[PairSpec] = (),
    registry: Registry | None = None,
) -> type[CurveSnapshotExtension] | None:
    """The tolerant curve extension storing ``pair``'s snapshots in its scope (None: none).

    ``selected`` are the run's pairs and ``registry`` the loaded registry: the other
    registry pairs of ``pair``'s group that this run did not select (a partial bundle
    replay, say) keep their snapshots out of the run's judgement, while a file of a pair
    the scope no longer has is an orphan.
    """
    scope = snapshot_scope(pair)
    if scope is None:
        return None
    root = None
    if options.snapshot_dir:
        root = str(Path(options.snapshot_dir).expanduser().resolve())
    known: set[str] = set()
    if pair.label is None and registry is not None and pair.group in registry.groups:
        assert pair.group is not None
        known = {p.pair_id for p in registry.pairs(pair.group)}
    chosen = {p.pair_id for p in selected if snapshot_scope(p) == scope} | {pair.pair_id}
    return scoped_curve_extension(
        root=root,
        scope=scope,
        atol=options.curve_atol,
        rtol=options.curve_rtol,
        unselected=frozenset(known - chosen),
        pair_ids=frozenset(known | chosen),
    )


@functools.cache
def scoped_curve_extension(
    *,
    root: str | None,
    scope: str,
    atol: float,
    rtol: float = 0.0,
    unselected: frozenset[str] = frozenset(),
    pair_ids: frozenset[str] | None = None,
) -> type[CurveSnapshotExtension]:
    """A curve extension storing under ``<root>/<scope>/<test file>/`` (cached per arguments).

    ``root`` None means ``snapshots/`` next to the test file. syrupy discovers a
    single-file extension's snapshots in the parent of its ``dirname`` when that folder
    is named after the test file, i.e. in ``<root>/<scope>/`` only: other scopes are
    never discovered, so never reported as unused and never deleted, while an orphan
    inside this scope still is. Files of the pair ids in ``unselected`` (pairs of the
    scope that this run does not compare) are not discovered either.

    ``pair_ids`` are all pairs the scope has (None: not known). A file of any other pair
    is an orphan, and every test of its folder claims it, so that syrupy judges it
    whichever tests ran, also when the snapshot dir lies outside the test paths given
    (``--pyargs reasondiff.diffs --snapshot-dir DIR``); syrupy would otherwise relate it
    to no test (its name names none) and skip it.
    """
    base = make_curve_extension(atol=atol, rtol=rtol)
    scope_parts = tuple(part for part in scope.split("/") if part)
    if not scope_parts or any(part in (".", "..") for part in scope_parts):
        raise ValueError(f"curve snapshot scope {scope!r} is not a relative folder name")

    def dirname(cls: type, *, test_location: PyTestLocation) -> str:
        top = (
            Path(root)
            if root is not None
            else Path(test_location.filepath).parent / DEFAULT_SNAPSHOT_DIRNAME
        )
        return str(top.joinpath(*scope_parts, test_location.basename))

    def discover_snapshots(
        self: CurveSnapshotExtension,
        *,
        test_location: PyTestLocation,
        ignore_extensions: list[str] | None = None,
    ) -> SnapshotCollections:
        found = base.discover_snapshots(
            self, test_location=test_location, ignore_extensions=ignore_extensions
        )
        if not unselected:
            return found
        kept = SnapshotCollections()
        for collection in found:
            if _pair_id_of(Path(collection.location).name) not in unselected:
                kept.add(collection)
        return kept

    def matches_test_location(
        cls: type[CurveSnapshotExtension],
        *,
        test_location: PyTestLocation,
        snapshot_location: str,
    ) -> bool:
        if base.matches_test_location.__func__(  # type: ignore[attr-defined]
            cls, test_location=test_location, snapshot_location=snapshot_location
        ):
            return True
        loc = Path(snapshot_location)
        return (
            pair_ids is not None
            and _pair_id_of(loc.name) not in pair_ids
            and str(loc.parent) == dirname(cls, test_location=test_location)
        )

    return type(
        f"{base.__name__}_{slug(scope).replace('.', '_')}",
        (base,),
        {
            "dirname": classmethod(dirname),
            "discover_snapshots": discover_snapshots,
            "matches_test_location": classmethod(matches_test_location),
            "snapshot_root": root,
            "snapshot_scope": scope,
            "__module__": __name__,
        },
    )


def _pair_id_of(filename: str) -> str | None:
    """``test_curves[<pair id>][<metric>].json`` -> the pair id (None when not of that form)."""
    m = re.match(r"[^\[]*\[([^\]]*)\]", filename)
    return m.group(1) if m else None
