"""A weight diff never holds more than two checkpoint tensors at once (one pair).

Instrumented at the I/O boundary, not inside weightdiff.py, so the test holds for any
implementation: every ``os.preadv``, every fused-kernel call over mapped memory
(``Kernel.sums``) and every ``torch.frombuffer`` over a mapped file is mapped (file,
byte range) to the tensors it touches, and every tensor returned by
``safe_open(...).get_tensor`` is tracked until it is garbage. A tensor is *held* from
its first read to its last read (pread), for the length of a kernel call, while a
window tensor over its bytes lives, or while its returned object lives (safe_open).

Read times alone cannot see a reader that preads every tensor into a buffer of its own
and keeps them all, so the probe also tracks the *buffers* reads land in: Python buffers
(``bytearray``, what weightdiff reads into) through ``tracemalloc``, torch-owned ones
(``torch.empty`` storage, what block_reader reads into) through a storage weak
reference, and bytes of mapped files in use (kernel calls in flight, window tensors
alive). At each read it sums the bytes still alive; a reader within the rule never has
more alive than the two largest tensors (one per checkpoint). (That the pages of a mapped
file are given back as the diff goes is test_weightdiff's RSS test.)
Negative controls keep every tensor (safe_open, Python buffers, torch buffers) and are
caught. The same probe runs through a streamed ``compare``: its weight-diff stage obeys
the rule, and its block stage holds one block's buffers at a time.
"""

from __future__ import annotations

import gc
import json
import mmap
import os
import struct
import threading
import tracemalloc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import torch
from _checkpoints import make_qwen2, shard_checkpoint
from torch.multiprocessing.reductions import StorageWeakRef

import reasondiff.weightdiff as weightdiff
from reasondiff.block_reader import SafetensorsReader
from reasondiff.weightdiff import stream_weight_diff

#: Python allocations of the diff besides its read buffers: the index of both
#: checkpoints' ~200 tensors (header dicts, offsets) and the records, measured 130 KiB at
#: the peak read (tracemalloc by line: the two read buffers were 2 x 64 KiB, the rest
#: weightdiff's index). A kept checkpoint (2 MB) is far above 2 tensors + this.
SLACK = 256 * 2**10


def _ranges(f: Path) -> list[tuple[int, int, str]]:
    """(absolute start, end, tensor) of each tensor's bytes in a safetensors file."""
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return [
        (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1], k)
        for k, v in header.items()
        if k != "__metadata__"
    ]


_OPEN = 1 << 62  # the end of a span whose tensor is still alive


class _Probe:
    """Timeline of held tensors: ``(checkpoint dir, tensor)`` -> [first event, last event]."""

    def __init__(self, files: list[Path]):
        self.ranges: dict[str, list[tuple[int, int, str]]] = {}
        self.clock = 0
        self.spans: dict[tuple[str, str], list[int]] = {}
        self.reads = 0
        self.add_files(files)
        # live read buffers: torch storages by data pointer, Python bytes via tracemalloc
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.py_base: int | None = None
        self.max_live = self.max_torch = self.max_py = self.max_mapped = 0
        self.mapped_live = 0  # bytes of mapped files in use now (kernel calls, windows)
        self.lock = threading.RLock()  # two reader threads report at once

    def add_files(self, files: list[Path]) -> None:
        self.ranges.update({str(f.resolve()): _ranges(f) for f in files})

    def trace_python(self, on: bool) -> None:
        """Count Python-allocated buffers (tracemalloc) from now on, or stop."""
        if on:
            tracemalloc.start()
            self.py_base = tracemalloc.get_traced_memory()[0]
        elif self.py_base is not None:
            tracemalloc.stop()
            self.py_base = None

    def reset_live(self) -> None:
        self.storages.clear()
        self.max_live = self.max_torch = self.max_py = self.max_mapped = 0

    def _sample(self) -> None:
        """Bytes of read buffers alive now (buffers of reads still referenced anywhere)."""
        torch_live = sum(n for ref, n in self.storages.values() if not ref.expired())
        py = 0
        if self.py_base is not None:
            py = max(0, tracemalloc.get_traced_memory()[0] - self.py_base)
        self.max_torch = max(self.max_torch, torch_live)
        self.max_py = max(self.max_py, py)
        self.max_mapped = max(self.max_mapped, self.mapped_live)
        self.max_live = max(self.max_live, torch_live + py + self.mapped_live)

    def _register(self, buffer: Any) -> None:
        """Track a torch-owned destination buffer (numpy view of a tensor) by its storage."""
        owner = memoryview(buffer).obj
        base = getattr(owner, "base", None) if isinstance(owner, np.ndarray) else None
        if isinstance(base, torch.Tensor):
            storage = base.untyped_storage()
            self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())

    def _touch(self, key: tuple[str, str]) -> None:
        with self.lock:
            self.clock += 1
            span = self.spans.setdefault(key, [self.clock, self.clock])
            span[1] = self.clock

    def _mapped_tensors(self, address: int, size: int) -> list[tuple[str, str]]:
        """The tensors whose bytes ``[address, address + size)`` of a mapped file hold."""
        for line in Path("/proc/self/maps").read_text().splitlines():
            parts = line.split(maxsplit=5)
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if lo <= address < hi and len(parts) == 6:
                path, start = parts[5].strip(), int(parts[2], 16) + address - lo
                return [
                    (str(Path(path).parent), name)
                    for first, end, name in self.ranges.get(path, [])
                    if first < start + size and start < end
                ]
        return []

    def use_mapped(
        self, regions: list[tuple[int, int]], delta: int, *, hold: bool = False
    ) -> list[tuple[str, str]]:
        """Mapped bytes taken into use (``delta`` > 0) or given up: touch their tensors;
        ``hold``: they stay held until given up (a window tensor, not a call)."""
        with self.lock:  # the maps text is freed before any thread samples Python memory
            keys = [k for address, size in regions for k in self._mapped_tensors(address, size)]
            self.mapped_live += delta
            self.reads += delta > 0
            for key in keys:
                self._touch(key)
                if hold:
                    self.spans[key][1] = _OPEN
            self._sample()
        return keys

    def pread(self, fd: int, buffers: list[Any], offset: int) -> None:
        path = os.path.realpath(f"/proc/self/fd/{fd}")
        size = sum(len(memoryview(b)) for b in buffers)
        with self.lock:
            self.reads += 1
            for b in buffers:
                self._register(b)
            self._sample()
            for start, end, name in self.ranges.get(path, []):
                if start < offset + size and offset < end:
                    self._touch((str(Path(path).parent), name))

    def returned(self, file: str, name: str, tensor: torch.Tensor) -> None:
        key = (str(Path(file).resolve().parent), name)
        self.clock += 1
        self.spans[key] = [self.clock, _OPEN]  # held until the tensor is garbage
        weakref.finalize(tensor, self._touch, key)

    def max_held(self) -> tuple[int, int]:
        """Most tensors held at one moment: (in total, of one checkpoint)."""
        total = per_ckpt = 0
        for t in range(1, self.clock + 2):
            live = [k for k, (a, b) in self.spans.items() if a <= t <= b]
            total = max(total, len(live))
            dirs = [d for d, _ in live]
            per_ckpt = max([per_ckpt, *(dirs.count(d) for d in set(dirs))])
        return total, per_ckpt


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[_Probe]:
    # 8 blocks, hidden 64: a checkpoint (2.1 MB) is many times two tensors (64 KiB each)
    shape = {"num_hidden_layers": 8, "hidden_size": 64, "intermediate_size": 256}
    base = make_qwen2(tmp_path / "base", seed=0, **shape)
    desc = make_qwen2(tmp_path / "d", seed=1, **shape)
    desc = shard_checkpoint(desc, tmp_path / "desc", shards=3)
    files = sorted(base.glob("*.safetensors")) + sorted(desc.glob("*.safetensors"))
    p = _Probe(files)
    real_preadv = os.preadv

    def preadv(fd: int, buffers: list[Any], offset: int, *rest: Any) -> int:
        p.pread(fd, buffers, offset)
        return real_preadv(fd, buffers, offset, *rest)

    real_open = safetensors.safe_open

    class TrackedOpen:
        def __init__(self, filename: str, *args: Any, **kwargs: Any):
            self.filename, self.inner = str(filename), real_open(filename, *args, **kwargs)

        def __enter__(self) -> TrackedOpen:
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: Any) -> None:
            self.inner.__exit__(*exc)

        def get_tensor(self, name: str) -> torch.Tensor:
            t: torch.Tensor = self.inner.get_tensor(name)
            p.returned(self.filename, name, t)
            return t

        def __getattr__(self, attr: str) -> Any:
            return getattr(self.inner, attr)

    monkeypatch.setattr(os, "preadv", preadv)

    from reasondiff.metrics import _weights_kernel

    real_sums = _weights_kernel.Kernel.sums

    def sums(self: Any, a: int, b: int, n: int, out: Any, **kw: Any) -> None:
        regions = [(a, n * self.itemsize), (b, n * self.itemsize)]
        p.use_mapped(regions, 2 * n * self.itemsize)
        try:
            real_sums(self, a, b, n, out, **kw)
        finally:
            p.use_mapped(regions, -2 * n * self.itemsize)

    real_frombuffer = torch.frombuffer

    def frombuffer(buffer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        t = real_frombuffer(buffer, *args, **kwargs)
        if isinstance(buffer, mmap.mmap):  # a window of a mapped file, in use while it lives
            region = [(t.data_ptr(), t.numel() * t.element_size())]
            p.use_mapped(region, region[0][1], hold=True)
            weakref.finalize(t, p.use_mapped, region, -region[0][1])
        return t

    monkeypatch.setattr(_weights_kernel.Kernel, "sums", sums)
    monkeypatch.setattr(torch, "frombuffer", frombuffer)
    monkeypatch.setattr(weightdiff, "safe_open", TrackedOpen)
    monkeypatch.setattr(safetensors, "safe_open", TrackedOpen)
    p.dirs = (base, desc)  # type: ignore[attr-defined]
    yield p
    p.trace_python(False)
    gc.collect()


def _largest(d: Path) -> int:
    """Bytes of the largest tensor of a checkpoint directory."""
    return max(end - start for f in d.glob("*.safetensors") for start, end, _ in _ranges(f))


def _total(d: Path) -> int:
    return sum(end - start for f in d.glob("*.safetensors") for start, end, _ in _ranges(f))


def _limit(base: Path, desc: Path) -> int:
    """Two tensors at once: the largest of each checkpoint, plus the diff's own objects."""
    return _largest(base) + _largest(desc) + SLACK


def _diff_limit(base: Path, desc: Path) -> int:
    """The weight diff's rule: one pair per reader thread (two readers: at most two
    tensors of a checkpoint at once), plus the diff's own objects."""
    return weightdiff.READER_THREADS * (_largest(base) + _largest(desc)) + SLACK


@pytest.fixture(params=["fused kernel", "torch"])
def form(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both forms: the kernel over mapped files, the torch form over mapped windows."""
    from reasondiff.metrics.weights import DISABLE_ENV, kernel_for

    monkeypatch.setenv(DISABLE_ENV, "1" if request.param == "torch" else "0")
    if request.param != "torch" and kernel_for(torch.float32) is None:
        pytest.skip("no C compiler here: the torch form runs (the other case)")
    return str(request.param)


def test_weight_diff_holds_at_most_one_pair_per_reader(probe: _Probe, form: str) -> None:
    base, desc = probe.dirs  # type: ignore[attr-defined]
    records = stream_weight_diff(base, desc, base_name="b", desc_name="d")
    gc.collect()
    assert len(records) > 20 and all(r.note == "" for r in records if r.tensor != "lm_head.weight")
    assert probe.reads > 0 and len(probe.spans) >= 2 * 20  # both checkpoints were read, all tensors
    total, per_ckpt = probe.max_held()
    readers = weightdiff.READER_THREADS
    assert readers == 2
    assert per_ckpt <= readers, f"a checkpoint had {per_ckpt} tensors held at once"
    assert total <= 2 * readers, f"{total} tensors held at once"


def test_one_reader_holds_at_most_one_pair(
    probe: _Probe, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """With one reader thread the rule is one tensor per checkpoint, and it holds."""
    monkeypatch.setattr(weightdiff, "READER_THREADS", 1)
    base, desc = probe.dirs  # type: ignore[attr-defined]
    stream_weight_diff(base, desc, base_name="b", desc_name="d")
    total, per_ckpt = probe.max_held()
    assert per_ckpt == 1 and total <= 2, (total, per_ckpt)
    assert probe.max_live <= _diff_limit(base, desc), (probe.max_live, _diff_limit(base, desc))


def test_weight_diff_read_buffers_stay_within_two_tensors(probe: _Probe, form: str) -> None:
    base, desc = probe.dirs  # type: ignore[attr-defined]
    probe.trace_python(True)
    stream_weight_diff(base, desc, base_name="b", desc_name="d")
    probe.trace_python(False)
    assert probe.reads > 40
    print(
        f"weight diff: {probe.max_live} B of read buffers alive at most ({probe.max_py} B "
        f"Python), limit {_diff_limit(base, desc)} B, checkpoints {_total(base)} B each"
    )
    assert probe.max_live <= _diff_limit(base, desc), (probe.max_live, _diff_limit(base, desc))
    assert _total(base) + _total(desc) > 2 * _diff_limit(base, desc)  # a kept checkpoint shows


def test_the_probe_sees_a_reader_that_keeps_python_buffers(probe: _Probe) -> None:
    """Negative control: every tensor pread into a bytearray of its own, all kept. Each
    tensor is read once, so read times alone (max_held) would let it pass."""
    base, desc = probe.dirs  # type: ignore[attr-defined]
    probe.trace_python(True)
    kept = []
    for f in sorted(base.glob("*.safetensors")) + sorted(desc.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            for start, end, _ in _ranges(f):
                buf = bytearray(end - start)
                os.preadv(fh.fileno(), [memoryview(buf)], start)
                kept.append(buf)
    probe.trace_python(False)
    assert probe.max_held() == (1, 1)  # the old probe's verdict: nothing held
    assert probe.max_live > _diff_limit(base, desc) > _limit(base, desc), probe.max_live
    assert probe.max_py >= 0.9 * (_total(base) + _total(desc)) - max(map(len, kept))
    del kept


def test_the_probe_sees_a_reader_that_keeps_torch_buffers(probe: _Probe) -> None:
    """Negative control: block streaming's reader (torch-owned buffers) reading both
    checkpoints whole and keeping the tensors."""
    base, desc = probe.dirs  # type: ignore[attr-defined]
    kept = []
    for d in (base, desc):
        reader = SafetensorsReader(d, name=d.name)
        kept += [reader.read(name) for name in reader.entries]
    probe._sample()
    assert probe.max_torch > _limit(base, desc), probe.max_torch
    assert probe.max_torch >= _total(base) + _total(desc) - max(t.nbytes for t in kept)
    del kept
    gc.collect()
    probe._sample()
    assert sum(n for r, n in probe.storages.values() if not r.expired()) == 0  # all freed


def test_a_streamed_compare_obeys_the_rule(
    probe: _Probe, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The probe through ``compare(stream_blocks=True)`` on a toy pair: the weight-diff
    stage holds at most one tensor per checkpoint and two tensors' buffers; the block
    stage holds the buffers of one block at a time (never a checkpoint)."""
    from reasondiff.api import compare
    from reasondiff.fixtures.toy import ensure_toy_model

    dirs = [ensure_toy_model(tmp_path / "toy", r) for r in ("base", "massive")]
    probe.add_files([f for d in dirs for f in d.glob("*.safetensors")])
    stages: dict[str, tuple[int, int, tuple[int, int]]] = {}
    real = weightdiff.stream_weight_diff

    def probed(*args: Any, **kwargs: Any) -> Any:
        probe.reset_live()
        probe.spans.clear()
        probe.trace_python(True)
        try:
            return real(*args, **kwargs)
        finally:
            probe.trace_python(False)
            stages["weights"] = (probe.max_live, probe.max_py, probe.max_held())
            probe.reset_live()
            probe.spans.clear()

    monkeypatch.setattr(weightdiff, "stream_weight_diff", probed)
    compare(
        "toy:base",
        ["toy:massive"],
        cache_dir=tmp_path,
        raise_on_error=True,
        stream_blocks=True,
        layers=[0],
        bootstrap=20,
        torch_threads=1,
    )
    live, _py, (total, per_ckpt) = stages["weights"]
    readers = weightdiff.READER_THREADS
    assert per_ckpt <= readers and total <= 2 * readers, (total, per_ckpt)
    assert live <= _diff_limit(*dirs), (live, _diff_limit(*dirs))
    reader = SafetensorsReader(dirs[0], name="base")
    block = sum(e.nbytes for k, e in reader.entries.items() if k.startswith("model.layers.0."))
    assert probe.reads > 0 and 0 < probe.max_torch <= block, (probe.max_torch, block)
    assert probe.max_torch < _total(dirs[0]) / 4


def test_the_probe_sees_a_whole_checkpoint_reader(probe: _Probe) -> None:
    """Negative control: reading both checkpoints whole holds every tensor at once."""
    base, desc = probe.dirs  # type: ignore[attr-defined]
    held = []
    for f in sorted(base.glob("*.safetensors")) + sorted(desc.glob("*.safetensors")):
        with safetensors.safe_open(str(f), framework="pt") as fh:
            held.append({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118
    total, per_ckpt = probe.max_held()
    assert per_ckpt >= 20 and total >= 40, (total, per_ckpt)
    del held


def test_the_probe_sees_a_reader_that_keeps_mapped_windows(probe: _Probe) -> None:
    """Negative control: every tensor of both checkpoints as a window over its mapped
    file, all kept: the probe sees every tensor held at once and their bytes in use."""
    base, desc = probe.dirs  # type: ignore[attr-defined]
    kept, maps = [], []
    for f in sorted(base.glob("*.safetensors")) + sorted(desc.glob("*.safetensors")):
        with open(f, "rb") as fh:
            m = mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_PRIVATE)
        maps.append(m)
        kept += [
            torch.frombuffer(m, dtype=torch.uint8, count=e - s, offset=s) for s, e, _ in _ranges(f)
        ]
    total, per_ckpt = probe.max_held()
    assert per_ckpt >= 20 and total >= 40, (total, per_ckpt)
    assert probe.max_mapped >= _total(base) + _total(desc) > _diff_limit(base, desc)
    del kept
    gc.collect()
    assert probe.mapped_live == 0  # every window was seen going
    for m in maps:
        m.close()
