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

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import TraceError

if TYPE_CHECKING:
    from .options import DiffOptions
    from .registry import PairSpec, Registry

__all__ = ["TOY", "trace_specs"]

#: The spec naming the embedded toy trace sets ('a' primary, 'b' alternative).
TOY = "toy"

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
