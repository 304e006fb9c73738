"""Weight differences: zero on itself, symmetry, documented scale behaviour, chunking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reasondiff.metrics import (
    mean_abs_weight_diff,
    normalized_weight_diff,
    relative_weight_diff,
    weight_diff_metrics,
)


def weights(seed: int, shape: tuple[int, ...] = (96, 40)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def reference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    a64, b64 = a.double().numpy(), b.double().numpy()
    nd, na, nb = np.linalg.norm(b64 - a64), np.linalg.norm(a64), np.linalg.norm(b64)
    return nd / (0.5 * na + 0.5 * nb), nd / na, float(np.abs(b64 - a64).mean())


def test_identical_tensors_give_zero() -> None:
    a = weights(0)
    assert weight_diff_metrics(a, a.clone()) == (0.0, 0.0, 0.0)


def test_matches_float64_reference_and_single_functions() -> None:
    a, b = weights(1), weights(1) + 0.1 * weights(2)
    got = weight_diff_metrics(a, b)
    assert got == pytest.approx(reference(a, b), rel=1e-6)
    assert normalized_weight_diff(a, b) == got[0]
    assert relative_weight_diff(a, b) == got[1]
    assert mean_abs_weight_diff(a, b) == got[2]


def test_symmetry() -> None:
    a, b = weights(3), weights(4)
    ab, ba = weight_diff_metrics(a, b), weight_diff_metrics(b, a)
    assert ab[0] == pytest.approx(ba[0], rel=1e-12)
    assert ab[2] == pytest.approx(ba[2], rel=1e-12)
    assert ab[1] != pytest.approx(ba[1], rel=1e-3)  # relative is to the base: not symmetric


@pytest.mark.parametrize("c", [0.5, 2.0, 0.0, -1.0])
def test_scale_behaviour(c: float) -> None:
    a = weights(5)
    norm, rel, mean_abs = weight_diff_metrics(a, c * a)
    assert norm == pytest.approx(2 * abs(c - 1) / (1 + abs(c)), rel=1e-6)
    assert rel == pytest.approx(abs(c - 1), rel=1e-6)
    assert mean_abs == pytest.approx(abs(c - 1) * float(a.abs().mean()), rel=1e-6)


def test_invariant_to_common_scaling() -> None:
    a, b = weights(6), weights(7)
    assert normalized_weight_diff(3.0 * a, 3.0 * b) == pytest.approx(
        normalized_weight_diff(a, b), rel=1e-6
    )


def test_chunked_equals_unchunked() -> None:
    a, b = weights(8, (33, 17, 5)), weights(9, (33, 17, 5))
    whole = weight_diff_metrics(a, b, chunk_elems=10**9)
    for chunk in (1, 7, 1000):
        assert weight_diff_metrics(a, b, chunk_elems=chunk) == pytest.approx(whole, rel=1e-12)


def test_zero_tensors_are_defined() -> None:
    z = torch.zeros(4, 4)
    assert weight_diff_metrics(z, z) == (0.0, 0.0, 0.0)
    norm, rel, _ = weight_diff_metrics(z, torch.ones(4, 4))
    assert norm == 2.0
    assert math.isinf(rel)


def test_bf16_and_numpy_inputs() -> None:
    a, b = weights(10), weights(11)
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    assert weight_diff_metrics(a16, b16) == pytest.approx(
        reference(a16.float(), b16.float()), rel=1e-6
    )
    assert weight_diff_metrics(a.numpy(), b.numpy()) == weight_diff_metrics(a, b)
