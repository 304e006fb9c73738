"""Curve snapshots (kept as the import path): the syrupy extension that compares per-layer
curves within a tolerance is :mod:`reasondiff.snapshot_extension`; where a pair's files
live and what a run judges (the scope policy) is :mod:`reasondiff.snapshot_scopes`.
Everything public is re-exported here so that existing imports keep working.
"""

from __future__ import annotations

from .snapshot_extension import (
    CurveSnapshotExtension,
    ParsedCurve,
    make_curve_extension,
    parse_curve,
)
from .snapshot_scopes import (
    DEFAULT_SNAPSHOT_DIRNAME,
    LABEL_MARKER,
    claim_label_scope,
    curve_extension,
    run_snapshot_scope,
    scoped_curve_extension,
    snapshot_scope,
)

__all__ = [
    "DEFAULT_SNAPSHOT_DIRNAME",
    "LABEL_MARKER",
    "CurveSnapshotExtension",
    "ParsedCurve",
    "claim_label_scope",
    "curve_extension",
    "make_curve_extension",
    "parse_curve",
    "run_snapshot_scope",
    "scoped_curve_extension",
    "snapshot_scope",
]
