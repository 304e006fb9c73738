"""Helpers shared by the fault-injection tests: tiny checkpoints, byte surgery, child runs.

Import as ``from _faultkit import ...`` (pytest puts ``tests/faults`` on ``sys.path``).
Everything here is deterministic and writes only under the paths it is given.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

TINY_QWEN2: dict[str, int] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 128,
}


def make_tiny_qwen2(path: Path, *, seed: int = 0, tie: bool = False, **overrides: int) -> Path:
    """A random tiny Qwen2ForCausalLM (single safetensors file, float32, no tokenizer)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**{**TINY_QWEN2, **overrides}, tie_word_embeddings=tie)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A byte copy of a checkpoint directory (real files, no links)."""
    shutil.copytree(src, dst)
    return dst


def header_span(file: Path) -> tuple[int, int]:
    """(start, end) byte offsets of the JSON header of a safetensors file."""
    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    return 8, 8 + int(n)


def tensor_span(file: Path, tensor: str) -> tuple[int, int]:
    """(start, end) absolute byte offsets of one tensor's data in a safetensors file."""
    start, end = header_span(file)
    with open(file, "rb") as fh:
        fh.seek(start)
        header = json.loads(fh.read(end - start))
    lo, hi = header[tensor]["data_offsets"]
    return end + int(lo), end + int(hi)


def file_of_tensor(path: Path, tensor: str) -> Path:
    """The safetensors file of a (possibly sharded) checkpoint that holds ``tensor``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return path / json.loads(index.read_text())["weight_map"][tensor]
    return path / "model.safetensors"


def truncate_file(file: Path, keep: float = 0.5) -> None:
    """Cut a file to ``keep`` of its size (as a killed copy or a full disk would)."""
    size = file.stat().st_size
    with open(file, "r+b") as fh:
        fh.truncate(max(1, int(size * keep)))


def entries(root: Path) -> list[Path]:
    """Every cache entry file under a cache root (activations and JSON), no locks/temps."""
    out = [p for p in root.rglob("*.safetensors") if "activations" in p.parts]
    out += [p for p in root.rglob("*.json") if "json" in p.parts]
    return sorted(p for p in out if not p.name.startswith("."))


def run_child(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -c script args...`` with the same interpreter; never hangs the suite."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def small_trace_file(src: Path, dst: Path, *, count: int = 2) -> Path:
    """The header and the first ``count`` traces of a JSONL trace set (a fast run)."""
    lines = [ln for ln in src.read_text("utf-8").splitlines() if ln.strip()]
    header = [ln for ln in lines[:1] if "reasondiff_traces" in ln]
    traces = [ln for ln in lines if "reasondiff_traces" not in ln][:count]
    dst.write_text("\n".join([*header, *traces]) + "\n", "utf-8")
    return dst


def make_session(cache: Path, base: Path | str, candidate: Path | str, **overrides: Any) -> Any:
    """An ad-hoc ``DiffSession`` (as ``--base/--candidate`` makes it) and its only pair."""
    from reasondiff.options import DiffOptions
    from reasondiff.session import DiffSession

    opts = DiffOptions(
        base=str(base),
        candidate=str(candidate),
        diff_cache=str(cache),
        device="cpu",
        bootstrap=20,
        **overrides,
    )
    session = DiffSession.create(opts)
    return session, session.pairs[0]


def flip_bits(file: Path, offset: int, mask: int, *, keep_mtime: bool = False) -> None:
    """XOR one byte with ``mask`` in place (optionally keeping mtime: silent bit rot)."""
    st = file.stat()
    with open(file, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ mask]))
    if keep_mtime:
        os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))


REPO = Path(__file__).resolve().parents[2]


def make_project(proj: Path) -> Path:
    """A scratch pytest project holding a copy of the repository's finding tests."""
    proj.mkdir(parents=True)
    shutil.copytree(REPO / "diffs", proj / "diffs", ignore=shutil.ignore_patterns("__pycache__"))
    # A root marker so pytest does not walk up into the repository's pyproject.
    (proj / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    return proj


def run_pytest_in(
    project: Path,
    *args: str,
    target: str = "diffs",
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> Any:
    """``python -m pytest <target> -q *args`` in ``project``, as a ``pytest.RunResult``."""
    import time

    import pytest

    full_env = {
        **os.environ,
        "PYTHONHASHSEED": "0",
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "200",
        "TQDM_DISABLE": "1",
        **(env or {}),
    }
    for var in ("PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER", "PYTEST_CURRENT_TEST"):
        full_env.pop(var, None)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", target, "-q", "-rfEs", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        check=False,
    )
    return pytest.RunResult(
        proc.returncode,
        proc.stdout.splitlines(),
        proc.stderr.splitlines(),
        time.perf_counter() - t0,
    )
