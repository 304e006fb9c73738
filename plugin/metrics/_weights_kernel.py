# numba types the kernel bodies itself (float32 lanes, intrinsics): mypy checks the rest.
# mypy: disable-error-code="call-arg,var-annotated,assignment,misc,untyped-decorator"
"""A fused single-pass kernel for the weight-difference sums, compiled with numba.

Why: the torch form of :class:`~reasondiff.metrics.weights.WeightDiffAccumulator` makes
seven passes over every chunk (two upcasts, a subtraction, squares, three reductions)
and pays Python per op: 4.3 ns per element pair on one core, about ten times a raw read
of a bf16 checkpoint from the page cache. This kernel reads each element once, upcasts
it in a register (bf16 is the top half of a float32: a shift and a bit cast) and keeps
the four sums per ``REDUCE_BLOCK`` block, so it runs at memory speed (0.4-0.5 ns per
bf16 element pair, measured) and releases the GIL, so two reader threads overlap.

Values: within a block, runs of ``SUB_BLOCK`` elements are summed in float32 (SIMD
lanes), the runs in float64: the same accuracy class as the torch form's float32 block
reductions (both ~1e-8 relative; float64 inputs are summed in float64 throughout).
Blocks sit at fixed offsets, so results do not depend on the chunking.

This module imports numba (extra ``fast``); :func:`reasondiff.metrics.weights.kernel_for`
imports it on first use, only if numba is there. The kernels are compiled once per machine and cached
on disk (numba's ``cache=True``: next to this file, or numba's user cache directory when
that is read-only), so a process pays ~0.1 s to load them, not a compile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch
from numba.core import types
from numba.extending import intrinsic

from .weights import REDUCE_BLOCK

Kernel = Callable[[Any, Any, Any], None]
#: Elements summed in float32 (8 SIMD lanes) before each float64 add: the float32 error
#: stays ~1e-8 relative, as in the torch form's blocks (measured 1.4e-8 to 2.2e-8).
SUB_BLOCK = 256
_WORD = REDUCE_BLOCK // 2  # uint32 words (bf16 pairs) per block
_LOW = np.uint32(16)
_HIGH = np.uint32(0xFFFF0000)

# reassoc lets LLVM vectorize the sums; no 'nnan'/'ninf': a NaN or Inf weight must reach
# the sums so that the caller can name it.
_jit = numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})


@intrinsic
def _as_f32(typingctx: Any, bits: Any) -> Any:
    """The float32 whose bit pattern is ``bits`` (an LLVM bitcast, no memory)."""
    sig = types.float32(types.uint32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return sig, codegen


@_jit
def _bf16_pair_sums(a: Any, b: Any, out: Any) -> None:
    """``a``, ``b``: bf16 chunks viewed as uint32 words, two values per word (a block
    past the end, left by an odd last value, gets zeros)."""
    n = a.size
    half = SUB_BLOCK // 2
    for k in range(out.shape[0]):
        lo = k * _WORD
        hi = min(lo + _WORD, n)
        s0 = s1 = s2 = s3 = 0.0
        for j in range(lo, hi, half):
            p0 = p1 = p2 = p3 = np.float32(0.0)
            for i in range(j, min(j + half, hi)):
                wa = a[i]
                wb = b[i]
                x0 = _as_f32(wa << _LOW)
                x1 = _as_f32(wa & _HIGH)
                y0 = _as_f32(wb << _LOW)
                y1 = _as_f32(wb & _HIGH)
                d0 = y0 - x0
                d1 = y1 - x1
                p0 += x0 * x0 + x1 * x1
                p1 += y0 * y0 + y1 * y1
                p2 += d0 * d0 + d1 * d1
                p3 += abs(d0) + abs(d1)
            s0 += p0
            s1 += p1
            s2 += p2
            s3 += p3
        out[k, 0] = s0
        out[k, 1] = s1
        out[k, 2] = s2
        out[k, 3] = s3


@_jit
def _float_sums(a: Any, b: Any, out: Any) -> None:
    """float32 (float32 sub-block sums) or float64 (float64 throughout) chunks."""
    n = a.size
    zero = a.dtype.type(0.0)
    for k in range(out.shape[0]):
        lo = k * REDUCE_BLOCK
        hi = min(lo + REDUCE_BLOCK, n)
        s0 = s1 = s2 = s3 = 0.0
        for j in range(lo, hi, SUB_BLOCK):
            p0 = p1 = p2 = p3 = zero
            for i in range(j, min(j + SUB_BLOCK, hi)):
                x = a[i]
                y = b[i]
                d = y - x
                p0 += x * x
                p1 += y * y
                p2 += d * d
                p3 += abs(d)
            s0 += p0
            s1 += p1
            s2 += p2
            s3 += p3
        out[k, 0] = s0
        out[k, 1] = s1
        out[k, 2] = s2
        out[k, 3] = s3


def _bf16(a: Any, b: Any, out: Any) -> None:
    # pairs of bf16 as one uint32 word: shifts and masks only, 8 lanes wide (1.9x a
    # one-value-at-a-time loop, measured); an odd last value is added here
    even = a.size - a.size % 2
    _bf16_pair_sums(a[:even].view(np.uint32), b[:even].view(np.uint32), out)
    if even < a.size:
        x, y = (
            float((v[-1:].view(np.uint16).astype(np.uint32) << 16).view(np.float32)[0])
            for v in (a, b)
        )
        d = y - x
        out[-1] += (x * x, y * y, d * d, abs(d))


KERNELS: dict[torch.dtype, Kernel] = {
    torch.bfloat16: _bf16,
    torch.float32: _float_sums,
    torch.float64: _float_sums,
}
