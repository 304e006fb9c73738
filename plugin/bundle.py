"""The results bundle (kept as the import path): the writer and schema live in
:mod:`reasondiff.bundle_writer`, the tolerant reader and importer in
:mod:`reasondiff.bundle_reader`. Everything public is re-exported here so that
``from reasondiff.bundle import read_bundle, write_bundle`` keeps working.
"""

from __future__ import annotations

from .bundle_reader import read_bundle, verify_manifest
from .bundle_writer import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    CSV_FILES,
    Bundle,
    atomic_write_text,
    bundle_schema,
    file_manifest,
    refresh_manifest,
    write_bundle,
)

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "CSV_FILES",
    "Bundle",
    "atomic_write_text",
    "bundle_schema",
    "file_manifest",
    "read_bundle",
    "refresh_manifest",
    "verify_manifest",
    "write_bundle",
]
