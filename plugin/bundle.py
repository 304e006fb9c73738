"""The results bundle: every measured row and verdict of a run, as plain files.

A bundle is a directory that a live run writes (``--results-dir``) and that a later run
replays without models (``--from-results``), or that someone else produced:

- ``weights.csv``  one row per weight tensor (:class:`~reasondiff.records.WeightRecord`)
- ``cka.csv``      one row per (pair, trace, layer, metric) (:class:`~reasondiff.records.CkaRecord`)
- ``massive.csv``  massive-activation positions per (model, trace, layer)
- ``results.json`` the pairs (:class:`~reasondiff.records.PairInfo`, trace sets, notes),
  the verdicts with expectation and status, the run's config and package versions

Layer numbering (format version 2): weight rows carry ``block``, the 0-based decoder
block index (-1 outside the blocks); CKA and massive rows carry ``layer``, the
hidden-state index (0 = embeddings, l >= 1 = output of block l - 1, L = after the final
norm). Version-1 bundles named the weight column ``layer`` (same numbers, the block
index); they are still read.

Import format (bundles made elsewhere, e.g. another tool's per-tensor CSV): only
``weights.csv`` is required, and in it only ``base, descendant, tensor,
normalized_diff``. ``block`` and ``component`` are derived from the tensor name when
absent or empty (:func:`~reasondiff.tensor_names.parse_tensor_name`, the parser the
weight diff uses), other columns may be absent or empty (numbers become NaN; a missing
``shape`` is ``()``, and SFT-vs-RL then tells a matrix by its name). Without
``cka.csv`` the pairs have no CKA rows (CKA findings skip); without ``results.json`` the
pairs are the (base, descendant) names of the rows, with the names as sources, so that a
hub id matches the registry. A missing layer count is inferred from the rows.

:func:`bundle_schema` documents every column. Floats are written with ``repr`` so that
reading gives back exactly the same float (NaN stays ``nan``); shapes are written as
``64x128`` (``""`` for a scalar); massive positions as ``0;17`` (``""`` for none). Rows
are matched to pairs by the (base, descendant) names of ``results.json``; massive rows
are per model, so on reading each pair gets the rows of its base and its descendant.
Each file is written atomically (temp file + ``os.replace``), so a crash never leaves a
half-written file under the real name.

Public API: :func:`write_bundle`, :func:`read_bundle` -> :class:`Bundle`,
:func:`bundle_schema`, and :func:`atomic_write_text` (also used by the snapshot
extension).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from .diskcheck import file_mode
from .errors import BundleError, RegistryError
from .records import (
    CkaRecord,
    MassiveRecord,
    PairInfo,
    PairResult,
    Verdict,
    WeightRecord,
    trace_sets_of,
)
from .registry import slug
from .tensor_names import parse_tensor_name

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "Bundle",
    "atomic_write_text",
    "bundle_schema",
    "read_bundle",
    "write_bundle",
]

BUNDLE_FORMAT = "reasondiff-bundle"
BUNDLE_VERSION = 2  # 2: weights.csv names the block column ``block`` (1: ``layer``)

_WEIGHT_COLUMNS: dict[str, str] = {
    "base": "base model key or label (PairInfo.base)",
    "descendant": "descendant model key or label (PairInfo.descendant)",
    "tensor": "full tensor name in the checkpoint",
    "block": "0-based decoder block index, -1 outside blocks (version 1: column 'layer')",
    "component": "name inside the block, or the full name outside blocks",
    "shape": "tensor shape as 64x128 (empty for a scalar)",
    "normalized_diff": "||dW||_F / (0.5 ||W_base||_F + 0.5 ||W_new||_F); nan when not comparable",
    "relative_diff": "||dW||_F / ||W_base||_F",
    "mean_abs_diff": "mean |dW|",
    "note": "empty, or missing_in_base / missing_in_descendant / tied / resized:<rows> / renamed:<name> / shape_mismatch",
}
_CKA_COLUMNS: dict[str, str] = {
    "base": "base model key or label",
    "descendant": "descendant model key or label",
    "trace": "<trace set>:<trace id>",
    "layer": "hidden-state index 0..L (0 = embeddings, l = output of block l-1, L = after the final norm)",
    "metric": "linear, rbf, linear_without_dominant, *_prenorm, or a diagnostic",
    "value": "the metric's value for this trace and layer",
}
_MASSIVE_COLUMNS: dict[str, str] = {
    "model": "model key or label (a pair's base or descendant)",
    "trace": "<trace set>:<trace id>",
    "layer": "hidden-state index (as in cka.csv)",
    "positions": "token positions carrying massive activations, ';'-separated",
    "max_abs": "largest |activation| in the layer",
}


#: The columns an imported weights.csv must have; the others may be absent or empty.
_WEIGHT_REQUIRED = ("base", "descendant", "tensor", "normalized_diff")


def bundle_schema() -> dict[str, Any]:
    """What a bundle contains: per file, whether it is required and its columns."""
    return {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "files": {
            "weights.csv": {
                "required": True,
                "columns": dict(_WEIGHT_COLUMNS),
                "required_columns": list(_WEIGHT_REQUIRED),
            },
            "cka.csv": {"required": False, "columns": dict(_CKA_COLUMNS)},
            "massive.csv": {"required": False, "columns": dict(_MASSIVE_COLUMNS)},
            "results.json": {
                "required": False,
                "keys": {
                    "format": f"{BUNDLE_FORMAT!r}",
                    "version": "bundle format version (int)",
                    "pairs": "list of {info: PairInfo fields, trace_sets: [...], notes: [...]}",
                    "verdicts": "list of Verdict fields plus status (pass/fail/observed/error)",
                    "config": "the run's options",
                    "versions": "python, torch, transformers, reasondiff, ... versions",
                },
            },
        },
    }


@dataclass
class Bundle:
    """A bundle read back: the pairs' results, the verdicts, the config and versions."""

    results: list[PairResult]
    verdicts: list[Verdict]
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- writing
def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half.

    The text goes to a temp file in the same directory (same file system, so
    ``os.replace`` is atomic), is flushed and fsync'ed, then renamed over ``path``. On
    any failure the temp file is removed and the old file is left as it was.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; results are for others to read
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fmt_float(x: float) -> str:
    return repr(float(x))


def _csv_text(columns: Iterable[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(rows)
    return buf.getvalue()


def _versions() -> dict[str, str]:
    """Package versions without importing them (importing torch costs seconds)."""
    out = {"python": platform.python_version()}
    for dist in ("reasondiff", "torch", "transformers", "numpy", "safetensors", "syrupy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _jsonable(obj: Any) -> Any:
    """json.dumps fallback for numpy scalars/arrays, tuples in sets, paths and the like."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to results.json: {obj!r}")


def write_bundle(
    out_dir: str | os.PathLike[str],
    results: Sequence[PairResult],
    verdicts: Sequence[Verdict],
    *,
    config: dict[str, Any],
    versions: dict[str, str] | None = None,
) -> None:
    """Write ``weights.csv``, ``cka.csv``, ``massive.csv`` and ``results.json`` to ``out_dir``.

    ``versions`` entries override the collected ones (python, reasondiff, torch,
    transformers, ...). Massive rows are per model: a base shared by several pairs is
    written once per distinct row.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen_pairs: set[tuple[str, str]] = set()
    for res in results:
        key = (res.info.base, res.info.descendant)
        if key in seen_pairs:
            raise BundleError(
                f"two results for the same pair base={key[0]!r}, descendant={key[1]!r}"
            )
        seen_pairs.add(key)

    weight_rows = [
        (
            w.base,
            w.descendant,
            w.tensor,
            w.layer,
            w.component,
            "x".join(str(s) for s in w.shape),
            _fmt_float(w.normalized_diff),
            _fmt_float(w.relative_diff),
            _fmt_float(w.mean_abs_diff),
            w.note,
        )
        for res in results
        for w in res.weights
    ]
    cka_rows = [
        (c.base, c.descendant, c.trace, c.layer, c.metric, _fmt_float(c.value))
        for res in results
        for c in res.cka
    ]
    massive_rows: dict[tuple[Any, ...], None] = {}
    for res in results:
        for m in res.massive:
            row = (
                m.model,
                m.trace,
                m.layer,
                ";".join(str(p) for p in m.positions),
                _fmt_float(m.max_abs),
            )
            massive_rows.setdefault(row, None)

    doc = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "pairs": [
            {"info": r.info.to_dict(), "trace_sets": list(r.trace_sets), "notes": list(r.notes)}
            for r in results
        ],
        "verdicts": [{**v.to_dict(), "status": v.status} for v in verdicts],
        "config": config,
        "versions": {**_versions(), **(versions or {})},
    }
    text = json.dumps(doc, indent=2, default=_jsonable) + "\n"
    atomic_write_text(out / "weights.csv", _csv_text(_WEIGHT_COLUMNS, weight_rows))
    atomic_write_text(out / "cka.csv", _csv_text(_CKA_COLUMNS, cka_rows))
    atomic_write_text(out / "massive.csv", _csv_text(_MASSIVE_COLUMNS, massive_rows))
    atomic_write_text(out / "results.json", text)


# --------------------------------------------------------------------------- reading
T = TypeVar("T")


class _Row:
    """One CSV row with typed getters whose errors name the file, line and column."""

    def __init__(self, fname: str, line: int, data: dict[str, str]) -> None:
        self.fname, self.line, self.data = fname, line, data

    def error(self, msg: str) -> BundleError:
        return BundleError(f"{self.fname} line {self.line}: {msg}")

    def text(self, col: str) -> str:
        value = self.data.get(col)
        if value is None:
            raise self.error(f"column {col!r} is empty (the row has too few fields)")
        return value

    def optional(self, col: str) -> str:
        """The column's text, ``""`` when the file has no such column or the row ends early."""
        return self.data.get(col) or ""

    def _parse(self, col: str, conv: Callable[[str], T], expected: str) -> T:
        raw = self.text(col)
        try:
            return conv(raw.strip())
        except ValueError:
            raise self.error(f"column {col!r}: {raw!r} is not {expected}") from None

    def get_int(self, col: str) -> int:
        return self._parse(col, int, "an integer")

    def get_float(self, col: str) -> float:
        return self._parse(col, float, "a number (nan and inf allowed)")

    def get_ints(self, col: str, sep: str) -> tuple[int, ...]:
        raw = self.text(col).strip()
        if not raw:
            return ()
        return self._parse(
            col,
            lambda s: tuple(int(p) for p in s.split(sep)),
            f"a {sep!r}-separated list of integers",
        )


def _read_csv(path: Path, columns: Iterable[str]) -> list[_Row]:
    return _read_csv_with_header(path, columns)[0]


def _read_csv_with_header(path: Path, columns: Iterable[str]) -> tuple[list[_Row], list[str]]:
    """The rows of ``path`` and its header; every column of ``columns`` must be there."""
    required = list(columns)
    try:
        text = path.read_text("utf-8-sig")  # tolerate a BOM from spreadsheet exports
    except FileNotFoundError:
        raise BundleError(
            f"{path}: missing from the bundle; a bundle needs weights.csv (cka.csv, "
            f"massive.csv and results.json are optional); see bundle_schema()"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: cannot read: {exc}") from exc
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in required if c not in header]
    if missing:
        raise BundleError(
            f"{path} line 1: missing column(s) {', '.join(missing)}; required columns: "
            f"{', '.join(required)} (found: {', '.join(header) or 'no header'})"
        )
    rows = []
    for rec in reader:
        # csv line numbers count physical lines (a quoted field may span several).
        rows.append(
            _Row(str(path), reader.line_num, {k: v for k, v in rec.items() if k is not None})
        )
    return rows, list(header)


def _get(obj: Any, key: str, where: str, typ: type | tuple[type, ...]) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise BundleError(f"{where}: missing key {key!r}")
    value = obj[key]
    if not isinstance(value, typ):
        raise BundleError(f"{where}.{key}: expected {typ}, got {type(value).__name__} {value!r}")
    return value


def _pair_info(d: Any, where: str) -> PairInfo:
    if not isinstance(d, dict):
        raise BundleError(f"{where}: expected an object with PairInfo fields")
    names = [f.name for f in fields(PairInfo)]
    required = [n for n in names if n not in ("expect", "num_layers", "method", "group")]
    missing = [n for n in required if n not in d]
    if missing:
        raise BundleError(
            f"{where}: missing key(s) {', '.join(missing)}; PairInfo needs {', '.join(names)}"
        )
    try:
        return PairInfo(
            **{n: d[n] for n in names if n in d if n != "expect"},
            expect={str(k): bool(v) for k, v in dict(d.get("expect", {})).items()},
        )
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{where}: {exc}") from exc


def _verdict(d: Any, where: str) -> Verdict:
    if not isinstance(d, dict):
        raise BundleError(f"{where}: expected an object with Verdict fields")
    for key in ("finding", "subject", "summary"):
        _get(d, key, where, str)
    for key in ("observed", "expected"):
        if key in d and d[key] is not None and not isinstance(d[key], bool):
            raise BundleError(f"{where}.{key}: expected true, false or null, got {d[key]!r}")
    return Verdict(
        finding=d["finding"],
        subject=d["subject"],
        observed=d.get("observed"),
        expected=d.get("expected"),
        summary=d["summary"],
        details=dict(_get(d, "details", where, dict)) if "details" in d else {},
    )


def _optional_float(row: _Row, col: str) -> float:
    """A number, or NaN when an imported row leaves the column out or empty."""
    if not row.optional(col).strip():
        return math.nan
    return row.get_float(col)


def _weight_record(row: _Row, block_col: str | None) -> WeightRecord:
    """One weights.csv row; block and component from the tensor name when not given."""
    tensor = row.text("tensor")
    parsed_block, parsed_component = parse_tensor_name(tensor)
    block_given = block_col is not None and row.optional(block_col).strip()
    component = row.optional("component")
    shape_txt = row.optional("shape").strip()
    shape = (
        row._parse("shape", lambda s: tuple(int(x) for x in s.split("x")), "a shape like 64x128")
        if shape_txt
        else ()
    )
    return WeightRecord(
        base=row.text("base"),
        descendant=row.text("descendant"),
        tensor=tensor,
        layer=row.get_int(block_col) if block_given and block_col else parsed_block,
        component=component if component.strip() else parsed_component,
        shape=shape,
        normalized_diff=row.get_float("normalized_diff"),
        relative_diff=_optional_float(row, "relative_diff"),
        mean_abs_diff=_optional_float(row, "mean_abs_diff"),
        note=row.optional("note"),
    )


def _infer_num_layers(res: PairResult) -> int:
    """L from the rows: the largest hidden-state layer of cka.csv (which always holds L),
    else the number of decoder blocks seen in weights.csv (blocks 0..L-1); 0 if neither."""
    if res.cka:
        return max(c.layer for c in res.cka)
    return max((w.layer for w in res.weights), default=-1) + 1


def _trace_sets(res: PairResult) -> list[str]:
    """Trace-set names of the pair's CKA rows (``<set>:<id>``), in first-seen order."""
    return trace_sets_of(c.trace for c in res.cka)


def read_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read a bundle back into :class:`PairResult` s (exactly as written) and verdicts.

    Also reads version-1 bundles (weights.csv column ``layer``) and the import format of
    the module docstring (only weights.csv; pairs, trace sets and L inferred from rows).
    Raises :class:`~reasondiff.errors.BundleError` naming the file, the line and what
    was expected for: a missing directory or weights.csv, a missing column, a value that
    is not a number, a row for a pair not listed in ``results.json``, a massive row for
    a model in no pair.
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: results bundle directory does not exist")
    rpath = root / "results.json"
    where = str(rpath)
    doc: dict[str, Any] | None = None
    if rpath.exists():
        try:
            loaded = json.loads(rpath.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{rpath}: not readable JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise BundleError(f"{where}: expected a JSON object with keys pairs, verdicts, config")
        doc = loaded
        fmt = doc.get("format", BUNDLE_FORMAT)
        try:
            version = int(doc.get("version", BUNDLE_VERSION))
        except (TypeError, ValueError):
            version = BUNDLE_VERSION + 1  # refused below, with the value quoted
        if fmt != BUNDLE_FORMAT or not 1 <= version <= BUNDLE_VERSION:
            raise BundleError(
                f"{where}: format {fmt!r} version {doc.get('version')!r}; this reasondiff reads "
                f"{BUNDLE_FORMAT!r} versions 1 to {BUNDLE_VERSION}"
            )

    results: list[PairResult] = []
    by_pair: dict[tuple[str, str], PairResult] = {}
    for i, p in enumerate(_get(doc, "pairs", where, list) if doc is not None else []):
        pw = f"{where} pairs[{i}]"
        info = _pair_info(_get(p, "info", pw, dict), f"{pw}.info")
        key = (info.base, info.descendant)
        if key in by_pair:
            raise BundleError(f"{pw}: pair base={key[0]!r}, descendant={key[1]!r} is listed twice")
        res = PairResult(
            info=info,
            trace_sets=[str(s) for s in p.get("trace_sets", [])],
            notes=[str(s) for s in p.get("notes", [])],
        )
        by_pair[key] = res
        results.append(res)
    known = ", ".join(f"{b}/{d}" for b, d in by_pair) or "none"

    def pair_of(row: _Row) -> PairResult:
        key = (row.text("base"), row.text("descendant"))
        if key in by_pair:
            return by_pair[key]
        if doc is not None:
            raise row.error(
                f"base={key[0]!r}, descendant={key[1]!r} is not a pair in results.json "
                f"(known pairs: {known})"
            )
        # No results.json: the rows name the pairs; the names double as sources so
        # that a hub id finds its registry entry (and its expectations).
        base, desc = key
        try:
            pair_id = f"{slug(base)}__{slug(desc)}"
        except RegistryError as exc:
            raise row.error(f"cannot name the pair: {exc}") from None
        res = PairResult(info=PairInfo(pair_id, base, desc, base, desc))
        by_pair[key] = res
        results.append(res)
        return res

    wpath = root / "weights.csv"
    wrows, wheader = _read_csv_with_header(wpath, _WEIGHT_REQUIRED)
    block_col = "block" if "block" in wheader else ("layer" if "layer" in wheader else None)
    for row in wrows:
        pair_of(row).weights.append(_weight_record(row, block_col))
    if (root / "cka.csv").exists():
        for row in _read_csv(root / "cka.csv", _CKA_COLUMNS):
            pair_of(row).cka.append(
                CkaRecord(
                    base=row.text("base"),
                    descendant=row.text("descendant"),
                    trace=row.text("trace"),
                    layer=row.get_int("layer"),
                    metric=row.text("metric"),
                    value=row.get_float("value"),
                )
            )
    for res in results:
        if res.info.num_layers <= 0:
            res.info.num_layers = _infer_num_layers(res)
        if not res.trace_sets:
            res.trace_sets = _trace_sets(res)
    if (root / "massive.csv").exists():
        models = {m for key in by_pair for m in key}
        for row in _read_csv(root / "massive.csv", _MASSIVE_COLUMNS):
            model = row.text("model")
            if model not in models:
                raise row.error(
                    f"model {model!r} is neither base nor descendant of a pair in the bundle "
                    f"(known models: {', '.join(sorted(models)) or 'none'})"
                )
            rec = MassiveRecord(
                model=model,
                trace=row.text("trace"),
                layer=row.get_int("layer"),
                positions=row.get_ints("positions", ";"),
                max_abs=row.get_float("max_abs"),
            )
            for (base, desc), res in by_pair.items():
                if model in (base, desc):
                    res.massive.append(rec)

    doc = doc or {}
    verdicts = [
        _verdict(v, f"{where} verdicts[{i}]") for i, v in enumerate(doc.get("verdicts", []))
    ]
    config = doc.get("config", {})
    versions = doc.get("versions", {})
    if not isinstance(config, dict) or not isinstance(versions, dict):
        raise BundleError(f"{where}: config and versions must be JSON objects")
    return Bundle(
        results=results,
        verdicts=verdicts,
        config=config,
        versions={str(k): str(v) for k, v in versions.items()},
    )
