"""Read single tensors of a safetensors checkpoint by name, without mapping the files.

Block streaming (:mod:`reasondiff.streaming`) materializes one decoder block at a time,
so it must read a block's tensors - and only those - from a checkpoint of any size,
single-file or sharded (``model.safetensors.index.json``). Each tensor is read with
``pread`` straight into the tensor that keeps it: no file stays memory-mapped (mapped
pages would count in the process's RSS until the mapping closes) and nothing else of
the checkpoint is touched. Embedding rows can be read alone (:meth:`read_rows`), so a
150k-token vocabulary costs the rows a pass uses, not the whole matrix.

This module knows the safetensors layout (u64 LE header length, JSON header, data) and
nothing about models.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelLoadError
from .models import checkpoint_files

__all__ = ["SafetensorsReader", "TensorEntry"]

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
#: Largest single pread (Linux transfers at most ~2 GiB per call).
_PREAD_MAX = 1 << 30


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: file, absolute offset, dtype and shape."""

    file: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsReader:
    """By-name access to the tensors of one checkpoint directory (headers read once)."""

    def __init__(self, path: Path, *, name: str):
        self.path, self.name = Path(path), name
        files = checkpoint_files(self.path, allow_pickle=False, name=name)
        if files.format != "safetensors":  # pragma: no cover - allow_pickle=False refuses
            raise ModelLoadError(f"model {name!r} at {path}: no safetensors weights")
        self.entries: dict[str, TensorEntry] = {}
        for f in files.files:
            self.entries.update(self._header(f))

    def _header(self, f: Path) -> dict[str, TensorEntry]:
        try:
            with open(f, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
        except (OSError, ValueError, struct.error) as exc:
            raise ModelLoadError(
                f"model {self.name!r}: cannot read the safetensors header of {f.name}: {exc}"
            ) from exc
        out = {}
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            dtype = _DTYPES.get(str(meta.get("dtype")))
            if dtype is None:
                raise ModelLoadError(
                    f"model {self.name!r}: tensor {key} in {f.name} has dtype "
                    f"{meta.get('dtype')!r}, which block streaming cannot read"
                )
            start = 8 + length + int(meta["data_offsets"][0])
            out[key] = TensorEntry(f, start, dtype, tuple(int(s) for s in meta["shape"]))
        return out

    def entry(self, tensor: str) -> TensorEntry:
        try:
            return self.entries[tensor]
        except KeyError:
            raise ModelLoadError(
                f"model {self.name!r} at {self.path}: tensor {tensor} is not in its checkpoint"
            ) from None

    def read(
        self, tensor: str, *, dtype: torch.dtype | None = None, device: str = "cpu"
    ) -> torch.Tensor:
        """One whole tensor, converted to ``dtype`` on ``device`` (one host copy in its
        stored dtype on the way)."""
        e = self.entry(tensor)
        raw = torch.empty(e.nbytes, dtype=torch.uint8)
        self._pread(e, raw, e.offset, tensor)
        t = raw.view(e.dtype).reshape(e.shape)
        return t.to(device=device, dtype=dtype or e.dtype)

    def read_rows(
        self,
        tensor: str,
        rows: Sequence[int],
        *,
        dtype: torch.dtype | None = None,
        device: str = "cpu",
    ) -> torch.Tensor:
        """``tensor[rows]`` of a 2-D tensor, reading only those rows from the file."""
        e = self.entry(tensor)
        if len(e.shape) != 2:
            raise ModelLoadError(
                f"model {self.name!r}: tensor {tensor} has shape {list(e.shape)}, rows need 2-D"
            )
        n_rows, width = e.shape
        bad = [r for r in rows if not 0 <= int(r) < n_rows]
        if bad:
            raise ModelLoadError(
                f"model {self.name!r}: rows {bad[:10]} outside tensor {tensor} ({n_rows} rows)"
            )
        row_bytes = e.nbytes // max(n_rows, 1)
        raw = torch.empty((len(rows), row_bytes), dtype=torch.uint8)
        for i, r in enumerate(rows):
            self._pread(e, raw[i], e.offset + int(r) * row_bytes, tensor)
        t = raw.view(e.dtype).reshape(len(rows), width)
        return t.to(device=device, dtype=dtype or e.dtype)

    def _pread(self, e: TensorEntry, out: torch.Tensor, offset: int, tensor: str) -> None:
        view = memoryview(out.numpy()).cast("B")  # type: ignore[arg-type]
        try:
            with open(e.file, "rb", buffering=0) as fh:
                done = 0
                while done < len(view):
                    n = os.preadv(fh.fileno(), [view[done : done + _PREAD_MAX]], offset + done)
                    if n <= 0:
                        raise OSError(f"short read ({done} of {len(view)} bytes)")
                    done += n
        except OSError as exc:
            raise ModelLoadError(
                f"model {self.name!r}: cannot read tensor {tensor} from {e.file.name}: {exc}"
            ) from exc
