"""What one engine run has done so far: cache counters, stage times, notes, forwards.

Every room of the engine (model pool, metric store, scoring pass) writes into the same
:class:`RunLog`, so the session, the xdist merge and the report read one set of numbers.
No torch, no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .records import CacheStats


@dataclass
class RunLog:
    """Counters shared by the engine's parts (the engine exposes them as attributes)."""

    stats: CacheStats = field(default_factory=CacheStats)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    forwards: int = 0

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the wall time of the block to ``stage_seconds[name]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + time.perf_counter() - t0

    def note(self, text: str) -> None:
        """Add a run-level note once."""
        if text not in self.notes:
            self.notes.append(text)

    def cache_state(self, cache: Any) -> None:
        """Carry a cache's disabled reason and discarded entries into the run's notes."""
        stats = getattr(cache, "stats", None)
        reason = getattr(stats, "disabled_reason", None)
        if reason and not self.stats.caching_disabled_reason:
            self.stats.caching_disabled_reason = str(reason)
        # A damaged entry is recomputed silently otherwise (its log line is captured).
        for entry in getattr(stats, "invalid_entries", None) or ():
            self.note(f"cache entry discarded and recomputed: {entry}")
