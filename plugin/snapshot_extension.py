"""The curve snapshot extension: syrupy snapshots of per-layer curves, compared with a tolerance.

Where the files live (the scope policy) is :mod:`reasondiff.snapshot_scopes`.

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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from syrupy.extensions.json import JSONSnapshotExtension

from .bundle_writer import atomic_write_text
from .metrics.defaults import CURVE_ATOL
from .records import Curve

if TYPE_CHECKING:
    from syrupy.data import SnapshotCollection
    from syrupy.types import PropertyFilter, PropertyMatcher, SerializableData, SerializedData

__all__ = [
    "CurveSnapshotExtension",
    "ParsedCurve",
    "make_curve_extension",
    "parse_curve",
]


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

    atol: ClassVar[float] = CURVE_ATOL
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
