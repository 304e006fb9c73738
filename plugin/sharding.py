"""Split a run's pairs into n disjoint shards (``--shard i/n``), deterministically.

Why: a group too big for one machine (a sweep of 100 checkpoints, several 32B groups)
runs as n jobs (a Slurm array, a CI matrix) whose bundles are merged afterwards
(``--from-results DIR DIR ...``). The jobs share no cache and no lock: every job
computes the same split from the same pair list, so no coordination is needed.

Rules:
- Shards are 1-based (``1/4`` .. ``4/4``), like a Slurm array ``--array=1-4``.
- Where there are at least as many bases as shards, the descendants of one base stay
  together (each base's forward is paid once per trace, in one shard); bases go to the
  least-loaded shard, biggest first (longest-processing-time order), ties by position.
- Otherwise the pairs, ordered by base, are cut into n contiguous runs whose sizes
  differ by at most one: a base's descendants are split evenly and each part pays one
  base forward per trace.

Not here: selecting the pairs (the session), running them (the engine).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from .errors import ReasondiffError

__all__ = ["Shard", "parse_shard", "shard_pairs", "split_into_shards"]

T = TypeVar("T")

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


class ShardError(ReasondiffError):
    """A ``--shard`` value that is not ``i/n`` with 1 <= i <= n."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"2/4"`` -> ``Shard(2, 4)``; anything else is a :class:`ShardError` quoting it."""
    m = _SHARD.match(text)
    if not m:
        raise ShardError(f"--shard {text!r}: expected i/n, e.g. 1/4 (1-based shard of n)")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or not 1 <= index <= count:
        raise ShardError(f"--shard {text!r}: need 1 <= i <= n and n >= 1, got i={index}, n={count}")
    return Shard(index, count)


def split_into_shards(items: Sequence[T], bases: Sequence[str], count: int) -> list[list[T]]:
    """All ``count`` shards of ``items`` (``bases[j]`` is item j's base key).

    Every item lands in exactly one shard; within a shard, items keep their input order.
    """
    if len(items) != len(bases):
        raise ValueError(f"{len(items)} items but {len(bases)} base keys")
    if count < 1:
        raise ValueError(f"shard count must be >= 1, got {count}")
    groups: dict[str, list[int]] = {}
    for j, base in enumerate(bases):
        groups.setdefault(base, []).append(j)
    owner = [0] * len(items)
    if len(groups) >= count:
        load = [0] * count
        # Biggest base first, then first-seen order: deterministic for equal sizes.
        order = sorted(groups.values(), key=lambda idx: (-len(idx), idx[0]))
        for idx in order:
            target = min(range(count), key=lambda s: (load[s], s))
            load[target] += len(idx)
            for j in idx:
                owner[j] = target
    else:
        ordered = [j for idx in groups.values() for j in idx]
        size, extra = divmod(len(ordered), count)
        start = 0
        for s in range(count):
            stop = start + size + (1 if s < extra else 0)
            for j in ordered[start:stop]:
                owner[j] = s
            start = stop
    shards: list[list[T]] = [[] for _ in range(count)]
    for j, item in enumerate(items):
        shards[owner[j]].append(item)
    return shards


def shard_pairs(items: Sequence[T], bases: Sequence[str], shard: Shard) -> list[T]:
    """The items of one shard (see :func:`split_into_shards`)."""
    return split_into_shards(items, bases, shard.count)[shard.index - 1]
