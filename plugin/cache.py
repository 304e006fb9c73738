"""On-disk caches: activations (safetensors) and small JSON results, content-keyed.

Both caches follow one protocol so that many pytest-xdist workers can share a cache
directory: look -> take ``<entry>.lock`` -> look again -> compute -> write a temp file
in the same directory -> fsync -> ``os.replace``. Readers never see a half-written
entry, and a key is computed at most once across processes. Every read is validated
(header, expected metadata, shapes, size, checksum); a bad entry is logged on the
``reasondiff`` logger, recorded in ``stats.invalid_entries``, deleted and recomputed.
A cache directory that cannot be written (read-only, full disk, not a directory) turns
disk caching off once, with the reason in ``stats.disabled_reason``; values are then
computed in memory and are still correct.

What this module is not: it does not know how to compute anything, and it does not
decide keys beyond hashing the parts it is given (``cache_key``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import struct
import tempfile
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save_file

from .diskcheck import default_cache_dir, file_mode
from .errors import CacheEntryError

__all__ = [
    "EXTRACTION_VERSION",
    "ActivationCache",
    "CacheCounters",
    "JsonCache",
    "cache_key",
    "default_cache_dir",
    "file_mode",
]

#: Bump when what ``extract_activations`` returns changes meaning (keys every entry).
EXTRACTION_VERSION = "1"
#: Bump when the on-disk entry layout changes.
FORMAT_VERSION = "1"

log = logging.getLogger("reasondiff")

_RESERVED = "__reasondiff__"  # safetensors metadata key holding shapes + checksum
_MiB = 1024 * 1024


@dataclass
class CacheCounters:
    """What a cache did in this process: for the report's cache line and for tests."""

    computed: int = 0
    loaded: int = 0  # disk loads and in-memory hits
    memory_hits: int = 0
    evicted: int = 0
    invalid_entries: list[str] = field(default_factory=list)  # "<path>: <why>"
    disabled_reason: str | None = None


def cache_key(**parts: str) -> str:
    """sha256 over the sorted parts plus ``EXTRACTION_VERSION``; hex, 64 characters."""
    for name, value in parts.items():
        if not isinstance(value, str):
            raise TypeError(f"cache_key part {name}={value!r} must be a str")
    payload = json.dumps(
        {"parts": sorted(parts.items()), "extraction_version": EXTRACTION_VERSION},
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


# --------------------------------------------------------------------- shared protocol
class _DiskCache:
    """Locking, atomic writes and the one-time "caching is off" switch."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.stats = CacheCounters()

    @property
    def disabled(self) -> bool:
        return self.stats.disabled_reason is not None

    def _disable(self, exc: OSError, what: str) -> None:
        if self.stats.disabled_reason is None:
            reason = f"cannot {what} under {self.root}: {exc.strerror or exc}"
            if exc.errno is not None:
                reason += f" ({errno.errorcode.get(exc.errno, exc.errno)})"
            self.stats.disabled_reason = reason
            log.warning("reasondiff cache disabled, computing in memory: %s", reason)

    def _invalid(self, path: Path, why: str) -> None:
        self.stats.invalid_entries.append(f"{path}: {why}")
        log.warning("reasondiff cache: discarding invalid entry %s (%s)", path, why)
        with contextlib.suppress(OSError):
            path.unlink()

    def _unreadable(self, path: Path, exc: OSError) -> None:
        """An entry this user may not read (another user's, older than the umask fix) is
        not damaged: it is left in place, recomputed, and replaced by a readable one."""
        log.warning("reasondiff cache: cannot read %s (%s); recomputing it", path, exc.strerror)

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[bool]:
        """Hold ``<path>.lock``; yields False (and disables caching) if that is impossible."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(path) + ".lock")
            lock.acquire()
        except OSError as exc:
            self._disable(exc, "create a cache entry")
            yield False
            return
        try:
            yield True
        finally:
            lock.release()

    def _atomic_write(self, path: Path, write: Callable[[str], None]) -> bool:
        """``write(tmp)`` then fsync + ``os.replace``; False (caching off) on OSError."""
        tmp: str | None = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            write(tmp)
            # mkstemp makes 0600 (and a writer may recreate the file): in a cache shared by
            # several users, another user could not read the entry (and used to discard it
            # as invalid). Respect the umask, as open() would.
            os.chmod(tmp, file_mode())
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            tmp = None
            return True
        except OSError as exc:
            self._disable(exc, f"write {path.name}")
            return False
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


# --------------------------------------------------------------------- activations
class ActivationCache(_DiskCache):
    """Activations per (model, trace, ...) key: safetensors files + an in-memory LRU.

    ``cap_bytes`` bounds the total size of entries on disk (least recently used are
    evicted after each write; None = unbounded). ``memory_budget_bytes`` bounds the
    in-process LRU of recently used entries. Returned tensors are shared with that LRU:
    treat them as read-only.
    """

    def __init__(
        self,
        root: Path,
        *,
        cap_bytes: int | None,
        memory_budget_bytes: int = 512 * _MiB,
    ) -> None:
        super().__init__(root)
        self.cap_bytes = cap_bytes
        self.memory_budget_bytes = memory_budget_bytes
        self._memory: OrderedDict[str, tuple[dict[str, str], dict[str, torch.Tensor], int]] = (
            OrderedDict()
        )
        self._memory_bytes = 0

    @property
    def directory(self) -> Path:
        return self.root / "activations"

    def entry_path(self, key: str) -> Path:
        _check_key(key)
        return self.directory / key[:2] / f"{key}.safetensors"

    def get_or_compute(
        self,
        key: str,
        meta: dict[str, str],
        compute: Callable[[], dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """The tensors for ``key``: from memory, from disk (validated), or computed once."""
        meta = _check_meta(meta)
        path = self.entry_path(key)
        cached = self._memory_get(key, meta)
        if cached is not None:
            return cached
        if not self.disabled:
            loaded = self._load(path, meta)
            if loaded is not None:
                return self._remember(key, meta, loaded)
            with self._locked(path) as ok:
                if ok:
                    loaded = self._load(path, meta)  # another process may have written it
                    if loaded is not None:
                        return self._remember(key, meta, loaded)
                    tensors = self._compute(compute)
                    if self._atomic_write(path, lambda tmp: _save(tensors, meta, tmp)):
                        self._evict(keep=path)
                    return self._remember(key, meta, tensors)
        return self._remember(key, meta, self._compute(compute))

    # -- internals
    def _compute(self, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        tensors = compute()
        self.stats.computed += 1
        return _prepare(tensors)

    def _load(self, path: Path, meta: dict[str, str]) -> dict[str, torch.Tensor] | None:
        if not path.is_file():
            return None
        try:
            tensors = _read_validated(path, meta)
        except FileNotFoundError:
            return None
        except PermissionError as exc:
            self._unreadable(path, exc)
            return None
        except CacheEntryError as exc:
            self._invalid(path, str(exc))
            return None
        self.stats.loaded += 1
        _touch(path)
        return tensors

    def _memory_get(self, key: str, meta: dict[str, str]) -> dict[str, torch.Tensor] | None:
        item = self._memory.get(key)
        if item is None or item[0] != meta:
            return None
        self._memory.move_to_end(key)
        self.stats.loaded += 1
        self.stats.memory_hits += 1
        if not self.disabled:
            _touch(self.entry_path(key))  # other processes evict by the disk clock
        return dict(item[1])

    def _remember(
        self, key: str, meta: dict[str, str], tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        old = self._memory.pop(key, None)
        if old is not None:
            self._memory_bytes -= old[2]
        if size <= self.memory_budget_bytes:
            self._memory[key] = (dict(meta), tensors, size)
            self._memory_bytes += size
            while self._memory_bytes > self.memory_budget_bytes:
                _, (_, _, dropped) = self._memory.popitem(last=False)
                self._memory_bytes -= dropped
        return dict(tensors)

    def _evict(self, *, keep: Path) -> None:
        """Delete least recently used entries until the total is within ``cap_bytes``."""
        if self.cap_bytes is None:
            return
        entries: list[tuple[int, str, Path, int]] = []
        for p in self.directory.glob("*/*.safetensors"):
            try:
                st = p.stat()
            except OSError:
                continue
            entries.append((st.st_mtime_ns, p.name, p, st.st_size))
        total = sum(e[3] for e in entries)
        for _, _, p, size in sorted(entries):
            if total <= self.cap_bytes:
                break
            if p == keep:
                continue
            try:
                p.unlink()
            except FileNotFoundError:
                pass  # evicted by another process: it no longer counts either
            except OSError as exc:
                log.warning("reasondiff cache: cannot evict %s: %s", p, exc)
                continue
            total -= size
            self.stats.evicted += 1


def _touch(path: Path) -> None:
    """The LRU clock is the entry's mtime: set it to now (best effort)."""
    with contextlib.suppress(OSError):
        now = time.time_ns()
        os.utime(path, ns=(now, now))


def _check_key(key: str) -> None:
    if len(key) < 3 or not all(c.isalnum() or c in "-_" for c in key):
        raise ValueError(f"cache key {key!r} must be >= 3 characters of [A-Za-z0-9_-]")


def _check_meta(meta: dict[str, str]) -> dict[str, str]:
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"cache meta {k!r}={v!r}: keys and values must be str")
        if k == _RESERVED:
            raise ValueError(f"cache meta key {_RESERVED!r} is reserved")
    return dict(meta)


def _prepare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no shared storage: what safetensors can write."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cache compute returned {type(t).__name__} for {name!r}, not a Tensor")
        x = t.detach().cpu().contiguous()
        ptr = x.untyped_storage().data_ptr()
        if ptr in seen:
            x = x.clone()
            ptr = x.untyped_storage().data_ptr()
        seen.add(ptr)
        out[name] = x
    return out


def _crc(tensors: dict[str, torch.Tensor]) -> str:
    """CRC32 over names and raw bytes: catches bit flips at ~3 GB/s (sha256: ~0.4 GB/s)."""
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(name.encode(), crc)
        t = tensors[name]
        if t.numel():
            crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().data, crc)
    return f"{crc:08x}"


def _save(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: str) -> None:
    record = {
        "format": FORMAT_VERSION,
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        "crc32": _crc(tensors),
    }
    save_file(tensors, path, metadata={**meta, _RESERVED: json.dumps(record, sort_keys=True)})


def _expected_size(path: Path) -> int:
    """File size implied by the safetensors header: 8 + header length + data length."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise CacheEntryError(f"header truncated ({len(head)} bytes)")
        n = int(struct.unpack("<Q", head)[0])
        if n > 100 * _MiB:
            raise CacheEntryError(f"implausible header length {n}")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise CacheEntryError(f"header is not JSON: {exc}") from exc
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


def _read_validated(path: Path, meta: dict[str, str]) -> dict[str, torch.Tensor]:
    """Tensors of a valid entry; ``CacheEntryError`` saying what is wrong otherwise."""
    try:
        size = path.stat().st_size
        expected = _expected_size(path)
    except (FileNotFoundError, PermissionError):
        raise
    except (OSError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise CacheEntryError(f"unreadable header: {exc!r}") from exc
    if size != expected:
        raise CacheEntryError(f"size {size} bytes, header implies {expected}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            stored = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError type
        raise CacheEntryError(f"cannot read: {exc}") from exc
    try:
        record = json.loads(stored.pop(_RESERVED))
        shapes = {k: list(v) for k, v in record["shapes"].items()}
        crc = record["crc32"]
        fmt = record["format"]
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CacheEntryError(f"missing or bad {_RESERVED} record: {exc!r}") from exc
    if fmt != FORMAT_VERSION:
        raise CacheEntryError(f"format {fmt!r}, expected {FORMAT_VERSION!r}")
    if stored != meta:
        diff = sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k))
        raise CacheEntryError(f"metadata differs from the expected in {diff}")
    actual = {k: list(v.shape) for k, v in tensors.items()}
    if actual != shapes:
        raise CacheEntryError(f"tensors/shapes {actual} differ from recorded {shapes}")
    if _crc(tensors) != crc:
        raise CacheEntryError("checksum mismatch (data corrupted)")
    return tensors


# --------------------------------------------------------------------- JSON values
class JsonCache(_DiskCache):
    """Small JSON values (weight-diff records, metric results) under ``root/json/<namespace>``.

    Values are round-tripped through JSON even when just computed, so a cold and a warm
    run return identical types (lists, never tuples). NaN/Inf floats are allowed.
    """

    def __init__(self, root: Path, namespace: str) -> None:
        super().__init__(root)
        if not namespace or not all(c.isalnum() or c in "-_." for c in namespace):
            raise ValueError(f"JsonCache namespace {namespace!r} must be [A-Za-z0-9._-]+")
        self.namespace = namespace

    @property
    def directory(self) -> Path:
        return self.root / "json" / self.namespace

    def entry_path(self, key: str) -> Path:
        _check_key(key)
        return self.directory / key[:2] / f"{key}.json"

    def get_or_compute(self, key: str, compute: Callable[[], Any]) -> Any:
        """The value for ``key``: from disk (validated) or computed once across processes."""
        path = self.entry_path(key)
        if not self.disabled:
            found, value = self._load(path, key)
            if found:
                return value
            with self._locked(path) as ok:
                if ok:
                    found, value = self._load(path, key)
                    if found:
                        return value
                    payload, text = self._compute(key, compute)

                    def write(tmp: str) -> None:
                        Path(tmp).write_text(text, "utf-8")

                    self._atomic_write(path, write)
                    return payload
        return self._compute(key, compute)[0]

    def get(self, key: str) -> Any | None:
        """The cached value, or None when absent / invalid / caching is off; never computes."""
        if self.disabled:
            return None
        return self._load(self.entry_path(key), key)[1]

    def _compute(self, key: str, compute: Callable[[], Any]) -> tuple[Any, str]:
        value = compute()
        self.stats.computed += 1
        body = _canonical(value)
        payload = json.loads(body)
        text = json.dumps(
            {
                "format": FORMAT_VERSION,
                "key": key,
                "sha256": hashlib.sha256(body.encode()).hexdigest(),
                "payload": payload,
            }
        )
        return payload, text

    def _load(self, path: Path, key: str) -> tuple[bool, Any]:
        if not path.is_file():
            return False, None
        try:
            text = path.read_text("utf-8")
        except FileNotFoundError:
            return False, None
        except PermissionError as exc:
            self._unreadable(path, exc)
            return False, None
        except (OSError, UnicodeDecodeError) as exc:
            self._invalid(path, f"unreadable: {exc}")
            return False, None
        try:
            doc = json.loads(text)
            payload = doc["payload"]
            ok = (
                doc["format"] == FORMAT_VERSION
                and doc["key"] == key
                and doc["sha256"] == hashlib.sha256(_canonical(payload).encode()).hexdigest()
            )
        except (ValueError, KeyError, TypeError) as exc:
            self._invalid(path, f"not a cache document: {exc!r}")
            return False, None
        if not ok:
            self._invalid(path, "format, key or checksum mismatch")
            return False, None
        self.stats.loaded += 1
        return True, payload


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
