"""pytest-xdist glue: default scheduling, and shipping worker results to the controller.

Workers compute pairs; the controller only merges what they send back (pytest-cov's
pattern: ``config.workeroutput`` filled in the worker's ``pytest_sessionfinish``, read
in ``pytest_testnodedown`` on the controller). Everything crosses the execnet channel
as plain JSON-like values, so this module converts records to and from dicts.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import pytest

from .records import (
    CacheStats,
    CkaRecord,
    DominantRecord,
    MassiveRecord,
    PairInfo,
    PairResult,
    Verdict,
    dominant_row,
    weight_from_row,
    weight_to_row,
)


def default_to_loadgroup(config: pytest.Config) -> None:
    """``-n N`` or ``--tx`` without ``--dist`` means ``--dist loadgroup`` for this suite.

    Must run before xdist's own ``pytest_cmdline_main`` (which turns a missing
    ``--dist`` into ``load``): the plugin calls it from a hook wrapper around it.
    """
    if hasattr(config, "workerinput"):  # a worker re-parses the controller's --tx: ignore
        return
    opt = config.option
    wants_workers = bool(getattr(opt, "numprocesses", None) or getattr(opt, "tx", None))
    if wants_workers and opt.dist == "no" and not getattr(opt, "distload", False):
        opt.dist = "loadgroup"


_LOADGROUP_KEY = "reasondiff_loadgroup"


def tell_worker_about_loadgroup(node: Any) -> None:
    """Controller side (``pytest_configure_node``): pass the effective ``--dist`` on.

    Workers re-parse the original command line, where ``--dist`` may be absent, and
    xdist only tags node ids with ``@<group>`` (what ``loadgroup`` schedules by) when
    the worker itself believes it runs under ``loadgroup``.
    """
    node.workerinput[_LOADGROUP_KEY] = getattr(node.config.option, "dist", None) == "loadgroup"


def apply_loadgroup_on_worker(config: pytest.Config) -> None:
    """Worker side (``pytest_configure``): honour what the controller decided."""
    inp = getattr(config, "workerinput", None)
    if isinstance(inp, dict) and inp.get(_LOADGROUP_KEY):
        config.option.loadgroup = True


def worker_id(config: pytest.Config) -> str | None:
    """``gw0``... on an xdist worker, None on the controller or without xdist."""
    inp = getattr(config, "workerinput", None)
    if isinstance(inp, dict):
        wid = inp.get("workerid")
        return str(wid) if wid is not None else None
    return os.environ.get("PYTEST_XDIST_WORKER") or None


def worker_count(config: pytest.Config) -> int | None:
    """Number of xdist workers, seen from a worker (None elsewhere)."""
    inp = getattr(config, "workerinput", None)
    if isinstance(inp, dict) and inp.get("workercount"):
        return int(inp["workercount"])
    env = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    return int(env) if env and env.isdigit() else None


def is_controller_of_workers(config: pytest.Config) -> bool:
    """True on the xdist controller when tests run in workers."""
    return config.pluginmanager.has_plugin("dsession")


def pair_result_to_dict(result: PairResult) -> dict[str, Any]:
    """Compact JSON-like form (rows as lists) for the execnet channel."""
    return {
        "info": result.info.to_dict(),
        "weights": [[w.base, w.descendant, *weight_to_row(w)] for w in result.weights],
        "cka": [[c.base, c.descendant, c.trace, c.layer, c.metric, c.value] for c in result.cka],
        "massive": [
            [
                m.model,
                m.trace,
                m.layer,
                list(m.positions),
                m.max_abs,
                list(m.token_ids),
                list(m.tokens),
            ]
            for m in result.massive
        ],
        "dominant": [list(dominant_row(r)) for r in result.dominant],
        "trace_sets": list(result.trace_sets),
        "notes": list(result.notes),
    }


def pair_result_from_dict(d: dict[str, Any]) -> PairResult:
    """Inverse of ``pair_result_to_dict``."""
    return PairResult(
        info=PairInfo(**d["info"]),
        weights=[weight_from_row(r[2:], r[0], r[1]) for r in d["weights"]],
        cka=[CkaRecord(r[0], r[1], r[2], int(r[3]), r[4], float(r[5])) for r in d["cka"]],
        massive=[
            MassiveRecord(
                r[0],
                r[1],
                int(r[2]),
                tuple(r[3]),
                float(r[4]),
                tuple(int(i) for i in (r[5] if len(r) > 5 else ())),
                tuple(str(t) for t in (r[6] if len(r) > 6 else ())),
            )
            for r in d["massive"]
        ],
        dominant=[
            DominantRecord(
                r[0], r[1], r[2], int(r[3]), r[4], int(r[5]), int(r[6]), str(r[7]), float(r[8])
            )
            for r in d.get("dominant", [])  # absent from an older worker's output
        ],
        trace_sets=list(d["trace_sets"]),
        notes=list(d["notes"]),
    )


def pack_worker_output(
    *,
    results: list[PairResult],
    verdicts: list[Verdict],
    stats: CacheStats,
    stage_seconds: dict[str, float],
    notes: list[str],
) -> dict[str, Any]:
    """What a worker sends to the controller at the end of its session."""
    return {
        "results": [pair_result_to_dict(r) for r in results],
        "verdicts": [v.to_dict() for v in verdicts],
        "stats": asdict(stats),
        "stage_seconds": dict(stage_seconds),
        "notes": list(notes),
    }


def unpack_worker_output(
    d: dict[str, Any],
) -> tuple[list[PairResult], list[Verdict], CacheStats, dict[str, float], list[str]]:
    """Inverse of ``pack_worker_output``."""
    return (
        [pair_result_from_dict(r) for r in d.get("results", [])],
        [Verdict(**v) for v in d.get("verdicts", [])],
        CacheStats(**d.get("stats", {})),
        {str(k): float(v) for k, v in d.get("stage_seconds", {}).items()},
        [str(n) for n in d.get("notes", [])],
    )
