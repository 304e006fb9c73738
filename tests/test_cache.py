"""Tests for reasondiff.cache: hits, cross-process once-only compute, validation, LRU, off."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from reasondiff import cache as cache_mod
from reasondiff.cache import ActivationCache, JsonCache, cache_key, default_cache_dir

META = {"model": "fp-abc", "trace": "t-1", "dtype": "float32", "max_tokens": "64", "version": "1"}


def _tensors(seed: int, n: int = 8, d: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"hidden.{i}": torch.randn(n, d, generator=g) for i in range(3)}


class Counter:
    """A compute function that counts its calls."""

    def __init__(self, seed: int = 0, n: int = 8) -> None:
        self.calls = 0
        self.seed = seed
        self.n = n

    def __call__(self) -> dict[str, torch.Tensor]:
        self.calls += 1
        return _tensors(self.seed, self.n)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- keys, dirs
def test_cache_key_is_order_free_and_versioned(monkeypatch: pytest.MonkeyPatch) -> None:
    k = cache_key(model="a", trace="b")
    assert k == cache_key(trace="b", model="a") and len(k) == 64
    assert k != cache_key(model="a", trace="c")
    assert k != cache_key(model="ab", trace="")
    monkeypatch.setattr(cache_mod, "EXTRACTION_VERSION", "999")
    assert k != cache_key(model="a", trace="b")
    with pytest.raises(TypeError, match="layers=3"):
        cache_key(layers=3)  # type: ignore[arg-type]


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REASONDIFF_CACHE", str(tmp_path / "rd"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "rd"
    monkeypatch.delenv("REASONDIFF_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "reasondiff"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "reasondiff"


# ---------------------------------------------------------------- hits and misses
def test_miss_then_memory_hit_then_disk_hit(tmp_path: Path) -> None:
    key = cache_key(model="m", trace="t")
    compute = Counter()
    c1 = ActivationCache(tmp_path, cap_bytes=None)
    first = c1.get_or_compute(key, META, compute)
    again = c1.get_or_compute(key, META, compute)
    assert compute.calls == 1
    assert (c1.stats.computed, c1.stats.loaded, c1.stats.memory_hits) == (1, 1, 1)
    _assert_same(first, again)
    _assert_same(first, _tensors(0))

    c2 = ActivationCache(tmp_path, cap_bytes=None)
    from_disk = c2.get_or_compute(key, META, compute)
    assert compute.calls == 1
    assert (c2.stats.computed, c2.stats.loaded, c2.stats.memory_hits) == (0, 1, 0)
    _assert_same(first, from_disk)

    path = c2.entry_path(key)
    assert path == tmp_path / "activations" / key[:2] / f"{key}.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        stored = fh.metadata()
    assert {k: stored[k] for k in META} == META
    assert not list(path.parent.glob("*.tmp"))


def test_other_meta_is_an_invalid_entry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = cache_key(model="m")
    ActivationCache(tmp_path, cap_bytes=None).get_or_compute(key, META, Counter(seed=1))
    c = ActivationCache(tmp_path, cap_bytes=None)
    compute = Counter(seed=2)
    with caplog.at_level(logging.WARNING, logger="reasondiff"):
        got = c.get_or_compute(key, {**META, "max_tokens": "128"}, compute)
    assert compute.calls == 1
    _assert_same(got, _tensors(2))
    assert len(c.stats.invalid_entries) == 1
    assert (
        "metadata differs" in c.stats.invalid_entries[0]
        and "max_tokens" in c.stats.invalid_entries[0]
    )
    assert str(c.entry_path(key)) in caplog.text


def _truncate(path: Path) -> None:
    with open(path, "rb+") as fh:
        fh.truncate(path.stat().st_size - 7)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_header_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[12] ^= 0x20  # inside the JSON header
    path.write_bytes(bytes(data))


def _append(path: Path) -> None:
    with open(path, "ab") as fh:
        fh.write(b"\0" * 16)


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_truncate, "header implies"),
        (_flip_last_byte, "checksum mismatch"),
        (_flip_header_byte, ""),
        (_append, "header implies"),
        (lambda p: p.write_bytes(b"\x01"), "header truncated"),
    ],
    ids=["truncated", "bit-flip-data", "bit-flip-header", "trailing-bytes", "one-byte"],
)
def test_damaged_entries_are_detected_and_recomputed(tmp_path: Path, damage, why: str) -> None:  # type: ignore[no-untyped-def]
    key = cache_key(model="m", trace="dmg")
    ActivationCache(tmp_path, cap_bytes=None).get_or_compute(key, META, Counter(seed=3))
    c = ActivationCache(tmp_path, cap_bytes=None)
    damage(c.entry_path(key))
    compute = Counter(seed=3)
    got = c.get_or_compute(key, META, compute)
    assert compute.calls == 1
    _assert_same(got, _tensors(3))
    assert len(c.stats.invalid_entries) == 1 and why in c.stats.invalid_entries[0]
    # the rewritten entry is valid again
    c3 = ActivationCache(tmp_path, cap_bytes=None)
    _assert_same(c3.get_or_compute(key, META, Counter(seed=99)), _tensors(3))
    assert c3.stats.loaded == 1 and not c3.stats.invalid_entries


def test_shared_storage_and_views_are_written(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    tensors = {"hidden.2": base, "prenorm.2": base, "view": base.t()}
    key = cache_key(model="shared")
    ActivationCache(tmp_path, cap_bytes=None).get_or_compute(key, META, lambda: tensors)
    got = ActivationCache(tmp_path, cap_bytes=None).get_or_compute(key, META, Counter())
    assert torch.equal(got["prenorm.2"], base) and torch.equal(got["view"], base.t())


# ---------------------------------------------------------------- LRU
def test_lru_eviction_by_cap(tmp_path: Path) -> None:
    probe = ActivationCache(tmp_path / "probe", cap_bytes=None)
    probe.get_or_compute(cache_key(k="probe"), META, Counter())
    entry_size = probe.entry_path(cache_key(k="probe")).stat().st_size

    c = ActivationCache(tmp_path / "c", cap_bytes=3 * entry_size, memory_budget_bytes=0)
    keys = {name: cache_key(k=name) for name in "abcd"}
    for name in "abc":
        c.get_or_compute(keys[name], META, Counter())
    c.get_or_compute(keys["a"], META, Counter())  # a is now the most recently used
    assert c.stats.loaded == 1 and c.stats.memory_hits == 0
    c.get_or_compute(keys["d"], META, Counter())
    present = {n for n, k in keys.items() if c.entry_path(k).exists()}
    assert present == {"a", "c", "d"}
    assert c.stats.evicted == 1

    tiny = ActivationCache(tmp_path / "t", cap_bytes=1)  # smaller than any entry
    tiny.get_or_compute(keys["a"], META, Counter())
    tiny.get_or_compute(keys["b"], META, Counter())
    assert tiny.entry_path(keys["b"]).exists()  # the entry just written is never evicted
    assert not tiny.entry_path(keys["a"]).exists()


def test_memory_budget(tmp_path: Path) -> None:
    one = sum(t.numel() * 4 for t in _tensors(0).values())
    c = ActivationCache(tmp_path, cap_bytes=None, memory_budget_bytes=2 * one)
    keys = [cache_key(k=str(i)) for i in range(3)]
    for k in keys:
        c.get_or_compute(k, META, Counter())
    c.get_or_compute(keys[2], META, Counter())
    c.get_or_compute(keys[1], META, Counter())
    assert c.stats.memory_hits == 2
    c.get_or_compute(keys[0], META, Counter())  # dropped from memory: read from disk
    assert c.stats.memory_hits == 2 and c.stats.loaded == 3


# ---------------------------------------------------------------- caching off
def test_cache_dir_under_a_file_turns_caching_off_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    c = ActivationCache(blocker / "cache", cap_bytes=None, memory_budget_bytes=0)
    computes = [Counter(seed=i) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="reasondiff"):
        results = [c.get_or_compute(cache_key(k=str(i)), META, computes[i]) for i in range(3)]
    for i, r in enumerate(results):
        _assert_same(r, _tensors(i))
    assert [x.calls for x in computes] == [1, 1, 1]
    assert c.stats.disabled_reason is not None and str(blocker) in c.stats.disabled_reason
    assert caplog.text.count("cache disabled") == 1
    assert not c.stats.invalid_entries


def test_full_disk_turns_caching_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def enospc(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_mod.os, "replace", enospc)
    c = ActivationCache(tmp_path, cap_bytes=None)
    key = cache_key(k="full")
    compute = Counter(seed=5)
    _assert_same(c.get_or_compute(key, META, compute), _tensors(5))
    _assert_same(c.get_or_compute(key, META, compute), _tensors(5))  # from memory
    assert compute.calls == 1
    assert c.stats.disabled_reason is not None and "ENOSPC" in c.stats.disabled_reason
    assert not c.entry_path(key).exists()
    assert not list(c.entry_path(key).parent.glob("*.tmp"))  # no temp litter
    j = JsonCache(tmp_path, "metrics")
    assert j.get_or_compute(cache_key(k="j"), lambda: {"x": 1.5}) == {"x": 1.5}
    assert j.stats.disabled_reason is not None and "ENOSPC" in j.stats.disabled_reason


def test_compute_errors_propagate_and_release_the_lock(tmp_path: Path) -> None:
    c = ActivationCache(tmp_path, cap_bytes=None)
    key = cache_key(k="boom")

    def boom() -> dict[str, torch.Tensor]:
        raise RuntimeError("model exploded")

    with pytest.raises(RuntimeError, match="model exploded"):
        c.get_or_compute(key, META, boom)
    assert c.stats.disabled_reason is None
    _assert_same(c.get_or_compute(key, META, Counter()), _tensors(0))


# ---------------------------------------------------------------- two processes
_WORKER = textwrap.dedent(
    """
    import hashlib, sys, time
    from pathlib import Path
    import torch
    from reasondiff.cache import ActivationCache

    root, log, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

    def compute():
        with open(log, "a") as fh:
            fh.write("computed\\n")
        time.sleep(1.0)  # keep the lock long enough for the other process to queue
        g = torch.Generator().manual_seed(11)
        return {"hidden.0": torch.randn(16, 8, generator=g)}

    while not go.exists():
        time.sleep(0.01)
    c = ActivationCache(root, cap_bytes=None)
    out = c.get_or_compute("k" * 64, {"m": "x"}, compute)
    print(hashlib.sha256(out["hidden.0"].numpy().tobytes()).hexdigest(), c.stats.computed)
    """
)


@pytest.mark.slow
def test_two_processes_compute_once(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    log, go = tmp_path / "computed.log", tmp_path / "go"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "cache"), str(log), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    go.touch()  # both start asking at (nearly) the same moment, after their imports
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert log.read_text().count("computed") == 1
    digests = [o[0].split()[0] for o in outs]
    assert digests[0] == digests[1]
    assert sorted(int(o[0].split()[1]) for o in outs) == [0, 1]


# ---------------------------------------------------------------- JSON cache
def test_json_cache_roundtrip_and_types(tmp_path: Path) -> None:
    calls: list[int] = []

    def compute() -> dict[str, object]:
        calls.append(1)
        return {"rows": [(1, 0.25), (2, float("nan"))], "name": "w"}

    j = JsonCache(tmp_path, "weights")
    key = cache_key(pair="a__b")
    cold = j.get_or_compute(key, compute)
    warm = JsonCache(tmp_path, "weights").get_or_compute(key, compute)
    assert len(calls) == 1
    assert cold["rows"][0] == [1, 0.25] and warm["rows"][0] == [1, 0.25]
    assert warm["rows"][1][1] != warm["rows"][1][1]  # NaN survives
    assert j.entry_path(key).parent.parent == tmp_path / "json" / "weights"
    assert JsonCache(tmp_path, "other").get_or_compute(key, lambda: 7) == 7  # namespaces apart


@pytest.mark.parametrize(
    "damage",
    [
        lambda doc: doc["payload"].__setitem__("v", 0.5000001),  # bit flip in a value
        lambda doc: doc.__setitem__("key", "0" * 64),
        lambda doc: doc.pop("sha256"),
    ],
    ids=["payload", "key", "no-checksum"],
)
def test_json_cache_detects_damage(tmp_path: Path, damage) -> None:  # type: ignore[no-untyped-def]
    key = cache_key(k="json")
    j = JsonCache(tmp_path, "m")
    j.get_or_compute(key, lambda: {"v": 0.5})
    path = j.entry_path(key)
    doc = json.loads(path.read_text())
    damage(doc)
    path.write_text(json.dumps(doc))
    j2 = JsonCache(tmp_path, "m")
    assert j2.get_or_compute(key, lambda: {"v": 0.75}) == {"v": 0.75}
    assert len(j2.stats.invalid_entries) == 1 and j2.stats.computed == 1


def test_json_cache_garbage_file(tmp_path: Path) -> None:
    key = cache_key(k="garbage")
    j = JsonCache(tmp_path, "m")
    j.entry_path(key).parent.mkdir(parents=True)
    j.entry_path(key).write_bytes(b"\xff\xfe{{{")
    assert j.get_or_compute(key, lambda: [1, 2]) == [1, 2]
    assert len(j.stats.invalid_entries) == 1


def test_bad_keys_and_meta_rejected(tmp_path: Path) -> None:
    c = ActivationCache(tmp_path, cap_bytes=None)
    with pytest.raises(ValueError, match=r"cache key '\.\./x'"):
        c.get_or_compute("../x", META, Counter())
    with pytest.raises(TypeError, match="keys and values must be str"):
        c.get_or_compute(cache_key(k="x"), {"layers": 3}, Counter())  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="namespace"):
        JsonCache(tmp_path, "a/b")


def test_json_cache_get_peeks_without_computing(tmp_path: Path) -> None:
    j = JsonCache(tmp_path, "m")
    key = cache_key(k="peek")
    assert j.get(key) is None
    j.get_or_compute(key, lambda: {"a": [1, 2]})
    assert JsonCache(tmp_path, "m").get(key) == {"a": [1, 2]}
    assert j.stats.computed == 1


# ---------------------------------------------------------------- shared use (issue 11.6)
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077], ids=["022", "002", "077"])
def test_entries_respect_the_umask(tmp_path: Path, mask: int) -> None:
    """A cache shared by several users: entries get 0o666 less the umask, not 0o600."""
    import stat

    key = cache_key(model="m", trace="t")
    old = os.umask(mask)
    try:
        assert cache_mod.file_mode() == 0o666 & ~mask
        act = ActivationCache(tmp_path, cap_bytes=None)
        act.get_or_compute(key, META, Counter())
        js = JsonCache(tmp_path, "metrics")
        js.get_or_compute(key, lambda: {"x": 1})
    finally:
        os.umask(old)
    for path in (act.entry_path(key), js.entry_path(key)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_an_entry_this_user_cannot_read_is_recomputed_not_discarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user's unreadable entry is no damage: never logged as invalid nor deleted
    before a readable replacement is in place (tests run as root, so EACCES is injected)."""
    key = cache_key(model="m", trace="t")
    ActivationCache(tmp_path, cap_bytes=None).get_or_compute(key, META, Counter())
    JsonCache(tmp_path, "metrics").get_or_compute(key, lambda: {"x": 1})

    def denied(*args: object, **kwargs: object) -> object:
        raise PermissionError(errno.EACCES, "Permission denied")

    act = ActivationCache(tmp_path, cap_bytes=None)
    js = JsonCache(tmp_path, "metrics")
    removed: list[str] = []
    real_unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda p, *a, **k: removed.append(str(p)))
    with monkeypatch.context() as mp:
        mp.setattr(cache_mod, "_expected_size", denied)
        compute = Counter()
        _assert_same(act.get_or_compute(key, META, compute), _tensors(0))
        mp.setattr(Path, "read_text", denied)
        assert js.get_or_compute(key, lambda: {"x": 1}) == {"x": 1}
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert compute.calls == 1 and act.stats.computed == 1 and js.stats.computed == 1
    assert act.stats.invalid_entries == [] and js.stats.invalid_entries == []
    assert removed == []
    assert act.disabled is False and js.disabled is False
    # the replacement is a valid, readable entry
    assert JsonCache(tmp_path, "metrics").get(key) == {"x": 1}
