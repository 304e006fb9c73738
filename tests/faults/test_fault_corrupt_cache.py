"""Row 3 (cache level): a damaged entry is detected on read, logged with its path, recomputed.

Besides the named damages (truncated, bit-flipped, wrong shape, wrong metadata), a sweep
flips one bit at every byte of a small entry: whatever the flip hits (header length,
JSON header, metadata, tensor data, padding), the caller must get the right values and
never an exception, i.e. the flip is either detected or provably harmless.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from reasondiff.cache import ActivationCache, JsonCache, cache_key

META = {"model": "fp-base", "trace": "ids-123", "layers": "0,1,2"}
KEY = cache_key(model="fp-base", trace="ids-123")


def acts() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {f"hidden.{i}": torch.randn(6, 4, generator=g) for i in range(3)}


def rows() -> list[list[Any]]:
    return [
        ["model.layers.0.mlp.up_proj.weight", 0, "mlp.up_proj.weight", [8, 4], 0.5, 0.25, 0.125, ""]
    ]


class Calls:
    def __init__(self) -> None:
        self.n = 0

    def acts(self) -> dict[str, torch.Tensor]:
        self.n += 1
        return acts()

    def rows(self) -> list[list[Any]]:
        self.n += 1
        return rows()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _reshape_keeping_record(path: Path) -> None:
    """Same bytes, one tensor with another shape, the cache's own record left as it was."""
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    tensors["hidden.1"] = tensors["hidden.1"].reshape(4, 6).contiguous()
    save_file(tensors, str(path), metadata=meta)


def _other_model_metadata(path: Path) -> None:
    """A complete, self-consistent entry, but written for another model's fingerprint."""
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    meta["model"] = "fp-other"
    save_file(tensors, str(path), metadata=meta)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_data_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_truncate, r"header implies|not JSON|header truncated"),
        (_flip_data_bit, r"checksum mismatch"),
        (_reshape_keeping_record, r"shapes"),
        (_other_model_metadata, r"metadata differs"),
    ],
    ids=["truncated", "bit-flip", "wrong-shape", "wrong-metadata"],
)
def test_damaged_activation_entry_is_logged_with_its_path_and_recomputed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Any, why: str
) -> None:
    ActivationCache(tmp_path, cap_bytes=None).get_or_compute(KEY, META, acts)
    cache = ActivationCache(tmp_path, cap_bytes=None)
    path = cache.entry_path(KEY)
    damage(path)
    calls = Calls()
    with caplog.at_level(logging.WARNING, logger="reasondiff"):
        got = cache.get_or_compute(KEY, META, calls.acts)
    assert calls.n == 1
    assert _same(got, acts())
    logged = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert logged, f"no log line names {path}: {[r.getMessage() for r in caplog.records]}"
    assert re.search(why, logged[0]), logged[0]
    assert cache.stats.invalid_entries and str(path) in cache.stats.invalid_entries[0]
    fresh = ActivationCache(tmp_path, cap_bytes=None)
    assert _same(fresh.get_or_compute(KEY, META, calls.acts), acts()) and calls.n == 1


def _json_wrong_key(path: Path) -> None:
    doc = json.loads(path.read_text())
    doc["key"] = "0" * 64
    path.write_text(json.dumps(doc))


def _json_edited_payload(path: Path) -> None:
    doc = json.loads(path.read_text())
    doc["payload"][0][4] = 0.75  # a plausible number, checksum not updated
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "damage",
    [_truncate, _flip_data_bit, _json_wrong_key, _json_edited_payload],
    ids=["truncated", "bit-flip", "wrong-key", "edited-payload"],
)
def test_damaged_json_entry_is_logged_with_its_path_and_recomputed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Any
) -> None:
    JsonCache(tmp_path, "weightdiff").get_or_compute(KEY, rows)
    cache = JsonCache(tmp_path, "weightdiff")
    path = cache.entry_path(KEY)
    damage(path)
    calls = Calls()
    with caplog.at_level(logging.WARNING, logger="reasondiff"):
        assert cache.get(KEY) is None  # a peek (what a warm session does first) sees no value
        got = cache.get_or_compute(KEY, calls.rows)
    assert calls.n == 1 and got == rows()
    assert any(str(path) in r.getMessage() for r in caplog.records)
    assert JsonCache(tmp_path, "weightdiff").get_or_compute(KEY, calls.rows) == rows()
    assert calls.n == 1


def test_every_single_bit_flip_of_an_activation_entry_is_caught_or_harmless(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # hundreds of rewrites: keep it fast
    ActivationCache(tmp_path, cap_bytes=None).get_or_compute(KEY, META, acts)
    path = ActivationCache(tmp_path, cap_bytes=None).entry_path(KEY)
    original = path.read_bytes()
    reference = acts()
    detected = tried = 0
    data_start = 8 + int.from_bytes(original[:8], "little")
    # Every byte of the length prefix and JSON header (where parsing can go wrong), every
    # 8th byte of tensor data (checksummed); low and high bits alternate.
    offsets = [*range(data_start), *range(data_start, len(original), 8)]
    for offset in offsets:
        for bit in (0x01,) if offset % 2 else (0x80,):
            tried += 1
            data = bytearray(original)
            data[offset] ^= bit
            path.write_bytes(bytes(data))
            cache = ActivationCache(tmp_path, cap_bytes=None)
            calls = Calls()
            try:
                got = cache.get_or_compute(KEY, META, calls.acts)
            except Exception as exc:  # pragma: no cover - the failure being tested for
                pytest.fail(f"flip of bit {bit:#x} at byte {offset}: {type(exc).__name__}: {exc}")
            assert _same(got, reference), f"wrong values after flip {bit:#x} at byte {offset}"
            detected += calls.n
    # Almost every flip must be detected (a few in header padding are harmless).
    assert detected >= 0.95 * tried, (detected, tried)


def test_every_single_bit_flip_of_a_json_entry_is_caught_or_harmless(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    JsonCache(tmp_path, "weightdiff").get_or_compute(KEY, rows)
    path = JsonCache(tmp_path, "weightdiff").entry_path(KEY)
    original = path.read_bytes()
    for offset in range(len(original)):
        data = bytearray(original)
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))
        cache = JsonCache(tmp_path, "weightdiff")
        try:
            got = cache.get_or_compute(KEY, rows)
        except Exception as exc:  # pragma: no cover - the failure being tested for
            pytest.fail(f"flip at byte {offset}: {type(exc).__name__}: {exc}")
        assert got == rows(), f"wrong value after flip at byte {offset}: {got}"
