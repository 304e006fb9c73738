"""Who computes which pair: claims, waits and reads under xdist (METHODS §11).

A process that needs a pair on a trace set claims it with a non-blocking file lock, and
with it up to ``ceil(k / workers) - 1`` of the base's other uncomputed descendants (as
many as fit in memory and ``pass_size``), and scores them in one pass. A pair claimed by
another process is waited for and read; if that process died or failed, it is computed
here, alone. So a base with k descendants costs at most k + workers forwards per trace.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ReasondiffError
from .metric_store import Found, MetricStore, blocking_lock, release, try_lock
from .registry import PairSpec
from .scoring import Job, PassOutcome

if TYPE_CHECKING:
    from .engine_config import EngineConfig
    from .model_pool import ModelPool

#: Runs one pass over claimed jobs of one base (the engine binds trace set and layers).
RunPass = Callable[[list[Job]], PassOutcome]


class Scheduler:
    """Claims pairs for passes and waits for pairs other processes hold."""

    def __init__(
        self,
        config: EngineConfig,
        pool: ModelPool,
        store: MetricStore,
        *,
        worker_count: int | None,
        settled: Callable[[str], bool],
    ) -> None:
        self.config = config
        self.pool = pool
        self.store = store
        self.worker_count = worker_count
        self._settled = settled  # pair id -> already has a result or a failure here

    def entries(
        self,
        pair: PairSpec,
        mates: Sequence[PairSpec],
        key_of: Callable[[PairSpec], str],
        layers: list[int],
        run_pass: RunPass,
    ) -> Found:
        """(manifest, entries) of ``pair``: from memory, the cache, a pass, or a wait."""
        key = key_of(pair)
        found = self.store.known(key, layers)
        if found is not None:
            return found
        claimed = self.claim(pair, mates, key_of, layers)
        try:
            outcome = run_pass([job for job, _ in claimed]) if claimed else PassOutcome()
        finally:
            for _, lock in claimed:
                release(lock)
        if key in outcome.errors:
            raise outcome.errors[key]
        found = outcome.found.get(key) or self.store.known(key, layers)
        if found is not None:
            return found
        # Another process holds this pair: wait for it, then read what it wrote. If it
        # died or failed, compute the pair here, alone.
        with blocking_lock(self.config.cache_dir, key):
            found = self.store.known(key, layers)
            if found is None:
                job = Job(pair=pair, key=key, desc_dir=self.pool.resolve(pair.descendant))
                outcome = run_pass([job])
                if key in outcome.errors:
                    raise outcome.errors[key]
                found = outcome.found.get(key)
        if found is None:  # pragma: no cover - a pass always leaves entries or an error
            raise ReasondiffError(f"{pair.pair_id}: no metric entries after computing them")
        return found

    def claim(
        self,
        pair: PairSpec,
        mates: Sequence[PairSpec],
        key_of: Callable[[PairSpec], str],
        layers: list[int],
    ) -> list[tuple[Job, Any]]:
        """Lock the requested pair and up to ceil(k / workers) - 1 uncomputed siblings."""
        share = max(1, math.ceil((len(mates) + 1) / max(1, self.worker_count or 1)))
        if self.config.pass_size is not None:
            share = min(share, self.config.pass_size)
        # A streamed pass holds one block per model, not whole models: no budget to claim by.
        budget = None if self.config.stream_blocks else self.pool.memory_budget()
        base_key = pair.base.key
        resident = (
            0
            if self.pool.is_loaded(base_key)
            else self.pool.model_bytes(self.pool.resolve(pair.base))
        )
        claimed: list[tuple[Job, Any]] = []
        for p in [pair, *mates]:
            if len(claimed) >= share:
                break
            if p is not pair and self._settled(p.pair_id):
                continue
            try:
                key = key_of(p)
                desc_dir = self.pool.resolve(p.descendant)
            except Exception:
                if p is pair:
                    raise
                continue  # a sibling's problem is reported by its own test
            if self.store.known(key, layers) is not None:
                continue
            lock = try_lock(self.config.cache_dir, key)
            if lock is None:
                continue  # another process is computing it
            if self.store.known(key, layers) is not None:
                release(lock)
                continue
            size = self.pool.model_bytes(desc_dir)
            if claimed and budget is not None and resident + size > budget:
                release(lock)  # would not fit beside the others: a later pass takes it
                break
            resident += size
            claimed.append((Job(pair=p, key=key, desc_dir=desc_dir), lock))
        return claimed
