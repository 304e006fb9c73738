"""Weight-difference metrics for one tensor pair (METHODS.md §7).

    normalized  d(A, B) = ||B - A||_F / (0.5 ||A||_F + 0.5 ||B||_F)
    relative            = ||B - A||_F / ||A||_F        (A is the base)
    mean_abs            = mean |B - A|

Elementwise work is float32 (bf16 / fp16 inputs are upcast exactly), sums accumulate in
float64, and the tensors are processed in chunks of ``chunk_elems`` elements, so a
152k x 3584 embedding never needs a float64 (or even a float32) copy of the whole thing.

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
from typing import Any

import numpy as np
import torch

from ..errors import MetricInputError
from ._validate import shape_str, to_tensor

Tensor = torch.Tensor
_F64 = torch.float64
#: Elements per chunk (16 MiB of float32 per operand).
DEFAULT_CHUNK_ELEMS = 1 << 22


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


def weight_diff_metrics(
    a: Tensor | np.ndarray[Any, Any],
    b: Tensor | np.ndarray[Any, Any],
    *,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> tuple[float, float, float]:
    """(normalized, relative, mean_abs) difference of base ``a`` and descendant ``b``, one pass.

    Raises:
        MetricInputError: shapes differ, empty tensors, bool dtype, NaN/Inf (names the
            tensor, count and first index), or a float32 overflow of the difference.
    """
    if isinstance(chunk_elems, bool) or not isinstance(chunk_elems, int) or chunk_elems < 1:
        raise MetricInputError(f"chunk_elems must be a positive int, got {chunk_elems!r}")
    shape = tuple(int(s) for s in to_tensor(a, "a").shape)
    fa, fb = _pair(a, b)
    sums = torch.zeros(4, dtype=_F64, device=fa.device)  # ||d||^2, sum|d|, ||a||^2, ||b||^2
    for i in range(0, fa.numel(), chunk_elems):
        ca = fa[i : i + chunk_elems].to(torch.float32)
        cb = fb[i : i + chunk_elems].to(torch.float32)
        d = cb - ca
        sums[0] += torch.sum(d * d, dtype=_F64)
        sums[1] += torch.sum(d.abs_(), dtype=_F64)
        sums[2] += torch.sum(ca * ca, dtype=_F64)
        sums[3] += torch.sum(cb * cb, dtype=_F64)
    sq_d, abs_d, sq_a, sq_b = (float(v) for v in sums.cpu())
    if not all(math.isfinite(v) for v in (sq_d, abs_d, sq_a, sq_b)):
        msg = _first_nonfinite(fa, shape, "a", chunk_elems) or _first_nonfinite(
            fb, shape, "b", chunk_elems
        )
        raise MetricInputError(
            msg or f"weight difference overflows float32 (shape {shape}); values are too large"
        )
    nd, na, nb = math.sqrt(sq_d), math.sqrt(sq_a), math.sqrt(sq_b)
    den = 0.5 * na + 0.5 * nb
    normalized = nd / den if den > 0 else 0.0
    # a zero base: nothing changed (0.0) or everything did (inf); never NaN
    relative = nd / na if na > 0 else (0.0 if nd == 0 else math.inf)
    return normalized, relative, abs_d / fa.numel()


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
