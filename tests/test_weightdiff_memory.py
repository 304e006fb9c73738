"""A weight diff never holds more than two checkpoint tensors at once (one pair).

Instrumented at the I/O boundary, not inside weightdiff.py, so the test holds for any
implementation: every ``os.preadv`` is mapped (file, byte range) to the tensors it
touches, and every tensor returned by ``safe_open(...).get_tensor`` is tracked until it
is garbage. A tensor is *held* from its first read to its last read (pread) or while
its returned object lives (safe_open). A negative control (``load_file`` of both
checkpoints) shows that the probe sees a whole-checkpoint reader.
"""

from __future__ import annotations

import gc
import json
import os
import struct
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from _checkpoints import make_qwen2, shard_checkpoint

import reasondiff.weightdiff as weightdiff
from reasondiff.weightdiff import stream_weight_diff


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
        self.ranges = {str(f.resolve()): _ranges(f) for f in files}
        self.clock = 0
        self.spans: dict[tuple[str, str], list[int]] = {}
        self.reads = 0

    def _touch(self, key: tuple[str, str]) -> None:
        self.clock += 1
        span = self.spans.setdefault(key, [self.clock, self.clock])
        span[1] = self.clock

    def pread(self, fd: int, buffers: list[Any], offset: int) -> None:
        path = os.path.realpath(f"/proc/self/fd/{fd}")
        size = sum(len(memoryview(b)) for b in buffers)
        self.reads += 1
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
    base = make_qwen2(tmp_path / "base", seed=0)
    desc = shard_checkpoint(make_qwen2(tmp_path / "d", seed=1), tmp_path / "desc", shards=3)
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
    monkeypatch.setattr(weightdiff, "safe_open", TrackedOpen)
    monkeypatch.setattr(safetensors, "safe_open", TrackedOpen)
    p.dirs = (base, desc)  # type: ignore[attr-defined]
    yield p
    gc.collect()


def test_weight_diff_holds_at_most_one_pair(probe: _Probe) -> None:
    base, desc = probe.dirs  # type: ignore[attr-defined]
    records = stream_weight_diff(base, desc, base_name="b", desc_name="d")
    gc.collect()
    assert len(records) > 20 and all(r.note == "" for r in records if r.tensor != "lm_head.weight")
    assert probe.reads > 0 and len(probe.spans) >= 2 * 20  # both checkpoints were read, all tensors
    total, per_ckpt = probe.max_held()
    assert per_ckpt == 1, f"a checkpoint had {per_ckpt} tensors held at once"
    assert total <= 2, f"{total} tensors held at once"


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
