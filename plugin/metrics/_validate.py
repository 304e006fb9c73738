"""Input validation shared by the metric functions: one place that says what a metric accepts.

Every public metric calls :func:`as_matrix` (or :func:`as_pair`) first, so a bad input is
rejected with a :class:`~reasondiff.errors.MetricInputError` that names the argument, its
shape and the problem, instead of surfacing later as a NaN or an opaque torch error.
Not for weights (any rank; see :mod:`.weights`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import torch

from ..errors import MetricInputError

#: What a metric accepts as a representation: an N x D tensor or array (N tokens).
Matrix: TypeAlias = torch.Tensor | npt.NDArray[Any]
#: Row indices: a 1-D integer tensor / array or a sequence of ints.
Indices: TypeAlias = torch.Tensor | npt.NDArray[Any] | Sequence[int]


def shape_str(t: torch.Tensor | npt.NDArray[Any]) -> str:
    """``(100, 10)`` for messages (torch.Size prints as ``torch.Size([...])``)."""
    return str(tuple(int(s) for s in t.shape))


def to_tensor(x: object, name: str) -> torch.Tensor:
    """Wrap a tensor or numpy array as a tensor (no copy where possible) or raise."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        try:
            t = torch.from_numpy(np.ascontiguousarray(x))
        except TypeError as exc:
            raise MetricInputError(
                f"{name}: numpy array of dtype {x.dtype} (shape {shape_str(x)}) cannot be scored: {exc}"
            ) from None
    else:
        raise MetricInputError(
            f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}"
        )
    if t.is_complex():
        raise MetricInputError(f"{name} has complex dtype {t.dtype} (shape {shape_str(t)})")
    return t


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise naming how many entries are NaN/Inf and where the first one is.

    A finite sum proves every entry finite (a NaN or Inf makes the sum NaN or Inf), at
    ~1/25 of the cost of an elementwise ``isfinite`` mask on a CPU; only a non-finite sum
    (a bad entry, or finite values overflowing the sum) takes the elementwise pass.
    """
    if t.is_floating_point() and math.isfinite(float(t.sum())):
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        count = int(bad.sum())
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        where = f"row {first[0]}, col {first[1]}" if len(first) == 2 else f"index {first}"
        raise MetricInputError(
            f"{name} (shape {shape_str(t)}) contains {count} non-finite value(s) (NaN/Inf); "
            f"first at {where}"
        )


def as_matrix(
    x: Matrix,
    name: str = "x",
    *,
    dtype: torch.dtype | None = torch.float64,
    min_rows: int = 4,
    require_variance: bool = True,
) -> torch.Tensor:
    """Validate an N x D representation and return it as a 2-D tensor of ``dtype``.

    ``dtype=None`` keeps a floating dtype (anything else becomes float32): used by
    :func:`~reasondiff.metrics.massive.massive_activations`, where |a| is exact in
    the input's own precision and a float64 copy of a large layer is wasted memory.

    Raises:
        MetricInputError: not a tensor/array, not 2-D, D = 0, fewer than ``min_rows``
            rows, NaN/Inf (count and first position), or (``require_variance``) all rows
            identical, where CKA and PCA are undefined.
    """
    t = to_tensor(x, name)
    if t.ndim != 2:
        raise MetricInputError(
            f"{name} must be 2-D (N tokens x D features), got shape {shape_str(t)}"
        )
    n, d = t.shape
    if d == 0:
        raise MetricInputError(f"{name} has no features: shape {shape_str(t)}")
    if n < min_rows:
        raise MetricInputError(
            f"{name} has N={n} rows (shape {shape_str(t)}); this metric needs N >= {min_rows}"
        )
    if dtype is None:
        dtype = t.dtype if t.is_floating_point() else torch.float32
    t = t.to(dtype)
    check_finite(t, name)
    # rows 0 and 1 differ in almost every input: only then is the full comparison skipped
    if require_variance and (n < 2 or bool((t[1] == t[0]).all())) and bool((t == t[:1]).all()):
        raise MetricInputError(
            f"{name} (shape {shape_str(t)}) has zero variance: every row is identical, "
            "so CKA / PCA is undefined"
        )
    return t


def as_pair(
    x: Matrix,
    y: Matrix,
    names: tuple[str, str] = ("x", "y"),
    *,
    dtype: torch.dtype | None = torch.float64,
    min_rows: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two representations of the same N tokens (D may differ)."""
    tx = to_tensor(x, names[0])
    ty = to_tensor(y, names[1])
    if tx.ndim == 2 and ty.ndim == 2 and tx.shape[0] != ty.shape[0]:
        raise MetricInputError(
            f"{names[0]} and {names[1]} must have the same number of rows (tokens): "
            f"{names[0]} has shape {shape_str(tx)}, {names[1]} has shape {shape_str(ty)}"
        )
    return (
        as_matrix(tx, names[0], dtype=dtype, min_rows=min_rows),
        as_matrix(ty, names[1], dtype=dtype, min_rows=min_rows),
    )


def as_indices(idx: Indices, n: int, name: str = "drop") -> torch.Tensor:
    """Validate row indices into N rows: 1-D, integer, in [0, N) (no negatives), unique.

    Negative indices are rejected on purpose: ``~i == -(i + 1)`` is how the reference
    code's ``X[~top_indices]`` bug silently selected the wrong rows.
    """
    if isinstance(idx, torch.Tensor):
        t = idx.detach().cpu()
    else:
        arr = np.asarray(idx)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        t = to_tensor(arr, name)
    if t.ndim != 1:
        raise MetricInputError(f"{name} must be a 1-D index vector, got shape {shape_str(t)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise MetricInputError(
            f"{name} must hold integer row indices, got dtype {t.dtype} "
            "(a boolean mask is not accepted: pass the indices to drop)"
        )
    t = t.to(torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        bad = t[(t < 0) | (t >= n)]
        raise MetricInputError(
            f"{name} has {bad.numel()} index(es) outside [0, {n}) (e.g. {int(bad[0])}); "
            f"the representations have N={n} rows"
        )
    uniq = torch.sort(t).values
    dup = int((uniq[1:] == uniq[:-1]).sum())
    if dup:
        raise MetricInputError(f"{name} has {dup} duplicate index(es); indices must be unique")
    return uniq  # sorted


def check_k(k: int, n: int, name: str = "k") -> int:
    """A top-k size: an int in [1, N]."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise MetricInputError(f"{name} must be an int, got {type(k).__name__}")
    if not 1 <= int(k) <= n:
        raise MetricInputError(f"{name}={k} must be in [1, N] for N={n} rows")
    return int(k)
