"""Curve snapshot scopes: which folder holds a pair's snapshots, and what a run judges.

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

A label's folder is a slug of the label (``My Run 7`` -> ``labels/my-run-7``), so two
labels may share one: the folder records its label in ``.label``
(:func:`claim_label_scope`), and a run of another label that maps to it is refused.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from syrupy.data import SnapshotCollections

from .errors import ReasondiffError
from .registry import slug
from .snapshot_extension import CurveSnapshotExtension, make_curve_extension

if TYPE_CHECKING:
    from syrupy.location import PyTestLocation

    from .options import DiffOptions
    from .registry import PairSpec, Registry

__all__ = [
    "DEFAULT_SNAPSHOT_DIRNAME",
    "LABEL_MARKER",
    "claim_label_scope",
    "curve_extension",
    "run_snapshot_scope",
    "scoped_curve_extension",
    "snapshot_scope",
]

#: The snapshot root next to the finding tests when ``--snapshot-dir`` is not given.
DEFAULT_SNAPSHOT_DIRNAME = "snapshots"


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
    other_shards: Iterable[PairSpec] = (),
) -> type[CurveSnapshotExtension] | None:
    """The tolerant curve extension storing ``pair``'s snapshots in its scope (None: none).

    ``selected`` are the run's pairs and ``registry`` the loaded registry: the other
    registry pairs of ``pair``'s group that this run did not select (a partial bundle
    replay, say) keep their snapshots out of the run's judgement, while a file of a pair
    the scope no longer has is an orphan. ``other_shards`` are the pairs that other
    ``--shard`` jobs judge: like unselected registry pairs, their files are never seen.
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
    known |= {p.pair_id for p in other_shards if snapshot_scope(p) == scope}
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


#: The file in a label's snapshot folder that records which label owns it.
LABEL_MARKER = ".label"


def claim_label_scope(root: Path, label: str, *, write: bool) -> Path:
    """The folder ``root/labels/<slug>`` of ``label``, refused when another label owns it.

    ``--label a/b`` and ``--label a-b`` have one slug: without a record, the second
    series would be judged against (and, with ``--snapshot-update``, overwrite) the
    first one's curves. The folder's :data:`LABEL_MARKER` names its label; ``write``
    (snapshots are being accepted) records it when absent. A folder without a marker
    (made before markers existed) is taken as the label's.
    """
    folder = Path(root) / "labels" / slug(label)
    marker = folder / LABEL_MARKER
    try:
        owner = marker.read_text("utf-8").strip()
    except FileNotFoundError:
        owner = None
    except OSError as exc:
        raise ReasondiffError(f"{marker}: cannot read the label record: {exc}") from exc
    if owner is not None and owner != label:
        raise ReasondiffError(
            f"--label {label!r} and --label {owner!r} share the snapshot folder {folder} "
            f"(both slug to {slug(label)!r}); give this series a label of its own"
        )
    if owner is None and write:
        from .bundle_writer import atomic_write_text

        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, label + "\n")
    return folder
