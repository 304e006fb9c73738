"""Weight-difference metrics for one tensor pair (METHODS.md §7).

    normalized  d(A, B) = ||B - A||_F / (0.5 ||A||_F + 0.5 ||B||_F)
    relative            = ||B - A||_F / ||A||_F        (A is the base)
    mean_abs            = mean |B - A|

Elementwise work is float32 (bf16 / fp16 inputs are upcast exactly). Accumulation is
two-level: each fixed block of ``REDUCE_BLOCK`` consecutive elements (at fixed offsets
of the flattened tensor) is reduced in float32 by torch's pairwise / cascade ``sum``
(relative error ~1e-8 per block, measured), and the per-block partial sums are then
added in float64. That keeps METHODS §7's "float32 with float64 accumulation" at the
block level while running at float32 speed (a float64-accumulating ``torch.sum`` is
2-4x slower per element). Tensors are converted in chunks of ``chunk_elems`` elements
(rounded up to whole blocks), so a 152k x 3584 embedding never needs a float32 copy of
the whole thing, and results do not depend on the chunk size: block boundaries do not
move. :class:`WeightDiffAccumulator` is the streaming form (chunks read from a file).

Where a C compiler is available, bf16 / float32 / float64 chunks on the CPU go through a
fused single-pass kernel instead (:mod:`._weights_kernel`, built once per machine): the
same blocks, runs of 256 summed in float32 and the runs in float64 (the two forms agree
to ~1e-8 relative), about ten times faster per element and free of the GIL.
``REASONDIFF_NO_KERNEL=1`` forces the torch form.

Behaviour (tested):
- identical tensors give 0.0 for all three; normalized and mean_abs are symmetric in
  (A, B); normalized is invariant to scaling both by the same c != 0;
- scaling: d(A, cA) = 2 |c - 1| / (1 + |c|), relative(A, cA) = |c - 1|; normalized lies
  in [0, 2] (triangle inequality), 2 exactly when B = -cA;
- two all-zero tensors: normalized = relative = mean_abs = 0.0 (nothing changed);
  a zero base with a non-zero descendant: relative = inf (not NaN), normalized = 2.0.
Reading tensors from checkpoints is :mod:`reasondiff.weightdiff`'s job, not this one's.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import MetricInputError
from ._validate import shape_str, to_tensor

if TYPE_CHECKING:
    from ._weights_kernel import Kernel

Tensor = torch.Tensor
#: Elements per float32 reduction block; partial sums of blocks are added in float64.
REDUCE_BLOCK = 1 << 13
#: Set to 1 to force the torch form (tests compare both; a user can rule the kernel out).
DISABLE_ENV = "REASONDIFF_NO_KERNEL"


def kernel_for(dtype: torch.dtype) -> Kernel | None:
    """The fused kernel for chunks of ``dtype`` (None: use the torch form).

    None with ``REASONDIFF_NO_KERNEL=1``, for dtypes it does not cover (fp16, fp8), or
    when it cannot be built here (no C compiler: logged once). Built or loaded on first
    use, kept in the reasondiff cache directory (``kernels/``).
    """
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    from ..diskcheck import default_cache_dir
    from ._weights_kernel import kernels

    return kernels(default_cache_dir).get(dtype)


def as_numpy(t: Tensor) -> np.ndarray[Any, Any]:
    """A zero-copy numpy view of a contiguous CPU chunk (bf16 as its int16 bit pattern)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


#: Elements per piece of the torch form (256 KiB of float32 per row of the work buffer):
#: large enough to amortize Python overhead, small enough to stay in cache (fastest
#: measured for that form).
TORCH_CHUNK_ELEMS = 1 << 16
#: Elements per chunk of :func:`weight_diff_metrics` (2 MiB of bf16 per side): the fused
#: kernel sums a chunk in one call, the torch form cuts it into cache-sized pieces. (The
#: checkpoint reader goes by ``reasondiff.weightdiff.WINDOW_BYTES`` instead.)
DEFAULT_CHUNK_ELEMS = 1 << 20


def _flat(t: Tensor, name: str) -> Tensor:
    if t.dtype == torch.bool:
        raise MetricInputError(
            f"{name} has dtype bool (shape {shape_str(t)}); expected a weight tensor"
        )
    return t.reshape(-1)


def _pair(a: Any, b: Any) -> tuple[Tensor, Tensor]:
    ta, tb = to_tensor(a, "a"), to_tensor(b, "b")
    if ta.shape != tb.shape:
        raise MetricInputError(
            f"weight tensors must have the same shape: a {shape_str(ta)} vs b {shape_str(tb)}"
        )
    if ta.numel() == 0:
        raise MetricInputError(f"weight tensors are empty (shape {shape_str(ta)})")
    return _flat(ta, "a"), _flat(tb, "b")


def _first_nonfinite(t: Tensor, shape: tuple[int, ...], name: str, chunk: int) -> str | None:
    for i in range(0, t.numel(), chunk):
        bad = ~torch.isfinite(t[i : i + chunk].to(torch.float32))
        if bool(bad.any()):
            count = sum(
                int((~torch.isfinite(t[j : j + chunk].to(torch.float32))).sum())
                for j in range(0, t.numel(), chunk)
            )
            pos = i + int(torch.nonzero(bad)[0, 0])
            where = tuple(int(v) for v in np.unravel_index(pos, shape))
            return f"{name} (shape {shape}) has {count} non-finite value(s); first at index {where}"
    return None


def check_chunk_elems(chunk_elems: object) -> int:
    """``chunk_elems`` rounded up to whole reduction blocks (or ``MetricInputError``)."""
    if isinstance(chunk_elems, bool) or not isinstance(chunk_elems, int) or chunk_elems < 1:
        raise MetricInputError(f"chunk_elems must be a positive int, got {chunk_elems!r}")
    return -(-chunk_elems // REDUCE_BLOCK) * REDUCE_BLOCK


class WeightDiffAccumulator:
    """Running sums of one tensor pair fed as consecutive flat chunks, then the metrics.

    Every chunk but the last must hold a whole number of ``REDUCE_BLOCK`` elements, so
    blocks sit at the same offsets however the tensor is cut (results are independent
    of the chunking). Chunks may be any real dtype; they are upcast to float32 into a
    reused work buffer, so the caller may reuse its chunk memory after ``add`` returns.
    """

    def __init__(
        self,
        chunk_elems: int = DEFAULT_CHUNK_ELEMS,
        device: torch.device | None = None,
        *,
        fused: bool = True,
    ):
        self.chunk_elems = check_chunk_elems(chunk_elems)
        self.fused = fused  # False: the torch form even where the kernel is available
        self.numel = 0
        self._ended = False
        self._device = device
        self._kernels: dict[torch.dtype, Kernel | None] = {}
        self._work: Tensor | None = None  # torch form only, made on first use
        self._squares: Tensor | None = None
        # float64 (blocks, 4) per chunk: ||a||^2, ||b||^2, ||d||^2, sum|d| of each block;
        # numpy from the kernel (no torch op runs in a reader thread on that path)
        self._parts: list[Tensor | np.ndarray[Any, Any]] = []

    def reset(self) -> None:
        """Start a new tensor pair (the work buffers are kept)."""
        self.numel = 0
        self._ended = False
        self._parts = []

    def add(self, a: Tensor, b: Tensor) -> None:
        """Add the next chunk of the base (``a``) and descendant (``b``), both flat."""
        m = a.numel()
        if b.numel() != m or m > self.chunk_elems or self._ended:
            raise MetricInputError(
                f"chunk of {m} / {b.numel()} elements does not fit (chunk_elems "
                f"{self.chunk_elems}, after a partial chunk: {self._ended})"
            )
        if m == 0:
            return
        self._ended = m % REDUCE_BLOCK != 0
        kernel = (
            self.kernel(a.dtype)
            if a.dtype == b.dtype and a.device.type == "cpu" and b.device.type == "cpu"
            else None
        )
        if kernel is not None:  # one fused pass at memory speed (C, built once per machine)
            part64 = np.empty((-(-m // REDUCE_BLOCK), 4), dtype=np.float64)
            kernel(as_numpy(a.contiguous()), as_numpy(b.contiguous()), part64)
            self._parts.append(part64)
        else:  # cache-sized pieces: whole blocks, so the block offsets do not move
            for i in range(0, m, TORCH_CHUNK_ELEMS):
                self._parts.append(
                    self._torch_part(a[i : i + TORCH_CHUNK_ELEMS], b[i : i + TORCH_CHUNK_ELEMS])
                )
        self.numel += m

    def add_block_sums(self, parts: np.ndarray[Any, Any], numel: int) -> None:
        """Add a whole pair's block sums, computed by the caller with the kernel's
        :meth:`~reasondiff.metrics._weights_kernel.Kernel.sums` (``ceil(numel /
        REDUCE_BLOCK)`` rows of 4, float64): the reader that maps files sums a pair in
        one call, without chunks."""
        if self._ended or parts.shape != (-(-numel // REDUCE_BLOCK), 4):
            raise MetricInputError(
                f"block sums {parts.shape} do not fit {numel} elements (after a partial "
                f"chunk: {self._ended})"
            )
        self._ended = numel % REDUCE_BLOCK != 0
        self._parts.append(parts)
        self.numel += numel

    def kernel(self, dtype: torch.dtype) -> Kernel | None:
        """:func:`kernel_for`, asked once per dtype (every chunk needs it); None when this
        accumulator was made with ``fused=False``."""
        if not self.fused:
            return None
        if dtype not in self._kernels:
            self._kernels[dtype] = kernel_for(dtype)
        return self._kernels[dtype]

    def _torch_part(self, a: Tensor, b: Tensor) -> Tensor:
        """The block sums of one piece in torch ops (float32 blocks, float64 out)."""
        m = a.numel()
        if self._work is None or self._squares is None:
            size = min(self.chunk_elems, TORCH_CHUNK_ELEMS)
            self._work = torch.empty(3, size, dtype=torch.float32, device=self._device or a.device)
            self._squares = torch.empty_like(self._work)
        work, squares = self._work[:, :m], self._squares[:, :m]
        work[0].copy_(a)
        work[1].copy_(b)
        torch.sub(work[1], work[0], out=work[2])
        torch.mul(work, work, out=squares)
        full, rest = divmod(m, REDUCE_BLOCK)
        blocks = full + (rest > 0)
        part = torch.empty(blocks, 4, dtype=torch.float32, device=work.device)
        if full:
            n = full * REDUCE_BLOCK
            part[:full, :3] = squares[:, :n].view(3, full, REDUCE_BLOCK).sum(2).T
            part[:full, 3] = work[2, :n].abs_().view(full, REDUCE_BLOCK).sum(1)
        if rest:
            n = full * REDUCE_BLOCK
            part[full, :3] = squares[:, n:].sum(1)
            part[full, 3] = work[2, n:].abs_().sum()
        return part.to(torch.float64)

    def sums(self) -> tuple[float, float, float, float]:
        """(||a||^2, ||b||^2, ||d||^2, sum |d|): block partials added in float64."""
        if not self._parts:
            return 0.0, 0.0, 0.0, 0.0
        parts = [p if isinstance(p, np.ndarray) else p.cpu().numpy() for p in self._parts]
        total = np.concatenate(parts).sum(0)
        sq_a, sq_b, sq_d, abs_d = (float(v) for v in total)
        return sq_a, sq_b, sq_d, abs_d

    def result(self) -> tuple[float, float, float]:
        """(normalized, relative, mean_abs); ``MetricInputError`` if a sum is not finite.

        A NaN/Inf weight or a float32 overflow of the difference both show as a
        non-finite sum; the caller, who can re-read the tensors, says which.
        """
        if self.numel == 0:
            raise MetricInputError("weight tensors are empty")
        sq_a, sq_b, sq_d, abs_d = self.sums()
        if not all(math.isfinite(v) for v in (sq_d, abs_d, sq_a, sq_b)):
            raise MetricInputError("non-finite weight difference (NaN/Inf or float32 overflow)")
        nd, na, nb = math.sqrt(sq_d), math.sqrt(sq_a), math.sqrt(sq_b)
        den = 0.5 * na + 0.5 * nb
        normalized = nd / den if den > 0 else 0.0
        # a zero base: nothing changed (0.0) or everything did (inf); never NaN
        relative = nd / na if na > 0 else (0.0 if nd == 0 else math.inf)
        return normalized, relative, abs_d / self.numel


def weight_diff_metrics(
    a: Tensor | np.ndarray[Any, Any],
    b: Tensor | np.ndarray[Any, Any],
    *,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> tuple[float, float, float]:
    """(normalized, relative, mean_abs) difference of base ``a`` and descendant ``b``, one pass.

    ``chunk_elems`` bounds the float32 work memory (rounded up to whole
    ``REDUCE_BLOCK`` blocks); it does not change the result.

    Raises:
        MetricInputError: shapes differ, empty tensors, bool dtype, NaN/Inf (names the
            tensor, count and first index), or a float32 overflow of the difference.
    """
    chunk = check_chunk_elems(chunk_elems)
    shape = tuple(int(s) for s in to_tensor(a, "a").shape)
    fa, fb = _pair(a, b)
    acc = WeightDiffAccumulator(chunk, device=fa.device)
    for i in range(0, fa.numel(), chunk):
        acc.add(fa[i : i + chunk], fb[i : i + chunk])
    try:
        return acc.result()
    except MetricInputError:
        msg = _first_nonfinite(fa, shape, "a", chunk) or _first_nonfinite(fb, shape, "b", chunk)
        raise MetricInputError(
            msg or f"weight difference overflows float32 (shape {shape}); values are too large"
        ) from None


def normalized_weight_diff(
    a: Tensor | np.ndarray[Any, Any], b: Tensor | np.ndarray[Any, Any]
) -> float:
    """||B - A||_F / (0.5 ||A||_F + 0.5 ||B||_F); 0.0 for two all-zero tensors."""
    return weight_diff_metrics(a, b)[0]


def relative_weight_diff(
    a: Tensor | np.ndarray[Any, Any], b: Tensor | np.ndarray[Any, Any]
) -> float:
    """||B - A||_F / ||A||_F (A = base); 0.0 if both are zero, inf if only A is."""
    return weight_diff_metrics(a, b)[1]


def mean_abs_weight_diff(
    a: Tensor | np.ndarray[Any, Any], b: Tensor | np.ndarray[Any, Any]
) -> float:
    """mean |B - A| over all elements."""
    return weight_diff_metrics(a, b)[2]
