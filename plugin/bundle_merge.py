"""Merge several results bundles into one (``--from-results DIR DIR ...``).

Why: a sharded run (``--shard i/n``) leaves one bundle per job; the merge replays them
as one run, so group findings (SFT vs RL) that a shard cannot decide are decided here,
with the same pairs, rows and verdicts as an unsplit run.

A pair that two bundles both hold must have identical rows and identity; bundles whose
measurement settings differ (dtype, layers, max tokens, dominant k, RBF median) were not
measured alike. Either is a :class:`~reasondiff.errors.BundleError` naming both bundles.

Not here: reading a bundle (``bundle.read_bundle``), deciding verdicts (the findings).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .bundle import Bundle
from .errors import BundleError
from .records import PairResult, Verdict

__all__ = ["MEASUREMENT_KEYS", "merge_bundles"]

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


def merge_bundles(bundles: Sequence[tuple[Path, Bundle]]) -> Bundle:
    """One bundle holding every pair of ``bundles`` (each a ``(path, Bundle)``).

    A pair held twice with identical rows is kept once. Verdicts are kept per
    (finding, subject), first seen; group verdicts (subject ``base:<key>``) are dropped,
    since a shard could not decide them and the replay decides them over all pairs.
    """
    if not bundles:
        raise BundleError("no results bundle to merge")
    first_path, first = bundles[0]
    reference = {k: first.config.get(k) for k in MEASUREMENT_KEYS}
    for path, bundle in bundles[1:]:
        for k in MEASUREMENT_KEYS:
            if bundle.config.get(k) != reference[k]:
                raise BundleError(
                    f"bundles {first_path} and {path} were measured differently: "
                    f"config {k} = {reference[k]!r} vs {bundle.config.get(k)!r}"
                )
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
    config["merged_from"] = [str(p) for p, _ in bundles]
    return Bundle(
        results=results,
        verdicts=list(verdicts.values()),
        config=config,
        versions=dict(first.versions),
    )
