"""Where the engine keeps per-(pair, trace, layer) results: keys, locks, rows.

The metric cache (a :class:`~reasondiff.cache.JsonCache`) holds one entry per (pair,
trace, layer) and one manifest per (pair, trace set), written last; the pair lock lets one
process compute a pair while others wait and read. Also the conversions between cache
entries and the records a :class:`~reasondiff.records.PairResult` holds. No torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .metrics.defaults import RBF_MEDIAN
from .records import CkaRecord, DominantRecord, MassiveRecord, PairResult
from .registry import PairSpec
from .runlog import RunLog


class _Miss(Exception):
    """Raised inside a cache compute callback to peek without computing."""


def cache_key(**parts: str) -> str:
    from .cache import cache_key as key

    return str(key(**parts))


def layer_key(pair_key: str, trace_id: str, layer: int) -> str:
    return cache_key(kind="layer", pair=pair_key, trace=trace_id, layer=str(layer))


def _lock_path(root: Path, pair_key: str) -> Path:
    return root / "locks" / f"pair-{pair_key}.lock"


def try_lock(root: Path, pair_key: str) -> Any:
    """A held per-pair file lock, ``None`` if another process holds it, or ``False``
    (meaning: go ahead without a lock) when the cache dir is unusable."""
    from filelock import FileLock, Timeout

    try:
        _lock_path(root, pair_key).parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(_lock_path(root, pair_key)))
        lock.acquire(timeout=0)
    except Timeout:
        return None
    except OSError:  # read-only / full disk: the caches compute in memory anyway
        return False
    return lock


def release(lock: Any) -> None:
    if lock:
        lock.release()


@contextmanager
def blocking_lock(root: Path, pair_key: str) -> Iterator[None]:
    """Wait for the per-pair lock (another process computing the pair)."""
    from filelock import FileLock

    try:
        _lock_path(root, pair_key).parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(_lock_path(root, pair_key)))
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def peek(cache: Any, key: str) -> Any:
    """The cached value for ``key`` or None, never computing (works with any JsonCache)."""
    path_of = getattr(cache, "entry_path", None)
    if callable(path_of) and not Path(path_of(key)).is_file():
        return None
    getter = getattr(cache, "get", None)
    if callable(getter):
        return getter(key)

    def miss() -> Any:
        raise _Miss

    try:
        return cache.get_or_compute(key, miss)
    except _Miss:
        return None


def rows_from_entry(
    entry: dict[str, Any],
    pair: PairSpec,
    trace: str,
    layer: int,
    result: PairResult,
    name: Callable[[int], tuple[int, str]] | None = None,
) -> None:
    """Append one (trace, layer) entry's rows to ``result``.

    ``name(position) -> (token id, text)`` names the tokens of this trace (a
    :meth:`reasondiff.tokens.TokenNamer.for_trace`); without it massive rows carry
    positions only and no dominant rows are made. Entries without ``"dominant"``
    (written before it existed) give no dominant rows.
    """
    from .tokens import massive_tokens

    b, d = pair.base.key, pair.descendant.key
    for metric, value in entry["metrics"].items():
        result.cka.append(CkaRecord(b, d, trace, layer, metric, float(value)))
    for side, model in (("base", b), ("descendant", d)):
        positions, max_abs = entry["massive"][side]
        pos = tuple(int(p) for p in positions)
        result.massive.append(
            MassiveRecord(model, trace, layer, pos, float(max_abs), **massive_tokens(pos, name))
        )
    dominant = entry.get("dominant")
    if name is None or not isinstance(dominant, dict):
        return
    for side, model in (("base", b), ("descendant", d)):
        for position, projection in dominant.get(side, []):
            tid, text = name(int(position))
            result.dominant.append(
                DominantRecord(
                    b, d, trace, layer, model, int(position), tid, text, float(projection)
                )
            )


def rbf_median_key(convention: str) -> dict[str, str]:
    """The metric-cache key part for the RBF median convention.

    Empty for the default, so that caches computed before the option existed stay valid;
    any other convention keys its own entries.
    """
    return {} if convention == RBF_MEDIAN else {"rbf_median": convention}


Entries = dict[str, dict[int, dict[str, Any]]]  # trace id -> layer -> cache entry
Found = tuple[dict[str, Any], Entries]  # (manifest, entries) of one pair on one trace set


class MetricStore:
    """The metric cache of one engine: entries, manifests, the in-process memo, counters.

    A pair on a trace set is complete when its manifest is there (written last) and every
    (trace, layer) entry it names is; :meth:`known` answers from memory or the cache.
    """

    def __init__(self, cache_dir: Path, log: RunLog) -> None:
        self.cache_dir = cache_dir
        self.log = log
        self._cache: Any = None
        self._found: dict[str, Found] = {}

    @property
    def cache(self) -> Any:
        if self._cache is None:
            from .cache import JsonCache

            self._cache = JsonCache(self.cache_dir, "metrics")
        return self._cache

    def known(self, key: str, layers: list[int]) -> Found | None:
        """(manifest, entries[trace][layer]) from this process or the cache, else None."""
        if key in self._found:
            return self._found[key]
        with self.log.stage("metric cache"):
            manifest = peek(self.cache, cache_key(kind="manifest", pair=key))
            if manifest is None:
                return None
            entries: Entries = {}
            for tid in manifest["traces"]:
                entries[tid] = {}
                for lay in layers:
                    entry = peek(self.cache, layer_key(key, tid, lay))
                    if entry is None:
                        return None
                    entries[tid][lay] = entry
        self.log.cache_state(self.cache)
        self.log.stats.metrics_loaded += sum(len(e) for e in entries.values())
        self._found[key] = (manifest, entries)
        return self._found[key]

    def trace_entries(self, key: str, trace_id: str, layers: list[int]) -> dict[int, Any] | None:
        """Every layer's entry of one trace when all are cached, else None."""
        have = {lay: peek(self.cache, layer_key(key, trace_id, lay)) for lay in layers}
        if any(e is None for e in have.values()):
            return None
        self.log.stats.metrics_loaded += len(have)
        return have

    def put(self, key: str, trace_id: str, layer: int, entry: dict[str, Any]) -> Any:
        """Store one computed entry; returns what the cache holds (first writer wins)."""
        stored = self.cache.get_or_compute(layer_key(key, trace_id, layer), lambda: entry)
        self.log.stats.metrics_computed += 1
        return stored

    def complete(self, key: str, manifest: dict[str, Any], entries: Entries) -> Found:
        """Write the pair's manifest (last: it marks the pair complete) and memoize it."""
        stored = self.cache.get_or_compute(cache_key(kind="manifest", pair=key), lambda: manifest)
        self._found[key] = (stored, entries)
        return self._found[key]

    def note_state(self) -> None:
        self.log.cache_state(self.cache)
