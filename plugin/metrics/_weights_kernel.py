"""The fused weight-difference kernel (``_weights_kernel.c``), built once per machine.

Why: the torch form of :class:`~reasondiff.metrics.weights.WeightDiffAccumulator` makes
seven passes over every chunk (two upcasts, a subtraction, squares, three reductions)
and pays Python per op: 4.3 ns per bf16 element pair on one core, about ten times a raw
read of the checkpoint from the page cache. The C kernel reads each element once and
keeps the four sums per block (0.4 ns per pair, measured), and ctypes releases the GIL
for the call, so two reader threads sum in parallel.

Why C through ctypes and not numba (the previous form): numba cost each process ~0.9 s
(its import and LLVM start-up) and ~110 MiB before the first sum, four times the raw read
of a 0.5B pair. Here the first use on a machine compiles the small C source with the
system C compiler (``$CC``, else ``cc``; ~0.4 s) into
``<cache dir>/kernels/weights-<key>.so``; every later process only loads it and checks
it (0.01-0.05 s, measured). The key hashes the source, the flags and the CPU (its model and
feature flags), so a cache directory shared by machines of different kinds never hands
one of them code built for another's instruction set. Builds take a file lock and land
with an atomic rename, so pytest-xdist workers build it once.

A loaded library is checked against a float64 reference on a few hundred values before
it is used. Without a C compiler, when the build or that check fails, or with
``REASONDIFF_NO_KERNEL=1``, :func:`kernels` is empty and the torch form runs (same
values to ~1e-8 relative, about ten times slower), with one warning saying why.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .weights import REDUCE_BLOCK

log = logging.getLogger("reasondiff")

SOURCE = Path(__file__).with_name("_weights_kernel.c")
#: Reassociation lets the compiler vectorize the float32 runs; no -ffinite-math-only: a
#: NaN or Inf weight must reach the sums so that the caller can name it.
FLAGS = (
    "-O3",
    "-fno-math-errno",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-ffp-contract=fast",
    "-shared",
    "-fPIC",
)
#: Tried first, dropped if the compiler refuses it (AVX2 on x86: ~1.4x over SSE2, measured).
NATIVE_FLAGS = ("-march=native",)
BUILD_TIMEOUT_S = 120
_DOUBLE_P = ctypes.POINTER(ctypes.c_double)

_lock = threading.Lock()
_loaded: dict[torch.dtype, Kernel] | None = None


def cpu_key() -> str:
    """What the built code depends on besides its source: the CPU kind and features."""
    parts = [platform.system(), platform.machine()]
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        info = []
    for field in ("model name", "flags", "Features", "CPU part"):
        line = next((s for s in info if s.split(":")[0].strip() == field), "")
        parts.append(line.partition(":")[2].strip())
    if platform.system() == "Darwin":
        parts.append(platform.processor())
    return "|".join(parts)


def library_path(cache_root: Path) -> Path:
    """Where the library built from this source for this CPU lives."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), repr(FLAGS + NATIVE_FLAGS).encode(), cpu_key().encode()):
        digest.update(part + b"\0")
    return cache_root / "kernels" / f"weights-{digest.hexdigest()[:20]}.so"


def compiler() -> str | None:
    """``$CC`` or ``cc`` on the PATH (None: no C compiler)."""
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def build(target: Path, cc: str) -> None:
    """Compile the source into ``target`` (atomically: a temp file, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        errors = ""
        for extra in (NATIVE_FLAGS, ()):
            run = subprocess.run(
                [cc, *extra, *FLAGS, "-o", tmp, str(SOURCE)],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
            if run.returncode == 0:
                os.replace(tmp, target)
                return
            errors = run.stderr.strip()
        raise RuntimeError(f"{cc} failed: {errors[-500:]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass(frozen=True)
class Kernel:
    """One dtype's fused sums: over numpy chunks (``kernel(a, b, out)``) or raw addresses."""

    fn: Any  # the ctypes function rd_<dtype>_sums
    dtype: torch.dtype
    itemsize: int

    def sums(
        self,
        a: int,
        b: int,
        n: int,
        out: np.ndarray[Any, Any],
        *,
        window: int = 0,
        a_map: tuple[int, int] | None = None,
        b_map: tuple[int, int] | None = None,
    ) -> None:
        """Block sums of the ``n`` elements at addresses ``a`` and ``b`` into ``out``
        (float64, ``ceil(n / REDUCE_BLOCK)`` rows of 4), ``window`` elements at a time
        (a multiple of ``REDUCE_BLOCK``; 0: all at once). ``a_map`` / ``b_map``: the
        (start, end) addresses of the file mapping a side lies in, whose pages are given
        back window by window. Runs without the GIL."""
        blocks = -(-n // REDUCE_BLOCK)
        if out.dtype != np.float64 or out.shape != (blocks, 4) or not out.flags.c_contiguous:
            raise ValueError(f"out must be float64 ({blocks}, 4) for {n} values, got {out.shape}")
        if window % REDUCE_BLOCK:
            raise ValueError(f"window {window} is not a multiple of {REDUCE_BLOCK}")
        even = n - n % 2 if self.dtype == torch.bfloat16 else n
        maps = [None if m is None else (ctypes.c_void_p * 2)(*m) for m in (a_map, b_map)]
        self.fn(a, b, even, REDUCE_BLOCK, out.ctypes.data_as(_DOUBLE_P), window, *maps)
        if even < n:  # bf16 goes two values per word: the odd last value is added here
            written = -(-even // REDUCE_BLOCK)
            out[written:] = 0.0  # a block holding only that value
            x, y = (_bf16_at(p + 2 * (n - 1)) for p in (a, b))
            d = y - x
            out[-1] += (x * x, y * y, d * d, abs(d))

    def __call__(
        self, a: np.ndarray[Any, Any], b: np.ndarray[Any, Any], out: np.ndarray[Any, Any]
    ) -> None:
        """The sums of two contiguous numpy chunks (bf16 as 2-byte integers)."""
        if a.size != b.size or a.itemsize != self.itemsize or b.itemsize != self.itemsize:
            raise ValueError(
                f"{self.dtype} chunks must be {self.itemsize}-byte views of equal size"
            )
        if not (a.flags.c_contiguous and b.flags.c_contiguous):
            raise ValueError("the weight kernel needs contiguous chunks")
        self.sums(a.ctypes.data, b.ctypes.data, a.size, out)


def _bf16_at(address: int) -> float:
    bits = ctypes.c_uint16.from_address(address).value
    return float(np.array([bits << 16], dtype=np.uint32).view(np.float32)[0])


def _bind(lib: ctypes.CDLL) -> dict[torch.dtype, Kernel]:
    """The library's three entry points, by the dtype of the chunks they sum."""
    kernels = {}
    for name, dtype in (
        ("rd_bf16_sums", torch.bfloat16),
        ("rd_f32_sums", torch.float32),
        ("rd_f64_sums", torch.float64),
    ):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            _DOUBLE_P,
            ctypes.c_int64,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_void_p),
        ]
        kernels[dtype] = Kernel(fn, dtype, dtype.itemsize)
    return kernels


def _self_check(kernels: dict[torch.dtype, Kernel]) -> None:
    """Each kernel against float64 numpy on 1001 values (an odd count: the bf16 tail too).

    numpy only: a first torch op would cost a fresh process ~15 ms here."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal(1001)
    desc = base + 0.01 * rng.standard_normal(1001)
    for dtype, kernel in kernels.items():
        a: np.ndarray[Any, Any]
        b: np.ndarray[Any, Any]
        if dtype == torch.bfloat16:  # bf16 = the top half of a float32 (truncated here)
            a, b = (
                (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16) for v in (base, desc)
            )
            x, y = ((v.astype(np.uint32) << 16).view(np.float32).astype(np.float64) for v in (a, b))
        else:
            a, b = (
                v.astype(np.float32 if dtype == torch.float32 else np.float64) for v in (base, desc)
            )
            x, y = a.astype(np.float64), b.astype(np.float64)
        want = np.array([(x * x).sum(), (y * y).sum(), ((y - x) ** 2).sum(), abs(y - x).sum()])
        out = np.zeros((1, 4))
        kernel(a, b, out)
        if not np.allclose(out[0], want, rtol=1e-6, atol=0):
            raise RuntimeError(
                f"{dtype} sums {out[0].tolist()} differ from float64 {want.tolist()}"
            )


def _load(cache_root: Path) -> dict[torch.dtype, Kernel]:
    cc = compiler()
    path = library_path(cache_root)
    if not path.exists():
        if cc is None:
            raise RuntimeError("no C compiler (set CC, or install gcc or clang)")
        from filelock import FileLock

        try:
            with FileLock(str(path) + ".lock", timeout=BUILD_TIMEOUT_S):
                if not path.exists():
                    build(path, cc)
        except OSError:  # the cache directory cannot be written: build in a temp dir
            scratch = Path(tempfile.mkdtemp(prefix="reasondiff-kernel-"))
            path = scratch / path.name
            build(path, cc)
    kernels = _bind(ctypes.CDLL(str(path)))
    _self_check(kernels)
    return kernels


def kernels(cache_root: Callable[[], Path]) -> dict[torch.dtype, Kernel]:
    """The kernels by chunk dtype, built or loaded once per process ({}: use the torch form).

    ``cache_root`` is only called on the first use (it reads the environment).
    """
    global _loaded
    if _loaded is not None:  # every chunk asks: no lock on the hot path
        return _loaded
    with _lock:
        if _loaded is None:
            try:
                _loaded = _load(cache_root())
            except Exception as exc:  # no compiler, a failed build or self-check
                log.warning(
                    "reasondiff: the fused weight-diff kernel is not available (%s); weight "
                    "diffs use the torch form (same values, about 10x slower)",
                    exc,
                )
                _loaded = {}
        return _loaded
