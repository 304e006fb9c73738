"""Which trace sets a run compares on: ``--traces``, the group's, or the toy traces.

The toy traces are short synthetic texts made for the toy family; comparing real models
on them measures nothing the study measured. So they are the default only where every
compared model is a toy model (the ``toy`` group, ``--base toy:<recipe>`` pairs); real
models need ``--traces PATH`` (made with ``reasondiff-traces``) or an explicit
``--traces toy``. :func:`trace_specs` decides once, before any work; the pytest layer
turns its error into a usage error (issue 11.5).

What this module is not: it loads no trace file (``traces.py`` does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import TraceError

if TYPE_CHECKING:
    from .options import DiffOptions
    from .registry import PairSpec, Registry

__all__ = ["ROLES", "TOY", "group_trace_file", "trace_specs"]

#: The spec naming the embedded toy trace sets ('a' primary, 'b' alternative).
TOY = "toy"
#: Roles of a group's trace sets (registry ``trace_recipe``: generator, alternative).
ROLES = ("primary", "alternative")


def group_trace_file(directory: str | Path, group: str, role: str) -> Path:
    """Where ``reasondiff-traces --group`` writes (and ``--traces DIR`` finds) a set."""
    if role not in ROLES:
        raise ValueError(f"trace set role {role!r} is not one of {ROLES}")
    return Path(directory).expanduser() / f"{group}-{role}.jsonl"


_HOW = (
    "make traces with `reasondiff-traces --model BASE --problems problems.jsonl --limit 50 "
    "--out traces.jsonl` and pass --traces traces.jsonl (or --traces toy to compare on the "
    "toy traces anyway)"
)


def trace_specs(
    options: DiffOptions, registry: Registry, pairs: Sequence[PairSpec]
) -> tuple[str, str | None]:
    """(primary, alternative or None) trace specs: ``"toy"`` or a JSONL path.

    Raises ``TraceError`` naming the real models when no trace set is given for them.
    """
    group_traces = None
    if not options.adhoc and options.model_group in registry.groups:
        group_traces = registry.groups[options.model_group].traces
    if options.traces and options.traces != TOY and Path(options.traces).expanduser().is_dir():
        return _from_directory(options, Path(options.traces))
    primary = options.traces or group_traces
    if primary is None:
        real = sorted(
            {spec.key for p in pairs for spec in (p.base, p.descendant) if not spec.is_toy}
        )
        if real:
            what = "the ad-hoc pair" if options.adhoc else f"group {options.model_group!r}"
            shown = ", ".join(real[:4]) + (f" and {len(real) - 4} more" if len(real) > 4 else "")
            raise TraceError(
                f"{what} compares real models ({shown}) and names no trace set: the toy "
                f"traces are made for the toy family; {_HOW}"
            )
        primary = TOY
    alternative = options.traces_alt or (TOY if primary == TOY else None)
    return primary, alternative


def _from_directory(options: DiffOptions, directory: Path) -> tuple[str, str | None]:
    """The run's group's sets in ``directory`` (primary required, alternative optional)."""
    if options.adhoc:
        raise TraceError(
            f"--traces {directory} is a directory, which holds a model group's trace sets; "
            "an ad-hoc pair needs --traces FILE.jsonl"
        )
    group = options.model_group
    make = f"`reasondiff-traces --group {group} --out {directory}`"
    primary = group_trace_file(directory, group, "primary")
    if not primary.is_file():
        raise TraceError(
            f"--traces {directory}: no trace set of group {group!r} there (expected "
            f"{primary.name}); make it with {make}"
        )
    _check_complete(primary, make)
    alt = group_trace_file(directory, group, "alternative")
    if options.traces_alt:
        return str(primary), options.traces_alt
    if alt.is_file():
        _check_complete(alt, make)
        return str(primary), str(alt)
    return str(primary), None


def _check_complete(path: Path, make: str) -> None:
    """A set whose header announces more problems than it holds is an interrupted run's."""
    try:
        with path.open(encoding="utf-8") as fh:
            header = json.loads(fh.readline() or "{}")
            rows = sum(1 for line in fh if line.strip())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraceError(f"cannot read the header of trace set {path}: {exc}") from exc
    recipe = header.get("recipe") if isinstance(header, dict) else None
    problems = recipe.get("problems") if isinstance(recipe, dict) else None
    want = problems.get("count") if isinstance(problems, dict) else None
    if isinstance(want, int) and rows < want:
        raise TraceError(
            f"trace set {path} is incomplete ({rows} of {want} traces: its run was "
            f"interrupted); rerun {make} to finish it"
        )
