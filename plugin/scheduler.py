"""Who computes which pair: claims, waits and reads under xdist (METHODS §11).

A process that needs a pair on a trace set claims it with a non-blocking file lock, and
with it up to ``ceil(k / workers) - 1`` of the base's other uncomputed descendants (as
many as fit in memory and ``pass_size``), and scores them in one pass. "Fit" is measured
the way the pass will hold them: whole model sizes for a whole pass, the streamed bound
(one block per model + one layer of hidden states) for a pass that will stream, so an
over-budget group streams in one pass and each checkpoint is read once per run. A pair claimed by
another process is waited for and read; if that process died or failed, it is computed
here, alone. So a base with k descendants costs at most k + workers forwards per trace.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ReasondiffError
from .metric_store import Found, MetricStore, blocking_lock, release, try_lock
from .registry import PairSpec
from .scoring import Job, PassOutcome, stream_blocker, streamed_pass_bytes

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
        token_counts: Sequence[int] = (),
    ) -> Found:
        """(manifest, entries) of ``pair``: from memory, the cache, a pass, or a wait.
        ``token_counts`` (tokens per trace, an estimate) sizes streamed passes."""
        key = key_of(pair)
        found = self.store.known(key, layers)
        if found is not None:
            return found
        claimed = self.claim(pair, mates, key_of, layers, token_counts)
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
        token_counts: Sequence[int] = (),
    ) -> list[tuple[Job, Any]]:
        """Lock the requested pair and up to ceil(k / workers) - 1 uncomputed siblings,
        as many as fit the memory budget the way the pass will hold them (:meth:`_fits`)."""
        share = max(1, math.ceil((len(mates) + 1) / max(1, self.worker_count or 1)))
        if self.config.pass_size is not None:
            share = min(share, self.config.pass_size)
        budget = self.pool.memory_budget()
        base_dir = self.pool.resolve(pair.base)
        models = [(pair.base.key, base_dir)]
        resident = 0 if self.pool.is_loaded(pair.base.key) else self.pool.model_bytes(base_dir)
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
            dkey = p.descendant.key
            size = 0 if self.pool.is_loaded(dkey) else self.pool.model_bytes(desc_dir)
            with_it = [*models, (dkey, desc_dir)]
            if claimed and not self._fits(with_it, resident + size, budget, token_counts):
                release(lock)  # would not fit beside the others: a later pass takes it
                break
            resident += size
            models = with_it
            claimed.append((Job(pair=p, key=key, desc_dir=desc_dir), lock))
        return claimed

    def _fits(
        self,
        models: list[tuple[str, Path]],
        whole_bytes: int,
        budget: int | None,
        token_counts: Sequence[int],
    ) -> bool:
        """Whether one pass over ``models`` (base first) fits ``budget``. The pass streams
        (``ScoringPass._streaming``) under ``stream_blocks`` or when the whole models do
        not fit, if every model can stream; it then holds the streamed bound, not the
        models, so that bound is what must fit. Otherwise the whole models must."""
        if budget is None:
            return True
        streams = self.config.stream_blocks or whole_bytes > budget
        if streams and stream_blocker(self.pool, models) is None:
            return streamed_pass_bytes(self.pool, models, token_counts) <= budget
        return whole_bytes <= budget
