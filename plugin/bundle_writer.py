"""The results bundle's schema and writer: every measured row and verdict of a run, as files.

A bundle is a directory that a live run writes (``--report-dir``) and that a later run
replays without models (``--from-results``, read by :mod:`reasondiff.bundle_reader`),
or that someone else produced:

- ``weights.csv``  one row per weight tensor (:class:`~reasondiff.records.WeightRecord`)
- ``cka.csv``      one row per (pair, trace, layer, metric) (:class:`~reasondiff.records.CkaRecord`)
- ``massive.csv``  massive-activation positions per (model, trace, layer), with the token
  id and text at each position
- ``dominant.csv`` per (pair, trace, layer) the top-k dominant datapoints of each side:
  position, token id, token text (decoded on its own with the base's tokenizer) and
  |PC1 projection| (:class:`~reasondiff.records.DominantRecord`)
- ``results.json`` the pairs (:class:`~reasondiff.records.PairInfo`, trace sets, notes),
  the verdicts with expectation and status, the run's config and package versions, and
  ``files``: each CSV's row count and sha256, so that a replay names a file that was
  cut or changed after the run (written last: a bundle with a results.json is complete)

Layer numbering (format version 2): weight rows carry ``block``, the 0-based decoder
block index (-1 outside the blocks); CKA and massive rows carry ``layer``, the
hidden-state index (0 = embeddings, l >= 1 = output of block l - 1, L = after the final
norm). Version-1 bundles named the weight column ``layer`` (same numbers, the block
index); they are still read.

:func:`bundle_schema` documents every column (and the import format the reader
tolerates). Floats are written with ``repr`` so that reading gives back exactly the
same float (NaN stays ``nan``); shapes are written as ``64x128`` (``""`` for a
scalar); massive positions and their token ids as ``0;17`` (``""`` for none), their
token texts as a JSON list (a token may hold ``;``, quotes or a newline). Each file is written
atomically (temp file + ``os.replace``), so a crash never leaves a half-written file
under the real name.

Public API: :func:`write_bundle`, :func:`bundle_schema`, :func:`file_manifest`,
:func:`refresh_manifest`, :class:`Bundle` and :func:`atomic_write_text` (also used by
the snapshot extension).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .diskcheck import file_mode
from .errors import BundleError
from .records import PairResult, Verdict, dominant_row, massive_row

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "CSV_FILES",
    "Bundle",
    "atomic_write_text",
    "bundle_schema",
    "file_manifest",
    "refresh_manifest",
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
    "token_ids": "token id at each position, ';'-separated (optional; -1 = not named)",
    "tokens": "token text at each position, a JSON list of strings, decoded with the base's tokenizer (optional)",
}
#: The columns an imported massive.csv must have (the token columns came later).
_MASSIVE_REQUIRED = ("model", "trace", "layer", "positions", "max_abs")
_DOMINANT_COLUMNS: dict[str, str] = {
    "base": "base model key or label",
    "descendant": "descendant model key or label",
    "trace": "<trace set>:<trace id>",
    "layer": "hidden-state index (as in cka.csv)",
    "model": "the side: the pair's base or descendant",
    "position": "token position in the trace (0-based)",
    "token_id": "token id at that position (-1 = not named)",
    "token": "the id decoded on its own with the base's tokenizer (special tokens kept)",
    "projection": "|projection on PC1| of the token's centred hidden state (METHODS §5)",
}
#: The columns a dominant.csv must have; token_id and token may be absent or empty.
_DOMINANT_REQUIRED = ("base", "descendant", "trace", "layer", "model", "position", "projection")


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
            "massive.csv": {
                "required": False,
                "columns": dict(_MASSIVE_COLUMNS),
                "required_columns": list(_MASSIVE_REQUIRED),
            },
            "dominant.csv": {
                "required": False,
                "columns": dict(_DOMINANT_COLUMNS),
                "required_columns": list(_DOMINANT_REQUIRED),
            },
            "results.json": {
                "required": False,
                "keys": {
                    "format": f"{BUNDLE_FORMAT!r}",
                    "version": "bundle format version (int)",
                    "pairs": "list of {info: PairInfo fields, trace_sets: [...], notes: [...]}",
                    "verdicts": "list of Verdict fields plus status (pass/fail/observed/error)",
                    "config": "the run's options",
                    "versions": "python, torch, transformers, reasondiff, ... versions",
                    "files": "per CSV {rows: data rows, sha256: hex digest}; optional",
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
    notes: list[str] = field(default_factory=list)  # what the reader accepted and says so


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
    """Write ``weights.csv``, ``cka.csv``, ``massive.csv``, ``dominant.csv`` and
    ``results.json`` to ``out_dir``.

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
            massive_rows.setdefault(massive_row(m, _fmt_float), None)
    dominant_rows = [dominant_row(r, _fmt_float) for res in results for r in res.dominant]

    doc: dict[str, Any] = {
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
    texts = {
        "weights.csv": _csv_text(_WEIGHT_COLUMNS, weight_rows),
        "cka.csv": _csv_text(_CKA_COLUMNS, cka_rows),
        "massive.csv": _csv_text(_MASSIVE_COLUMNS, massive_rows),
        "dominant.csv": _csv_text(_DOMINANT_COLUMNS, dominant_rows),
    }
    for name, csv_text in texts.items():
        atomic_write_text(out / name, csv_text)
    doc["files"] = {name: file_manifest(t.encode("utf-8")) for name, t in texts.items()}
    # results.json last: its presence says the CSVs it describes are complete.
    atomic_write_text(out / "results.json", json.dumps(doc, indent=2, default=_jsonable) + "\n")


#: The CSV files of a bundle, in the order they are written and checked.
CSV_FILES = ("weights.csv", "cka.csv", "massive.csv", "dominant.csv")


def count_rows(data: bytes) -> int:
    """Data rows of a CSV file's bytes (header excluded; quoted newlines respected)."""
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig", errors="replace"), newline=""))
    return max(sum(1 for _ in reader) - 1, 0)


def file_manifest(data: bytes) -> dict[str, Any]:
    """``{"rows": n, "sha256": hex}`` of a CSV file's bytes, as ``results.json`` records it."""
    return {"rows": count_rows(data), "sha256": hashlib.sha256(data).hexdigest()}


def refresh_manifest(path: str | os.PathLike[str]) -> None:
    """Re-record the row counts and checksums of a bundle whose CSVs were edited on purpose.

    A replay refuses a CSV that differs from its ``results.json`` record; after a
    deliberate edit (fixing a label, say) run this to accept the files as they are.
    """
    root = Path(path)
    rpath = root / "results.json"
    try:
        doc = json.loads(rpath.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{rpath}: cannot refresh the file manifest: {exc}") from exc
    doc["files"] = {
        name: file_manifest((root / name).read_bytes())
        for name in CSV_FILES
        if (root / name).is_file()
    }
    atomic_write_text(rpath, json.dumps(doc, indent=2) + "\n")
