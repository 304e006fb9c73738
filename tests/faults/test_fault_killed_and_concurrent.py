"""Rows 1-2: a worker SIGKILLed in the middle of a cache write, and 4 workers racing.

The kill is injected AT the write (the child's writer writes part of the temp file and
then sends itself SIGKILL), not left to timing luck. The "next run" must never read a
partial entry, must recompute it, and must not deadlock on the lock file the dead
process left behind (filelock uses flock(2), which the kernel drops with the process).
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from _faultkit import run_child

from reasondiff.cache import ActivationCache, JsonCache, cache_key

ACT_KEY = cache_key(model="fp-kill", trace="t0")
WD_KEY = cache_key(kind="weights", base="fp-a", desc="fp-b")
META = {"model": "fp-kill", "trace": "t0", "layers": "0,1,2"}


def reference_activations() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {f"hidden.{i}": torch.randn(64, 32, generator=g) for i in range(3)}


def reference_weight_rows() -> list[list[Any]]:
    return [
        [
            f"model.layers.{i}.mlp.up_proj.weight",
            i,
            "mlp.up_proj.weight",
            [8, 4],
            0.1 * i,
            0.2,
            0.3,
            "",
        ]
        for i in range(40)
    ]


# The child builds both caches exactly like a session does and dies inside one write.
_KILL_CHILD = """
import os, signal, sys
from pathlib import Path
import torch
from reasondiff import cache as cache_mod
from reasondiff.cache import ActivationCache, JsonCache

root, which, where, act_key, wd_key, meta_json = sys.argv[1:7]
import json
meta = json.loads(meta_json)

def die_at_write(real_write):
    def write(tmp):
        real_write(tmp)                      # the real bytes go to the temp file ...
        if where == "mid-write":
            size = os.path.getsize(tmp)
            with open(tmp, "r+b") as fh:     # ... of which only part reached the disk
                fh.truncate(size // 2)
        os.kill(os.getpid(), signal.SIGKILL)  # killed before os.replace
    return write

real_atomic = cache_mod._DiskCache._atomic_write
def atomic(self, path, write):
    if (which == "activations") == isinstance(self, ActivationCache):
        write = die_at_write(write)
    return real_atomic(self, path, write)
cache_mod._DiskCache._atomic_write = atomic

g = torch.Generator().manual_seed(7)
acts = {f"hidden.{i}": torch.randn(64, 32, generator=g) for i in range(3)}
rows = [[f"model.layers.{i}.mlp.up_proj.weight", i, "mlp.up_proj.weight", [8, 4], 0.1 * i, 0.2, 0.3, ""] for i in range(40)]
ActivationCache(Path(root), cap_bytes=None).get_or_compute(act_key, meta, lambda: acts)
JsonCache(Path(root), "weightdiff").get_or_compute(wd_key, lambda: rows)
print("survived")
"""


def _get_with_deadline(fn: Any, seconds: float = 30.0) -> Any:
    """Run ``fn`` in a thread; a lock that is never released fails the test, not hangs it."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the test thread
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"cache call still blocked after {seconds}s: stale lock deadlock"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.parametrize(
    ("which", "where"),
    [("activations", "mid-write"), ("weightdiff", "before-replace")],
)
def test_sigkill_during_write_leaves_no_entry_and_next_run_recomputes(
    tmp_path: Path, which: str, where: str
) -> None:
    root = tmp_path / "cache"
    proc = run_child(_KILL_CHILD, str(root), which, where, ACT_KEY, WD_KEY, json.dumps(META))
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    assert "survived" not in proc.stdout

    acts = ActivationCache(root, cap_bytes=None)
    wd = JsonCache(root, "weightdiff")
    path = acts.entry_path(ACT_KEY) if which == "activations" else wd.entry_path(WD_KEY)
    # The kill left a temp file and the lock file, never an entry under the real name.
    assert not path.exists()
    assert list(path.parent.glob(f".{path.name}.*.tmp")), "the injected write did not happen"
    lock = Path(str(path) + ".lock")
    assert lock.exists(), "expected the dead process's lock file to be left behind"

    calls: list[str] = []

    def compute_acts() -> dict[str, torch.Tensor]:
        calls.append("activations")
        return reference_activations()

    def compute_rows() -> list[list[Any]]:
        calls.append("weightdiff")
        return reference_weight_rows()

    got_acts = _get_with_deadline(lambda: acts.get_or_compute(ACT_KEY, META, compute_acts))
    got_rows = _get_with_deadline(lambda: wd.get_or_compute(WD_KEY, compute_rows))
    # The killed entry is recomputed (the other one was written before the kill, if at all).
    assert which in calls
    assert acts.stats.invalid_entries == [] and wd.stats.invalid_entries == []
    for k, v in reference_activations().items():
        assert torch.equal(got_acts[k], v), k
    assert got_rows == json.loads(json.dumps(reference_weight_rows()))
    # ... and the recomputed entry is now complete and served from disk without compute.
    calls.clear()
    again = ActivationCache(root, cap_bytes=None).get_or_compute(ACT_KEY, META, compute_acts)
    rows_again = JsonCache(root, "weightdiff").get_or_compute(WD_KEY, compute_rows)
    assert calls == []
    assert torch.equal(again["hidden.2"], reference_activations()["hidden.2"])
    assert rows_again == got_rows


_RACE_CHILD = """
import hashlib, json, sys, time
from pathlib import Path
import torch
from reasondiff.cache import ActivationCache, JsonCache

root, counter, go, act_key, wd_key, meta_json = sys.argv[1:7]
meta = json.loads(meta_json)

def compute_acts():
    with open(counter, "a") as fh:
        fh.write("activations\\n")
    time.sleep(0.5)  # hold the lock while the others queue on it
    g = torch.Generator().manual_seed(7)
    return {f"hidden.{i}": torch.randn(64, 32, generator=g) for i in range(3)}

def compute_rows():
    with open(counter, "a") as fh:
        fh.write("weightdiff\\n")
    time.sleep(0.5)
    return [["t", i, "c", [2, 2], 0.5, 0.25, 0.125, ""] for i in range(10)]

while not Path(go).exists():
    time.sleep(0.005)
a = ActivationCache(Path(root), cap_bytes=None)
w = JsonCache(Path(root), "weightdiff")
acts = a.get_or_compute(act_key, meta, compute_acts)
rows = w.get_or_compute(wd_key, compute_rows)
h = hashlib.sha256()
for k in sorted(acts):
    h.update(k.encode()); h.update(acts[k].numpy().tobytes())
print(json.dumps({"acts": h.hexdigest(), "rows": hashlib.sha256(json.dumps(rows).encode()).hexdigest(),
                  "computed": a.stats.computed + w.stats.computed}))
"""


@pytest.mark.slow
def test_four_workers_compute_each_entry_once_and_agree(tmp_path: Path) -> None:
    import subprocess
    import sys
    import textwrap

    root, counter, go = tmp_path / "cache", tmp_path / "computed.log", tmp_path / "go"
    script = tmp_path / "race.py"
    script.write_text(textwrap.dedent(_RACE_CHILD))
    args = [str(root), str(counter), str(go), ACT_KEY, WD_KEY, json.dumps(META)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    go.touch()  # all four ask at (nearly) the same moment, after their imports
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [o[1][-1500:] for o in outs]
    lines = counter.read_text().splitlines()
    assert sorted(lines) == ["activations", "weightdiff"]
    results = [json.loads(o[0]) for o in outs]
    assert len({r["acts"] for r in results}) == 1
    assert len({r["rows"] for r in results}) == 1
    assert sum(r["computed"] for r in results) == 2
    # identical bytes on disk as what every worker got
    entry = ActivationCache(root, cap_bytes=None).entry_path(ACT_KEY)
    reread = ActivationCache(root, cap_bytes=None).get_or_compute(ACT_KEY, META, dict)
    h = hashlib.sha256()
    for k in sorted(reread):
        h.update(k.encode())
        h.update(reread[k].numpy().tobytes())
    assert h.hexdigest() == results[0]["acts"]
    assert entry.is_file()
