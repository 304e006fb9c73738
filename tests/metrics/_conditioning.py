"""Tolerances derived from the conditioning of what two computations share (issue 11.7).

Two summation orders of the same float64 formula agree to about eps times the size of
the terms that cancel, relative to the size of the result. On data with massive
activations the terms are huge: a squared distance ||x_i - x_j||^2 = r_i + r_j - 2 x_i.x_j
between two 3e4-scale rows is a difference of ~1e9-sized terms, so it keeps only ~8 of
its 16 digits. A fixed 1e-12 passes with one BLAS blocking and fails with another (other
thread counts, ``OMP_NUM_THREADS=1``, another CPU). These helpers turn the data into the
first-order rounding bound instead; ``FLOOR`` stays the tolerance of well-conditioned data.

Import as ``from _conditioning import ...`` (pytest puts ``tests/metrics`` on sys.path).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

EPS = float(np.finfo(np.float64).eps)
#: The tolerance of well-conditioned data (two orders of ~1e4 float64 roundings).
FLOOR = 1e-12
#: Rounding steps per entry and a margin: a bound, not an estimate.
SAFETY = 16.0


def _rows(z: Any) -> np.ndarray:
    return np.asarray(z.detach().cpu().numpy() if hasattr(z, "detach") else z, np.float64)


def rbf_rounding_tol(*zs: Any, scale: float = 0.8) -> float:
    """Absolute tolerance for RBF CKA of ``zs`` computed in two summation orders.

    Each kernel entry K_ij = exp(-d2_ij / (2 sigma^2)) inherits the absolute error of
    its squared distance, eps * (r_i + r_j) with r the centred squared row norms, scaled
    by 1 / (2 sigma^2): dK_ij ~ K_ij eps (r_i + r_j) / (2 sigma^2). CKA moves by about
    ||dK||_F / ||K||_F. Entries between far-apart rows (K ~ 0) cost nothing, so only
    close pairs of massive rows drive the bound (about 1e-9 for 3e4-scale rows among
    unit ones, against 1e-15 for plain Gaussian data).
    """
    tol = 0.0
    for z in zs:
        x = _rows(z)
        xc = x - x.mean(0)
        r = (xc * xc).sum(1)
        diff = xc[:, None, :] - xc[None, :, :]
        d2 = (diff * diff).sum(-1)  # accurate: no cancellation
        off = d2[~np.eye(len(x), dtype=bool)]
        sigma2 = (scale**2) * float(np.median(off))
        k = np.exp(-d2 / (2.0 * sigma2))
        spread = np.linalg.norm(k * (r[:, None] + r[None, :])) / (2.0 * sigma2)
        tol += EPS * spread / float(np.linalg.norm(k))
    return max(FLOOR, SAFETY * tol)


def downdate_tol(x: Any, drop: Sequence[int]) -> float:
    """Absolute tolerance for a linear CKA whose statistics subtract the ``drop`` rows.

    Removing rows from the raw moments (the sums of x_i and x_i x_i^T; centring comes
    after) subtracts their outer products; what stays carries eps times the subtracted
    mass, relative to the mass that remains.
    """
    a = _rows(x)
    sq = (a * a).sum(1)
    keep = np.ones(len(a), dtype=bool)
    keep[list(drop)] = False
    return max(FLOOR, SAFETY * EPS * float(sq[~keep].sum()) / float(sq[keep].sum()))
