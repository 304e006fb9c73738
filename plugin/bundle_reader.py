"""The tolerant bundle reader and importer: a results bundle back into records, or a clear error.

Reads what :mod:`reasondiff.bundle_writer` writes (format versions 1 and 2) and the
import format of bundles made elsewhere (another tool's per-tensor CSV): only
``weights.csv`` is required, and in it only ``base, descendant, tensor,
normalized_diff``. ``block`` and ``component`` are derived from the tensor name when
absent or empty (:func:`~reasondiff.tensor_names.parse_tensor_name`, the parser the
weight diff uses), other columns may be absent or empty (numbers become NaN; a missing
``shape`` is ``()``, and SFT-vs-RL then tells a matrix by its name). Without
``cka.csv`` the pairs have no CKA rows (CKA findings skip); without ``results.json`` the
pairs are the (base, descendant) names of the rows, with the names as sources, so that a
hub id matches the registry. A missing layer count is inferred from the rows. Rows are
matched to pairs by the (base, descendant) names of ``results.json``; massive rows are
per model, so each pair gets the rows of its base and its descendant. ``dominant.csv``
(dominant datapoints with their tokens) and the token columns of ``massive.csv`` are
optional: bundles written before them replay with those left empty.

Integrity (issue 15.2): when ``results.json`` records ``files`` (row count and sha256
per CSV), a CSV that differs is refused, naming the file and the expected and found
rows, instead of replaying a subset of the pairs. Without that record (imported and
older bundles) a last line cut mid-row (fewer fields than the header, no final
newline) is named as truncated with its line.

Public API: :func:`read_bundle` -> :class:`~reasondiff.bundle_writer.Bundle`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from .bundle_writer import (
    _CKA_COLUMNS,
    _DOMINANT_REQUIRED,
    _MASSIVE_REQUIRED,
    _WEIGHT_REQUIRED,
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    CSV_FILES,
    Bundle,
    count_rows,
)
from .errors import BundleError, RegistryError
from .records import (
    CkaRecord,
    DominantRecord,
    MassiveRecord,
    PairInfo,
    PairResult,
    Verdict,
    WeightRecord,
    infer_num_layers,
    trace_sets_of,
)
from .registry import slug
from .tensor_names import parse_tensor_name

__all__ = ["read_bundle", "verify_manifest"]

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
        data = path.read_bytes()
        text = data.decode("utf-8-sig")  # tolerate a BOM from spreadsheet exports
    except FileNotFoundError:
        raise BundleError(
            f"{path}: missing from the bundle; a bundle needs weights.csv (cka.csv, "
            f"massive.csv, dominant.csv and results.json are optional); see bundle_schema()"
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
    if rows and not text.endswith(("\n", "\r")):
        last = rows[-1]
        given = sum(1 for k, v in last.data.items() if v is not None)
        if given < len(header):
            raise BundleError(
                f"{path} line {last.line}: truncated: the file ends mid-row ({given} of "
                f"{len(header)} fields, no final newline); the file was cut (full disk, "
                f"interrupted copy); copy or write the bundle again"
            )
    return rows, list(header)


def verify_manifest(root: Path, doc: dict[str, Any]) -> list[str]:
    """Check each CSV against the row count and sha256 that ``results.json`` records.

    A bundle without the record (imported, or written before it existed) is not checked.
    A file the record lists but the bundle lacks, a different row count or a cut last
    row raises :class:`BundleError` naming the file, the expected and the found rows (a
    missing cka.csv would otherwise replay every pair as "weights only"); the same rows
    with another checksum (an edit on purpose: rows reordered, a column added) replay,
    with the returned note.
    """
    where = root / "results.json"
    files = doc.get("files")
    if files is None:
        return []
    if not isinstance(files, dict):
        raise BundleError(f"{where}: 'files' must map file names to {{rows, sha256}}")
    notes = []
    for name in CSV_FILES:
        record = files.get(name)
        if record is None:
            continue
        if not isinstance(record, dict) or not {"rows", "sha256"} <= record.keys():
            raise BundleError(f"{where}: files.{name} must be {{rows, sha256}}, got {record!r}")
        path = root / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if name == "weights.csv":
                continue  # the reader names it: "missing from the bundle"
            raise BundleError(
                f"{path}: missing from the bundle, although {where.name} records "
                f"{record['rows']} rows for it; copy or write the bundle again (after a "
                "deliberate removal: reasondiff.bundle.refresh_manifest(DIR))"
            ) from None
        except OSError as exc:
            raise BundleError(f"{path}: cannot read: {exc}") from exc
        if hashlib.sha256(data).hexdigest() == record["sha256"]:
            continue
        found = count_rows(data)
        if data and not data.endswith(b"\n"):
            last_line = data.count(b"\n") + 1
            raise BundleError(
                f"{path} line {last_line}: truncated: the file ends mid-row; "
                f"{found} rows found, {where.name} records {record['rows']}; "
                "write or copy the bundle again"
            )
        if found != record["rows"]:
            raise BundleError(
                f"{path}: {found} rows found, {where.name} records {record['rows']}; the "
                "file was cut or changed after the run wrote it; write or copy the bundle "
                "again (after a deliberate edit: reasondiff.bundle.refresh_manifest(DIR))"
            )
        notes.append(
            f"{path}: differs from the checksum in {where.name} (same {found} rows): "
            "edited after the run; replayed as it is"
        )
    return notes


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


def _massive_tokens(row: _Row, n: int) -> dict[str, Any]:
    """The optional token columns of a massive.csv row (absent or empty: not named).

    When given, each must name one token per position; ``tokens`` is a JSON list.
    """
    out: dict[str, Any] = {}
    if row.optional("token_ids").strip():
        ids = row.get_ints("token_ids", ";")
        if len(ids) != n:
            raise row.error(f"column 'token_ids': {len(ids)} ids for {n} positions")
        out["token_ids"] = ids
    raw = row.optional("tokens").strip()
    if raw:
        try:
            texts = json.loads(raw)
        except ValueError:
            texts = None
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise row.error(f"column 'tokens': {raw!r} is not a JSON list of strings")
        if len(texts) != n:
            raise row.error(f"column 'tokens': {len(texts)} tokens for {n} positions")
        out["tokens"] = tuple(texts)
    return out


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
    a model in no pair or with a non-finite ``max_abs``, a CSV that ``results.json``
    lists but the bundle lacks.
    """
    root = Path(path)
    if root.is_file():
        raise BundleError(
            f"{root}: is a file; --from-results takes the bundle directory (the one "
            f"holding weights.csv and results.json)"
            + (f": {root.parent}" if root.name in ("results.json", *CSV_FILES) else "")
        )
    if not root.is_dir():
        raise BundleError(f"{root}: results bundle directory does not exist")
    rpath = root / "results.json"
    where = str(rpath)
    doc: dict[str, Any] | None = None
    notes: list[str] = []
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
        notes = verify_manifest(root, doc)

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
            res.info.num_layers = infer_num_layers(res)
        if not res.trace_sets:
            res.trace_sets = _trace_sets(res)
    if (root / "massive.csv").exists():
        models = {m for key in by_pair for m in key}
        for row in _read_csv(root / "massive.csv", _MASSIVE_REQUIRED):
            model = row.text("model")
            if model not in models:
                raise row.error(
                    f"model {model!r} is neither base nor descendant of a pair in the bundle "
                    f"(known models: {', '.join(sorted(models)) or 'none'})"
                )
            positions = row.get_ints("positions", ";")
            max_abs = row.get_float("max_abs")
            if not math.isfinite(max_abs):
                # A live run fails on NaN/Inf activations before it writes a row, so a
                # non-finite magnitude is damage: named here, never replayed.
                raise row.error(
                    f"column 'max_abs': {row.text('max_abs').strip()!r} is not finite; a "
                    "massive activation's magnitude is a finite number (a run with NaN or "
                    "Inf activations fails instead of writing one); write the bundle again"
                )
            rec = MassiveRecord(
                model=model,
                trace=row.text("trace"),
                layer=row.get_int("layer"),
                positions=positions,
                max_abs=max_abs,
                **_massive_tokens(row, len(positions)),
            )
            for (base, desc), res in by_pair.items():
                if model in (base, desc):
                    res.massive.append(rec)

    if (root / "dominant.csv").exists():
        for row in _read_csv(root / "dominant.csv", _DOMINANT_REQUIRED):
            res = pair_of(row)
            model = row.text("model")
            if model not in (res.info.base, res.info.descendant):
                raise row.error(
                    f"model {model!r} is neither base {res.info.base!r} nor descendant "
                    f"{res.info.descendant!r} of the row's pair"
                )
            res.dominant.append(
                DominantRecord(
                    base=row.text("base"),
                    descendant=row.text("descendant"),
                    trace=row.text("trace"),
                    layer=row.get_int("layer"),
                    model=model,
                    position=row.get_int("position"),
                    token_id=row.get_int("token_id") if row.optional("token_id").strip() else -1,
                    token=row.optional("token"),
                    projection=row.get_float("projection"),
                )
            )

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
        notes=notes,
    )
