"""Where the engine keeps per-(pair, trace, layer) results: keys, locks, rows.

The metric cache (a :class:`~reasondiff.cache.JsonCache`) holds one entry per (pair,
trace, layer) and one manifest per (pair, trace set), written last; the pair lock lets one
process compute a pair while others wait and read. Also the conversions between cache
entries and the records a :class:`~reasondiff.records.PairResult` holds. No torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .metrics.defaults import RBF_MEDIAN
from .records import CkaRecord, MassiveRecord, PairResult
from .registry import PairSpec


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
    entry: dict[str, Any], pair: PairSpec, trace: str, layer: int, result: PairResult
) -> None:
    b, d = pair.base.key, pair.descendant.key
    for metric, value in entry["metrics"].items():
        result.cka.append(CkaRecord(b, d, trace, layer, metric, float(value)))
    for side, model in (("base", b), ("descendant", d)):
        positions, max_abs = entry["massive"][side]
        result.massive.append(
            MassiveRecord(model, trace, layer, tuple(int(p) for p in positions), float(max_abs))
        )


def rbf_median_key(convention: str) -> dict[str, str]:
    """The metric-cache key part for the RBF median convention.

    Empty for the default, so that caches computed before the option existed stay valid;
    any other convention keys its own entries.
    """
    return {} if convention == RBF_MEDIAN else {"rbf_median": convention}
