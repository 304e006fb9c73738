"""Weight differences: zero on itself, symmetry, documented scale behaviour, chunking."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

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


def _float64_reference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """The three metrics with the float32 difference (the contract) summed in float64."""
    d = (b.float() - a.float()).double()
    a64, b64 = a.double(), b.double()
    nd, na, nb = (float(torch.linalg.vector_norm(t)) for t in (d, a64, b64))
    return nd / (0.5 * na + 0.5 * nb), nd / na, float(d.abs().sum()) / d.numel()


def _naive_float32_sum(x: torch.Tensor) -> float:
    """Left-to-right float32 accumulation (numpy's accumulate is sequential, unlike torch's
    float cumsum, which accumulates in double on CPU): what a plain loop gets."""
    return float(np.add.accumulate(x.float().numpy(), dtype=np.float32)[-1])


def test_large_dynamic_range_within_1e6_of_float64() -> None:
    """A few weights ~1e4 among ~1e-3 ones (massive-activation-like rows): float32 block
    sums added in float64 stay within 1e-6 of a float64 reference."""
    g = torch.Generator().manual_seed(12)
    a = torch.randn(2_000_003, generator=g) * 1e-3
    a[torch.randint(0, a.numel(), (5,), generator=g)] = 1e4 * torch.tensor(
        [1.0, -2.0, 3.0, -0.5, 1.5]
    )
    b = a + torch.randn(a.numel(), generator=g) * 1e-4
    b[:7] += 50.0  # a few large changes too
    got = weight_diff_metrics(a, b)
    assert got == pytest.approx(_float64_reference(a, b), rel=1e-6)


def test_ten_million_elements_within_1e6_of_float64_where_naive_float32_is_not() -> None:
    g = torch.Generator().manual_seed(13)
    a = (torch.randn(10_000_000, generator=g) * 0.02).to(torch.bfloat16)
    b = (a.float() + torch.randn(a.numel(), generator=g) * 1e-3).to(torch.bfloat16)
    ref = _float64_reference(a, b)
    got = weight_diff_metrics(a, b)
    assert got == pytest.approx(ref, rel=1e-6)
    # the data discriminates: a sequential float32 sum of the same squares misses 1e-6
    sq = (b.float() - a.float()) ** 2
    exact = float(sq.double().sum())
    assert abs(_naive_float32_sum(sq) - exact) / exact > 1e-6


def test_result_is_independent_of_chunk_size_across_blocks() -> None:
    from reasondiff.metrics.weights import REDUCE_BLOCK

    n = 3 * REDUCE_BLOCK + 5
    a, b = weights(14, (n,)), weights(15, (n,))
    whole = weight_diff_metrics(a, b, chunk_elems=10**9)
    for chunk in (1, REDUCE_BLOCK, REDUCE_BLOCK + 1, 2 * REDUCE_BLOCK):
        assert weight_diff_metrics(a, b, chunk_elems=chunk) == whole  # bit-identical
    assert whole == pytest.approx(reference(a, b), rel=1e-6)


def test_accumulator_rejects_a_partial_chunk_before_the_end() -> None:
    from reasondiff.errors import MetricInputError
    from reasondiff.metrics.weights import REDUCE_BLOCK, WeightDiffAccumulator

    acc = WeightDiffAccumulator(2 * REDUCE_BLOCK)
    x = torch.ones(REDUCE_BLOCK + 3)
    acc.add(x, x)
    with pytest.raises(MetricInputError, match="does not fit"):
        acc.add(x, x)
    acc.reset()
    acc.add(x, 2 * x)
    assert acc.result() == pytest.approx((2 / 3, 1.0, 1.0), rel=1e-12)


# ------------------------------------------------------------------ the fused kernel
def _kernel_or_skip(dtype: torch.dtype) -> None:
    from reasondiff.metrics.weights import kernel_for

    if kernel_for(dtype) is None:
        pytest.skip("no C compiler here: only the torch form runs")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [3 * 8192 + 5, 2 * 8192 + 1, 1, 2])  # odd tails, one block
def test_fused_kernel_equals_the_torch_form_and_the_float64_reference(
    dtype: torch.dtype, n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reasondiff.metrics.weights import DISABLE_ENV

    _kernel_or_skip(dtype)
    a = weights(21, (n,)).to(dtype)
    b = (a.double() + weights(22, (n,)).double() * 0.05).to(dtype)  # a small change
    fused = weight_diff_metrics(a, b)
    monkeypatch.setenv(DISABLE_ENV, "1")
    torch_form = weight_diff_metrics(a, b)
    assert fused == pytest.approx(torch_form, rel=1e-6)
    assert fused == pytest.approx(reference(a, b), rel=1e-6)
    assert fused != torch_form or n <= 2  # the two forms really are different code


def test_fused_kernel_takes_unaligned_bf16_chunks() -> None:
    """A bf16 view starting one element in is not 4-byte aligned (a tensor at an odd
    offset of its file): the kernel loads through memcpy, so the values are right."""
    _kernel_or_skip(torch.bfloat16)
    raw_a, raw_b = weights(23, (4097,)).bfloat16(), weights(24, (4097,)).bfloat16()
    a, b = raw_a[1:], raw_b[1:]
    assert weight_diff_metrics(a, b) == pytest.approx(reference(a, b), rel=1e-6)


def test_fused_kernel_lets_a_nan_reach_the_sums() -> None:
    """No fast-math 'nnan': a NaN weight is found and named, not summed away."""
    from reasondiff.errors import MetricInputError

    _kernel_or_skip(torch.bfloat16)
    a = weights(25, (3 * 8192,)).bfloat16()
    b = a.clone()
    b[9000] = float("nan")
    with pytest.raises(MetricInputError, match=r"b \(shape \(24576,\)\) has 1 non-finite"):
        weight_diff_metrics(a, b)


# ------------------------------------------------------------------ building the kernel
@pytest.fixture
def fresh_kernel(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The kernel module with nothing loaded yet (restored after the test)."""
    from reasondiff.metrics import _weights_kernel

    monkeypatch.setattr(_weights_kernel, "_loaded", None)
    return _weights_kernel


def test_the_kernel_is_built_once_per_cpu_and_then_only_loaded(
    fresh_kernel: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wk = fresh_kernel
    if wk.compiler() is None:
        pytest.skip("no C compiler here")
    builds: list[Path] = []
    real = wk.build
    monkeypatch.setattr(wk, "build", lambda target, cc: (builds.append(target), real(target, cc)))
    assert set(wk.kernels(lambda: tmp_path)) == {torch.bfloat16, torch.float32, torch.float64}
    assert len(builds) == 1 and builds[0].parent == tmp_path / "kernels" and builds[0].exists()
    assert not list((tmp_path / "kernels").glob("*.tmp"))  # the rename left nothing behind
    # a new process (nothing loaded) needs no compiler: the cached library is loaded
    monkeypatch.setattr(wk, "_loaded", None)
    monkeypatch.setattr(wk, "compiler", lambda: None)
    assert set(wk.kernels(lambda: tmp_path)) == {torch.bfloat16, torch.float32, torch.float64}
    assert len(builds) == 1
    # another CPU kind sharing the cache directory gets its own library
    monkeypatch.setattr(wk, "cpu_key", lambda: "another cpu")
    assert wk.library_path(tmp_path) != builds[0]


def test_without_a_compiler_the_torch_form_runs_and_says_why(
    fresh_kernel: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="reasondiff"):
        assert fresh_kernel.kernels(lambda: tmp_path) == {}
    assert "no C compiler" in caplog.text and "torch form" in caplog.text
    assert not (tmp_path / "kernels").exists()
    a = weights(26, (3 * 8192 + 1,)).bfloat16()
    b = (a.float() + 0.01).bfloat16()
    assert weight_diff_metrics(a, b) == pytest.approx(reference(a, b), rel=1e-6)


def test_a_failed_build_falls_back_and_says_why(
    fresh_kernel: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    failing = shutil.which("false")
    if failing is None:
        pytest.skip("no 'false' command here")
    monkeypatch.setenv("CC", failing)
    with caplog.at_level(logging.WARNING, logger="reasondiff"):
        assert fresh_kernel.kernels(lambda: tmp_path) == {}
    assert "failed" in caplog.text and "torch form" in caplog.text
    assert not list((tmp_path / "kernels").glob("*.so*.tmp"))


def test_a_kernel_that_fails_its_self_check_is_never_used(
    fresh_kernel: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """A miscompiled (here: sabotaged) library is caught before any weight is summed."""
    wk = fresh_kernel
    if wk.compiler() is None:
        pytest.skip("no C compiler here")
    good = "p2 += d0 * d0 + d1 * d1;"
    source = wk.SOURCE.read_text()
    assert good in source
    broken = tmp_path / "broken.c"
    broken.write_text(source.replace(good, "p2 += d0 * d0;"))  # loses every second value
    monkeypatch.setattr(wk, "SOURCE", broken)
    with caplog.at_level(logging.WARNING, logger="reasondiff"):
        assert wk.kernels(lambda: tmp_path) == {}
    assert "differ from float64" in caplog.text
