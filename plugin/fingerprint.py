"""Content fingerprints of checkpoints, cheap enough for 7B models.

A fingerprint keys the activation and weight-diff caches, so it must change whenever
the config or a weight file changes and must not cost a full read of 15 GB on every
run. Files that live in a Hugging Face hub cache are symlinks to ``blobs/<etag>``; the
etag *is* the content hash (sha256 for LFS files), so it is used as-is. Other files are
hashed once and memoized by (realpath, inode, size, mtime_ns, ctime_ns), in-process and
in a small JSON side file under the cache, so that later processes and xdist workers
skip the hash too.

This module only reads files; it knows nothing about models or pytest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path

from .diskcheck import file_mode
from .errors import ModelLoadError

#: Files whose content defines a checkpoint's behaviour for this suite.
#: ``pytorch_model*.bin``, not ``*.bin``: fine-tuned repos ship ``training_args.bin``.
WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
)
_MEMO_FILE = "fingerprints.json"
_BLOB_NAME = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")
_MEMO: dict[str, str] = {}
_MEMO_LOCK = threading.Lock()
_CHUNK = 8 * 1024 * 1024


def fingerprint(path: Path | str, *, memo_dir: Path | None = None) -> str:
    """Hex sha256 over the names and content digests of config.json and the weight files.

    ``memo_dir`` (e.g. the cache root) holds a JSON memo of file digests so that a later
    process does not re-hash unchanged large files; it is optional and best effort.
    """
    root = Path(path)
    config = root / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"cannot fingerprint {root}: no config.json there")
    files = {config}
    for pattern in WEIGHT_PATTERNS:
        files.update(p for p in root.glob(pattern) if p.is_file())
    if len(files) == 1:
        raise ModelLoadError(
            f"cannot fingerprint {root}: no weight files ({', '.join(WEIGHT_PATTERNS)})"
        )
    disk_memo = _read_memo(memo_dir)
    digest = hashlib.sha256()
    dirty = False
    for f in sorted(files, key=lambda p: p.name):
        file_digest, computed = file_digest_cached(f, disk_memo)
        dirty = dirty or computed
        digest.update(f"{f.name}\0{file_digest}\n".encode())
    if dirty and memo_dir is not None:
        _write_memo(memo_dir, disk_memo)
    return digest.hexdigest()


def file_digest_cached(path: Path, disk_memo: dict[str, str] | None = None) -> tuple[str, bool]:
    """(digest, whether it was hashed now). Hub blobs: ``blob:<etag>``; else ``sha256:<hex>``."""
    blob = hub_blob_name(path)
    if blob is not None:
        return f"blob:{blob}", False
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as exc:
        raise ModelLoadError(f"cannot fingerprint {path}: {exc.strerror or exc}") from exc
    # ctime too: it changes on every write and cannot be set back (an edit that keeps
    # size and mtime, or silent corruption repaired in place, still re-hashes).
    memo_key = f"{real}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    with _MEMO_LOCK:
        hit = _MEMO.get(memo_key)
    if hit is None and disk_memo is not None:
        hit = disk_memo.get(memo_key)
    if hit is not None:
        with _MEMO_LOCK:
            _MEMO[memo_key] = hit
        return hit, False
    value = f"sha256:{_sha256_file(Path(real))}"
    with _MEMO_LOCK:
        _MEMO[memo_key] = value
    if disk_memo is not None:
        disk_memo[memo_key] = value
    return value, True


def hub_blob_name(path: Path) -> str | None:
    """The etag of a hub-cache file (symlink into ``models--*/blobs/``), else None."""
    if not path.is_symlink():
        return None
    target = Path(os.path.realpath(path))
    if target.parent.name == "blobs" and _BLOB_NAME.match(target.name):
        return target.name
    return None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot read {path} to fingerprint it: {exc.strerror or exc}"
        ) from exc
    return h.hexdigest()


def _read_memo(memo_dir: Path | None) -> dict[str, str] | None:
    if memo_dir is None:
        return None
    try:
        data = json.loads((memo_dir / _MEMO_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): str(v) for k, v in data.items()}


def _write_memo(memo_dir: Path, memo: dict[str, str] | None) -> None:
    """Atomic best-effort write; a read-only cache dir just means re-hashing next time."""
    if memo is None:
        return
    tmp_name: str | None = None
    try:
        memo_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".fp-", dir=memo_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(memo, fh, sort_keys=True)
        os.chmod(tmp_name, file_mode())  # shared caches: other users read the memo
        os.replace(tmp_name, memo_dir / _MEMO_FILE)
        tmp_name = None
    except OSError:
        pass
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
