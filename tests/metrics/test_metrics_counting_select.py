"""The GPU's exact selection (order statistics by counting over bit patterns), run on CPU.

CI has no GPU, so the CUDA code path's logic is checked here on CPU tensors against a
sort, and swapped into the bandwidth median to check it changes nothing there.
"""

from __future__ import annotations

import pytest
import torch

from reasondiff.errors import MetricInputError
from reasondiff.metrics import _median, median_pairwise_distance
from reasondiff.metrics._median import kth_by_counting


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 7, 200])
def test_every_rank_equals_a_sort_with_ties_zeros_and_negative_zero(
    dtype: torch.dtype, n: int
) -> None:
    g = torch.Generator().manual_seed(n)
    v = (torch.rand(n, generator=g) * 1e4).to(dtype)
    v[::3] = v[0]  # ties
    v[::5] = 0.0
    if n > 1:
        v[1] = -0.0
    want = torch.sort(v.double()).values
    for q in range(n):
        first, nxt = kth_by_counting(v, q, with_next=q + 1 < n)
        assert first == float(want[q])
        if q + 1 < n:
            assert nxt == float(want[q + 1])


def test_negative_values_and_bad_ranks_are_named_errors() -> None:
    with pytest.raises(MetricInputError, match="non-negative"):
        kth_by_counting(torch.tensor([1.0, -2.0]), 0)
    with pytest.raises(MetricInputError, match="out of range"):
        kth_by_counting(torch.tensor([1.0, 2.0]), 2)
    with pytest.raises(MetricInputError, match="dtype"):
        kth_by_counting(torch.tensor([1, 2]), 0)


@pytest.mark.parametrize("median", ["offdiag", "all"])
def test_bandwidth_median_is_unchanged_by_the_gpu_selection(
    median: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64)
    x[0, 3] = 3e4  # massive activation: distances of very different scales
    cpu = median_pairwise_distance(x, median=median)  # type: ignore[arg-type]
    monkeypatch.setattr(_median, "_kth", kth_by_counting)  # what a CUDA tensor takes
    assert median_pairwise_distance(x, median=median) == cpu  # type: ignore[arg-type]
