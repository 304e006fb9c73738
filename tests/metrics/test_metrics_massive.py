"""Massive activations: planted values found, none in Gaussian data, both criteria matter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reasondiff.metrics import massive_activations


def gaussian(seed: int, n: int = 64, d: int = 32) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_planted_values_found_at_their_positions() -> None:
    x = gaussian(0)
    x[0, 5] = 2.0e4
    x[9, 5] = -1.5e4
    x[9, 17] = 3.0e3
    got = massive_activations(x)
    assert got.positions == (0, 9)
    assert got.indices.tolist() == [[0, 5], [9, 5], [9, 17]]
    assert got.values.tolist() == pytest.approx([2.0e4, -1.5e4, 3.0e3])
    assert got.count == 3
    assert got.max_abs == pytest.approx(2.0e4)
    assert got.median_abs == pytest.approx(float(np.median(np.abs(x.numpy()))))
    assert got.values.dtype == torch.float32  # works in the input's dtype


def test_none_in_gaussian_data() -> None:
    got = massive_activations(gaussian(1) * 3.0)
    assert got.count == 0
    assert got.positions == ()
    assert got.indices.shape == (0, 2)


def test_ratio_criterion_matters() -> None:
    x = gaussian(2)
    x[3, 3] = 500.0  # > threshold 100, but < 1000 x median (~0.67) = ~670
    assert massive_activations(x).count == 0
    assert massive_activations(x, ratio=100.0).positions == (3,)


def test_threshold_criterion_matters() -> None:
    x = gaussian(3) * 1e-3  # median |a| ~ 7e-4
    x[4, 1] = 50.0  # > 1000 x median, but < 100
    assert massive_activations(x).count == 0
    assert massive_activations(x, threshold=10.0).positions == (4,)


def test_accepts_numpy_and_bf16() -> None:
    x = gaussian(4)
    x[2, 2] = 1.0e4
    assert massive_activations(x.numpy()).positions == (2,)
    assert massive_activations(x.to(torch.bfloat16)).positions == (2,)


@pytest.mark.parametrize(
    "values",
    [
        torch.randn(256, 512, generator=torch.Generator().manual_seed(7)),  # even count
        torch.randn(255, 7, generator=torch.Generator().manual_seed(8)),  # odd count
        torch.zeros(6, 4),  # all zero: one bucket, all ties
        torch.tensor([[0.0, 1e-40, 3e-39], [5.0, 5.0, 5.0]]),  # subnormals and ties
        (torch.randn(64, 33, generator=torch.Generator().manual_seed(9)) * 1e4).bfloat16(),
        torch.full((9, 9), 2.5).index_put_(
            (torch.tensor([0]), torch.tensor([0])), torch.tensor(3e4)
        ),
    ],
    ids=["even", "odd", "zeros", "subnormal-ties", "bf16", "massive"],
)
def test_median_by_buckets_equals_numpy(values: torch.Tensor) -> None:
    """The float32 radix selection is exact: numpy's median of the same |values|."""
    from reasondiff.metrics.massive import _median

    want = float(np.median(np.abs(values.float().numpy()).astype(np.float64)))
    assert _median(values.abs()) == want
