"""Merge several results bundles into one (``--from-results DIR DIR ...``).

Why: a sharded run (``--shard i/n``) leaves one bundle per job; the merge replays them
as one run, so group findings (SFT vs RL) that a shard cannot decide are decided here,
with the same pairs, rows and verdicts as an unsplit run.

A pair that two bundles both hold must have identical rows and identity; bundles whose
measurement settings differ (dtype, layers, max tokens, dominant k, RBF median), that ran
on different device kinds, that computed one model's activations in different dtypes,
or that hold different trace sets under one name (trace-set hash or generator) were not
measured alike. Each is a :class:`~reasondiff.errors.BundleError` naming both bundles.
Per-pair facts that legitimately differ between shards (the resolved dtypes of
different checkpoints, the trace sets' generators and hashes) are unioned in the merged
config, as an unsplit run would have recorded them.

Not here: reading a bundle (``bundle.read_bundle``), deciding verdicts (the findings).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .bundle import Bundle
from .errors import BundleError
from .records import PairResult, Verdict

__all__ = ["MEASUREMENT_KEYS", "merge_bundles", "merged_facts"]

#: Config keys that change the measured rows: bundles that differ in one were not
#: measured alike and must not be merged. Thresholds of the findings are not here: a
#: replay decides verdicts with its own options.
MEASUREMENT_KEYS = ("dtype", "layers", "max_tokens", "dominant_k", "rbf_median")


def _rows(res: PairResult) -> dict[str, list[Any]]:
    """The pair's rows in a canonical order (bundles may list them differently).

    NaN is not equal to itself, so numbers are compared by their ``repr``.
    """

    def canon(rows: Sequence[Any]) -> list[str]:
        return sorted(repr(r) for r in rows)

    return {
        "weights": canon(res.weights),
        "cka": canon(res.cka),
        "massive": canon(res.massive),
        "dominant": canon(res.dominant),
    }


def _differences(a: PairResult, b: PairResult) -> list[str]:
    out = []
    ia, ib = a.info.to_dict(), b.info.to_dict()
    for k in sorted(set(ia) | set(ib)):
        if ia.get(k) != ib.get(k):
            out.append(f"info.{k} {ia.get(k)!r} vs {ib.get(k)!r}")
    ra, rb = _rows(a), _rows(b)
    for what in ra:
        if ra[what] != rb[what]:
            out.append(f"{what} rows differ ({len(ra[what])} vs {len(rb[what])} rows)")
    return out


def _device(config: dict[str, Any]) -> str | None:
    """The device kind that computed the activations (``dtype_resolved``), else the
    ``--device`` option; None when the bundle records neither."""
    resolved = config.get("dtype_resolved") or {}
    return resolved.get("device") or config.get("device")


def _model_dtypes(bundle: Bundle) -> dict[str, str]:
    """``{model key: activation dtype}`` over the bundle's pairs (from their dtype notes)."""
    from .dtypes import pair_dtypes_from_notes

    out: dict[str, str] = {}
    for res in bundle.results:
        found = pair_dtypes_from_notes(
            res.notes, base=res.info.base, descendant=res.info.descendant
        )
        out.update(found)
    return out


def _check_alike(
    a: tuple[Path, Bundle], b: tuple[Path, Bundle], dtypes: dict[Path, dict[str, str]]
) -> None:
    """Raise a BundleError naming both bundles when they were not measured alike."""
    (pa, ba), (pb, bb) = a, b

    def conflict(what: str) -> BundleError:
        return BundleError(f"bundles {pa} and {pb} were measured differently: {what}")

    for k in MEASUREMENT_KEYS:
        if ba.config.get(k) != bb.config.get(k):
            raise conflict(f"config {k} = {ba.config.get(k)!r} vs {bb.config.get(k)!r}")
    da, db = _device(ba.config), _device(bb.config)
    if da is not None and db is not None and da != db:
        raise conflict(f"activations computed on {da!r} vs {db!r}")
    for model in sorted(set(dtypes[pa]) & set(dtypes[pb])):
        if dtypes[pa][model] != dtypes[pb][model]:
            raise conflict(
                f"model {model}'s activations computed in {dtypes[pa][model]} vs "
                f"{dtypes[pb][model]} (resolved dtype)"
            )
    for key, what in (("trace_hashes", "hash"), ("trace_generators", "generator")):
        ta, tb = ba.config.get(key) or {}, bb.config.get(key) or {}
        for name in sorted(set(ta) & set(tb)):
            if ta[name] != tb[name]:
                raise conflict(f"trace set {name!r} has {what} {ta[name]!r} vs {tb[name]!r}")


def merged_facts(configs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The per-pair facts of several bundle configs, unioned: ``dtype_resolved`` (every
    dtype, every device kind), ``trace_generators`` and ``trace_hashes`` (every set).
    Keys no config has are left out, as a bundle that never recorded them reads."""
    out: dict[str, Any] = {}
    resolved = [c["dtype_resolved"] for c in configs if c.get("dtype_resolved")]
    if resolved:
        devices = {d for r in resolved for d in str(r.get("device", "")).split(",") if d}
        out["dtype_resolved"] = {
            "activations": sorted({x for r in resolved for x in r.get("activations", [])}),
            "device": ",".join(sorted(devices)),
        }
    for key in ("trace_generators", "trace_hashes"):
        found = [c[key] for c in configs if key in c]
        if found:
            out[key] = {k: v for d in found for k, v in sorted(d.items())}
    return out


def merge_bundles(bundles: Sequence[tuple[Path, Bundle]]) -> Bundle:
    """One bundle holding every pair of ``bundles`` (each a ``(path, Bundle)``).

    A pair held twice with identical rows is kept once. Verdicts are kept per
    (finding, subject), first seen; group verdicts (subject ``base:<key>``) are dropped,
    since a shard could not decide them and the replay decides them over all pairs.
    """
    if not bundles:
        raise BundleError("no results bundle to merge")
    first = bundles[0][1]
    dtypes = {path: _model_dtypes(bundle) for path, bundle in bundles}
    for i, a in enumerate(bundles):  # every pair of bundles: facts need not be transitive
        for b in bundles[i + 1 :]:
            _check_alike(a, b, dtypes)
    results: list[PairResult] = []
    owner: dict[tuple[str, str], tuple[Path, PairResult]] = {}
    verdicts: dict[tuple[str, str], Verdict] = {}
    for path, bundle in bundles:
        for res in bundle.results:
            key = (res.info.base, res.info.descendant)
            if key in owner:
                other_path, other = owner[key]
                diff = _differences(other, res)
                if diff:
                    raise BundleError(
                        f"pair {res.info.pair_id} (base={key[0]!r}, descendant={key[1]!r}) is in "
                        f"both {other_path} and {path} with different results: " + "; ".join(diff)
                    )
                continue
            owner[key] = (path, res)
            results.append(res)
        for v in bundle.verdicts:
            if not v.subject.startswith("base:"):
                verdicts.setdefault((v.finding, v.subject), v)
    config = dict(first.config)
    config.pop("shard", None)
    for fact in ("dtype_resolved", "trace_generators", "trace_hashes"):
        config.pop(fact, None)
    config.update(merged_facts([b.config for _, b in bundles]))
    config["merged_from"] = [str(p) for p, _ in bundles]
    return Bundle(
        results=results,
        verdicts=list(verdicts.values()),
        config=config,
        versions=dict(first.versions),
    )
