"""Per-tensor weight differences between two checkpoints, streamed (METHODS §7).

Tensors are matched by NAME (never by position) and streamed one pair at a time from
the safetensors files (single or sharded). Each file is mapped once (``mmap``: its pages
are the page cache's own, nothing is copied as ``read`` would) and each pair is summed
``WINDOW_BYTES`` at a time, the pages of each window given back as soon as it is summed,
so a mapped file never becomes resident and no whole tensor is ever copied: peak memory
is a few windows on top of the interpreter, never two models. With the fused kernel
(:mod:`reasondiff.metrics._weights_kernel`) a same-dtype pair is one call, page faults
and sums included, that runs without the GIL, so ``READER_THREADS`` pairs go in
parallel; otherwise window tensors go through the torch form of
:class:`~reasondiff.metrics.weights.WeightDiffAccumulator`. Tensors that cannot be compared are still reported, by name, with NaN
metrics and a note:

- ``missing_in_base`` / ``missing_in_descendant``: present on one side only.
- ``tied``: ``lm_head.weight`` is absent because the config ties it to the input
  embedding. If exactly one side ties, the other side's lm_head is compared with the
  tying side's embedding matrix (the effective output layer). If both tie, the record
  has NaN metrics: the embedding record already covers that matrix.
- ``resized:<rows>``: an embedding / lm_head whose vocabulary grew or shrank; compared
  on the first ``<rows>`` shared rows (``shape`` is then the compared shape).
- ``renamed:<descendant name>``: a name missing on each side that differs only by a
  known prefix (``model.``, ``transformer.``, ``base_model.model.``) with equal shape;
  compared. Nothing cleverer (no content matching) is attempted.
- ``shape_mismatch``: same name, incompatible shapes (``shape`` is the base's).

Non-float tensors (integer buffers such as ``position_ids``, bool masks) are skipped
silently: they are not weights. A tensor with NaN/Inf raises ``NonFiniteError``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import mmap
import os
import re
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from .errors import MetricInputError, ModelLoadError, NonFiniteError
from .metrics.weights import REDUCE_BLOCK, WeightDiffAccumulator
from .models import checkpoint_files, read_config
from .records import WeightRecord
from .tensor_names import parse_tensor_name

__all__ = ["parse_tensor_name", "stream_weight_diff"]

_EMBED = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in)\.weight$")
_LM_HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out)\.weight$")
_PREFIXES = ("base_model.model.", "model.", "transformer.")
_NAN = float("nan")
#: Tensor pairs scored at once. Page faults and the fused kernel release the GIL, so a
#: second thread sums one pair while the first maps the next (2 cores: 1.7x, measured).
READER_THREADS = 2
#: Bytes of a tensor mapped at once per side. Larger windows cut the mmap/munmap calls,
#: smaller ones the mapped pages in the RSS (a reader holds at most three windows while
#: it steps): 2 MiB cost 1.2x the time of 8 MiB on a 0.5B pair, 32 MiB gained nothing.
WINDOW_BYTES = 8 << 20


#: safetensors dtype names that are streamed with pread (others read through safe_open).
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class _Entry:
    shape: tuple[int, ...]
    is_float: bool
    file: str
    dtype: str = ""  # safetensors dtype name ("" for pickle)
    offset: int = -1  # absolute byte offset of the data in the file (-1: not streamable)


class _Tensor:
    """One tensor of one checkpoint, read lazily in flat chunks (never whole).

    ``chunks`` yields consecutive 1-D pieces of the flattened tensor: windows of the
    file's mapping (safetensors) or slices of a tensor loaded whole (pickles, dtypes
    safetensors cannot map here). A mapped window's pages are given back to the page
    cache once the next window is asked for.
    """

    def __init__(self, source: _Source, name: str, entry: _Entry):
        self.source, self.name, self.entry = source, name, entry
        self.numel = math.prod(entry.shape)
        self.dtype = _ST_DTYPES.get(entry.dtype)
        self.itemsize = 4 if self.dtype is None else self.dtype.itemsize  # 4: read whole

    @property
    def mapped(self) -> bool:
        return self.entry.offset >= 0

    def address(self) -> tuple[int, tuple[int, int]]:
        """Where the tensor's first byte sits in this process, and the bounds of the
        file's mapping (mapped tensors only)."""
        bounds = self.source.bounds(self.entry.file)
        return bounds[0] + self.entry.offset, bounds

    def chunks(self, limit: int, chunk: int) -> Iterator[torch.Tensor]:
        """The first ``limit`` elements in pieces of ``chunk`` elements."""
        src, entry = self.source, self.entry
        try:
            if self.mapped:
                yield from self._windows(limit, chunk)
            else:
                flat = src.whole(self.name).reshape(-1)
                for i in range(0, limit, chunk):
                    yield flat[i : min(i + chunk, limit)]
        except ModelLoadError:
            raise
        except Exception as exc:  # OSError, SafetensorError (no stable type)
            raise ModelLoadError(
                f"model {src.name!r}: cannot read tensor {self.name} from {entry.file}: {exc}"
            ) from exc

    def _windows(self, limit: int, chunk: int) -> Iterator[torch.Tensor]:
        assert self.dtype is not None  # mapped entries have a streamable dtype
        mapping = self.source.mapping(self.entry.file)
        for i in range(0, limit, chunk):
            n = min(chunk, limit - i)
            start = self.entry.offset + i * self.itemsize
            yield torch.frombuffer(mapping, dtype=self.dtype, count=n, offset=start)
            _drop_pages(mapping, start, n * self.itemsize)


#: Bytes given back on either side of a window besides the window itself: the kernel's
#: fault-around maps the aligned 64 KiB block around a faulting address, which reaches
#: into the previous window (already given back) and the next. (The C kernel's SLACK.)
_DROP_SLACK = 1 << 20


def _drop_pages(mapping: mmap.mmap, start: int, length: int) -> None:
    """Give back the pages of ``[start - slack, start + length + slack)`` (the page cache
    keeps them; the process's RSS does not). Safe while the other reader uses some of
    them: the mapping is never written, so the next load maps the same bytes again."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    lo = max(0, start - _DROP_SLACK) // page * page
    hi = min(len(mapping), start + length + _DROP_SLACK)
    with contextlib.suppress(OSError, ValueError):
        mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _map_file(path: Path, need: int, *, model: str) -> mmap.mmap:
    """The whole file, mapped once per diff.

    Private and writable only so that ``torch.frombuffer`` takes it without a warning:
    nothing writes to it, so no page is ever copied; the pages are the page cache's and
    fault in on first touch (inside the kernel, without the GIL). ``need``: the end of the
    last tensor, checked first, since touching a page past the end of a file that shrank
    would kill the process (SIGBUS) instead of raising.
    """
    with open(path, "rb", buffering=0) as fh:
        have = os.fstat(fh.fileno()).st_size
        if have < need:
            raise ModelLoadError(
                f"model {model!r}: {path} has {have} bytes, but its tensors end at byte "
                f"{need}: it is truncated or corrupt, re-download it"
            )
        if os.name == "nt":
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        return mmap.mmap(
            fh.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )


def _data_offsets(f: Path) -> dict[str, int]:
    """Absolute byte offset of each tensor's data in a safetensors file (format: u64 LE
    header length, JSON header with ``data_offsets`` relative to the end of the header)."""
    with open(f, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return {
        k: 8 + length + int(v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"
    }


class _Source:
    """Lazy by-name access to one checkpoint's tensors (safetensors or, opted in, pickle)."""

    def __init__(self, path: Path, *, name: str, allow_pickle: bool):
        self.path = Path(path)
        self.name = name
        self.config = read_config(self.path, name=name)
        files = checkpoint_files(self.path, allow_pickle=allow_pickle, name=name)
        self.entries: dict[str, _Entry] = {}
        self._files: dict[str, Path] = {}
        self._handles: dict[str, Any] = {}  # pickle state dicts only
        self._maps: dict[str, tuple[mmap.mmap, int]] = {}  # file -> (mapping, address)
        self._map_lock = threading.Lock()
        for f in files.files:
            self._files[f.name] = f
            if files.format == "safetensors":
                self._scan_safetensors(f)
            else:
                self._open_pickle(f)
        if files.index is not None:
            self._check_index(files.index)

    def _add(self, tensor: str, entry: _Entry) -> None:
        if tensor in self.entries:
            raise ModelLoadError(
                f"model {self.name!r}: tensor {tensor} appears in both "
                f"{self.entries[tensor].file} and {entry.file}"
            )
        self.entries[tensor] = entry

    def _scan_safetensors(self, f: Path) -> None:
        """Validate with safe_open (closed again at once) and note each tensor's offset."""
        try:
            with safe_open(str(f), framework="pt") as handle:
                kinds = {}
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    sl = handle.get_slice(key)
                    kinds[key] = (str(sl.get_dtype()), tuple(sl.get_shape()))
            offsets = _data_offsets(f)
            for key, (dtype, shape) in kinds.items():
                streamable = dtype in _ST_DTYPES and key in offsets
                entry = _Entry(
                    shape,
                    dtype.startswith(("F", "BF")),
                    f.name,
                    dtype,
                    offsets[key] if streamable else -1,
                )
                self._add(key, entry)
        except ModelLoadError:
            raise
        except Exception as exc:  # SafetensorError is not importable as a stable type
            raise ModelLoadError(
                f"model {self.name!r}: cannot read safetensors file {f} ({exc}); "
                "it is truncated or corrupt, re-download it"
            ) from exc

    def _open_pickle(self, f: Path) -> None:
        import pickle

        try:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelLoadError(
                f"model {self.name!r}: refusing pickle file {f}: it holds more than plain "
                f"tensors (weights_only=True rejected it: {first}); convert the checkpoint "
                "to safetensors from a trusted copy"
            ) from exc
        except Exception as exc:
            raise ModelLoadError(
                f"model {self.name!r}: cannot read pickle file {f}: {exc}"
            ) from exc
        if not isinstance(state, dict):
            raise ModelLoadError(f"model {self.name!r}: {f} does not hold a state dict")
        for key, t in state.items():
            if isinstance(t, torch.Tensor):
                self._add(key, _Entry(tuple(t.shape), t.is_floating_point(), f.name))
        self._handles[f.name] = state

    def _check_index(self, index: Path) -> None:
        weight_map: dict[str, str] = json.loads(index.read_text("utf-8"))["weight_map"]
        for tensor, shard in sorted(weight_map.items()):
            entry = self.entries.get(tensor)
            if entry is None or entry.file != shard:
                where = "nowhere" if entry is None else entry.file
                raise ModelLoadError(
                    f"model {self.name!r}: {index.name} puts {tensor} in {shard}, found {where}"
                )

    def path_of(self, file: str) -> Path:
        return self._files[file]

    def _mapped(self, file: str) -> tuple[mmap.mmap, int]:
        with self._map_lock:  # both reader threads may ask first
            if file not in self._maps:
                need = max(
                    (
                        e.offset + math.prod(e.shape) * _ST_DTYPES[e.dtype].itemsize
                        for e in self.entries.values()
                        if e.file == file and e.offset >= 0
                    ),
                    default=0,
                )
                mapping = _map_file(self._files[file], need, model=self.name)
                view = ctypes.c_char.from_buffer(mapping)
                self._maps[file] = (mapping, ctypes.addressof(view))
                del view  # the address stays valid while the mapping is open
            return self._maps[file]

    def mapping(self, file: str) -> mmap.mmap:
        """One safetensors file, mapped on first use and kept until :meth:`close`."""
        return self._mapped(file)[0]

    def bounds(self, file: str) -> tuple[int, int]:
        """The (start, end) addresses of a mapped file in this process (for the C kernel)."""
        mapping, start = self._mapped(file)
        return start, start + len(mapping)

    def close(self) -> None:
        """Unmap the files (a chunk still referenced keeps its mapping until it is freed)."""
        with self._map_lock:
            for mapping, _ in self._maps.values():
                with contextlib.suppress(BufferError):
                    mapping.close()
            self._maps.clear()

    def get(self, tensor: str) -> _Tensor:
        """A lazy reader of one tensor (nothing is read until its chunks are asked for)."""
        return _Tensor(self, tensor, self.entries[tensor])

    def whole(self, tensor: str) -> torch.Tensor:
        """One tensor as stored, for pickles and dtypes that cannot be streamed with pread."""
        entry = self.entries[tensor]
        handle = self._handles.get(entry.file)
        if isinstance(handle, dict):
            t: torch.Tensor = handle[tensor]
            return t
        with safe_open(str(self._files[entry.file]), framework="pt") as fh:
            copy: torch.Tensor = fh.get_tensor(tensor).clone()  # the mapping closes here
        return copy

    def ties_embeddings(self) -> bool:
        """transformers' default is to tie when the config does not say."""
        for holder in (self.config, self.config.get("text_config") or {}):
            if isinstance(holder, dict) and "tie_word_embeddings" in holder:
                return bool(holder["tie_word_embeddings"])
        return True

    def is_causal_lm(self) -> bool:
        """Only LM-head architectures have an lm_head to tie (BertModel does not)."""
        archs = self.config.get("architectures") or []
        return any(str(x).endswith(("ForCausalLM", "LMHeadModel")) for x in archs)

    def embedding_name(self) -> str | None:
        names = sorted((n for n in self.entries if _EMBED.search(n)), key=len)
        return names[0] if names else None


@dataclass(frozen=True)
class _Job:
    tensor: str  # record name (base name when both exist)
    base: str | None
    desc: str | None
    note: str
    shape: tuple[int, ...]
    rows: int | None = None  # compare only the first rows (resized)


def stream_weight_diff(
    base_dir: Path,
    desc_dir: Path,
    *,
    base_name: str,
    desc_name: str,
    progress: Callable[[str], None] | None = None,
    allow_pickle: bool = False,
) -> list[WeightRecord]:
    """One ``WeightRecord`` per float tensor name of either checkpoint (see module doc)."""
    a = _Source(Path(base_dir), name=base_name, allow_pickle=allow_pickle)
    b = _Source(Path(desc_dir), name=desc_name, allow_pickle=allow_pickle)
    jobs = _plan(a, b)
    local = threading.local()  # one accumulator (reused work buffers) per reader thread

    def run(job: _Job) -> WeightRecord:
        if not hasattr(local, "acc"):
            # a window holds at most WINDOW_BYTES elements (1-byte dtypes)
            local.acc = WeightDiffAccumulator(WINDOW_BYTES)
        return _run(job, a, b, local.acc)

    done: dict[int, WeightRecord] = {}
    pool = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="reasondiff-weights")
    todo = enumerate(jobs)
    # a short queue, not every job submitted at once: one pair in flight per reader and
    # one waiting each, topped up as ANY pair finishes, so nothing grows with the number
    # of tensors. (Waiting in job order let one large embedding idle the other reader:
    # two readers ran at 1.1x one, measured on a 0.5B pair.)
    pending = {pool.submit(run, job): i for i, job in islice(todo, 2 * READER_THREADS)}
    try:
        with _one_intra_op_thread():
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    record = done[pending.pop(future)] = future.result()
                    if progress is not None:
                        progress(
                            f"weights {desc_name} vs {base_name}: {len(done)}/{len(jobs)} "
                            f"{record.tensor}"
                        )
                pending.update({pool.submit(run, job): i for i, job in islice(todo, len(finished))})
    finally:  # on an error, the pairs not yet started are dropped, not scored for nothing
        pool.shutdown(wait=True, cancel_futures=True)
        a.close()
        b.close()
    return [done[i] for i in range(len(jobs))]


@contextlib.contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """Run torch ops single-threaded, restoring the setting after.

    The work is many small, memory-bound ops on cache-sized chunks: a second OpenMP
    thread gains little even on an idle machine, and on a machine whose cores are
    shared it made the diff 3-10x slower (measured, 2 cores, load 5: 17-120 ns per
    element per side with 2 threads vs 7 ns with 1).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _plan(a: _Source, b: _Source) -> list[_Job]:
    fa = {n: e for n, e in a.entries.items() if e.is_float}
    fb = {n: e for n, e in b.entries.items() if e.is_float}
    jobs: list[_Job] = []
    for n in sorted(fa.keys() & fb.keys()):
        jobs.append(_same_name(n, fa[n].shape, fb[n].shape))
    only_a = set(fa) - set(fb)
    only_b = set(fb) - set(fa)
    jobs.extend(_tied(a, b, fa, fb, only_a, only_b))
    jobs.extend(_renamed(fa, fb, only_a, only_b))
    jobs.extend(_Job(n, n, None, "missing_in_descendant", fa[n].shape) for n in sorted(only_a))
    jobs.extend(_Job(n, None, n, "missing_in_base", fb[n].shape) for n in sorted(only_b))
    return sorted(jobs, key=_order)


def _order(job: _Job) -> tuple[int, str, str]:
    layer, component = parse_tensor_name(job.tensor)
    return layer, component, job.tensor


def _same_name(n: str, sa: tuple[int, ...], sb: tuple[int, ...]) -> _Job:
    if sa == sb:
        return _Job(n, n, n, "", sa)
    vocab_like = bool(_EMBED.search(n) or _LM_HEAD.search(n))
    if vocab_like and len(sa) == len(sb) >= 1 and sa[1:] == sb[1:]:
        rows = min(sa[0], sb[0])
        return _Job(n, n, n, f"resized:{rows}", (rows, *sa[1:]), rows=rows)
    return _Job(n, None, None, "shape_mismatch", sa)  # reported, not compared


def _tied(
    a: _Source,
    b: _Source,
    fa: dict[str, _Entry],
    fb: dict[str, _Entry],
    only_a: set[str],
    only_b: set[str],
) -> Iterator[_Job]:
    """lm_head absent because of tie_word_embeddings (consumes names from only_a/only_b)."""
    lm = "lm_head.weight"
    ea, eb = a.embedding_name(), b.embedding_name()
    if lm in only_b and lm not in fa and a.ties_embeddings() and ea is not None:
        only_b.discard(lm)
        yield _tied_job(lm, ea, lm, fa[ea].shape, fb[lm].shape)
    elif lm in only_a and lm not in fb and b.ties_embeddings() and eb is not None:
        only_a.discard(lm)
        yield _tied_job(lm, lm, eb, fa[lm].shape, fb[eb].shape)
    elif (
        lm not in fa
        and lm not in fb
        and a.is_causal_lm()
        and b.is_causal_lm()
        and a.ties_embeddings()
        and b.ties_embeddings()
        and ea is not None
        and eb is not None
    ):
        yield _Job(lm, None, None, "tied", fa[ea].shape)


def _tied_job(name: str, base: str, desc: str, sa: tuple[int, ...], sb: tuple[int, ...]) -> _Job:
    if sa == sb:
        return _Job(name, base, desc, "tied", sa)
    return _Job(name, None, None, "tied", sa)  # tied and resized: not comparable


def _strip(name: str) -> str:
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name


def _renamed(
    fa: dict[str, _Entry], fb: dict[str, _Entry], only_a: set[str], only_b: set[str]
) -> Iterator[_Job]:
    by_stripped = {_strip(n): n for n in sorted(only_b)}
    for n in sorted(only_a):
        other = by_stripped.get(_strip(n))
        if other is not None and other in only_b and fa[n].shape == fb[other].shape:
            only_a.discard(n)
            only_b.discard(other)
            yield _Job(n, n, other, f"renamed:{other}", fa[n].shape)


def _run(job: _Job, a: _Source, b: _Source, acc: WeightDiffAccumulator) -> WeightRecord:
    layer, component = parse_tensor_name(job.tensor)
    values = (_NAN, _NAN, _NAN)
    if job.base is not None and job.desc is not None:
        x = a.get(job.base)
        y = b.get(job.desc)
        if math.prod(job.shape):
            values = _metrics(x, y, job.shape, acc)
        del x, y  # drop both before the next pair is read: at most one pair is open
    return WeightRecord(
        base=a.name,
        descendant=b.name,
        tensor=job.tensor,
        layer=layer,
        component=component,
        shape=tuple(int(s) for s in job.shape),
        normalized_diff=values[0],
        relative_diff=values[1],
        mean_abs_diff=values[2],
        note=job.note,
    )


def _metrics(
    x: _Tensor, y: _Tensor, shape: tuple[int, ...], acc: WeightDiffAccumulator
) -> tuple[float, float, float]:
    """The three metrics over the first ``prod(shape)`` elements (all rows, or the shared
    rows of a resized vocabulary: a row prefix is an element prefix); a NaN/Inf weight
    becomes ``NonFiniteError`` naming its model.

    Finiteness is only diagnosed after the metric fails, so the normal path reads each
    tensor once.
    """
    limit = math.prod(shape)
    chunk = _window_elems(x, y)
    acc.reset()
    same = x.dtype is not None and x.dtype == y.dtype and x.mapped and y.mapped
    kernel = acc.kernel(x.dtype) if same and x.dtype is not None else None
    if kernel is not None:  # the whole pair in one call, without the GIL
        parts = np.empty((-(-limit // REDUCE_BLOCK), 4), dtype=np.float64)
        (xa, x_map), (ya, y_map) = x.address(), y.address()
        kernel.sums(xa, ya, limit, parts, window=chunk, a_map=x_map, b_map=y_map)
        acc.add_block_sums(parts, limit)
    else:
        ys = y.chunks(limit, chunk)  # the same limit and chunk: as many windows as x
        for cx in x.chunks(limit, chunk):
            cy = next(ys)
            acc.add(cx, cy)
            del cx, cy
    try:
        return acc.result()
    except MetricInputError as exc:
        _check_finite(x, limit, chunk)
        _check_finite(y, limit, chunk)
        raise MetricInputError(
            f"weights {x.name} of {x.source.name!r} vs {y.name} of {y.source.name!r}: "
            "the difference overflows float32 (values too large)"
        ) from exc


def _window_elems(x: _Tensor, y: _Tensor) -> int:
    """Elements per window: ``WINDOW_BYTES`` of the wider side, in whole reduction blocks
    (both sides are cut alike, so that their chunks pair up)."""
    width = max(x.itemsize, y.itemsize)
    return max(REDUCE_BLOCK, WINDOW_BYTES // width // REDUCE_BLOCK * REDUCE_BLOCK)


def _check_finite(t: _Tensor, limit: int, chunk: int) -> None:
    bad = sum(int((~torch.isfinite(c.to(torch.float32))).sum()) for c in t.chunks(limit, chunk))
    if bad:
        layer, _ = parse_tensor_name(t.name)
        raise NonFiniteError(
            f"model {t.source.name!r}: {bad} NaN/Inf values in weight {t.name} (block {layer})"
        )
