"""bench_stream's GPU case reports itself as not measured where there is no CUDA."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_stream


@pytest.mark.skipif(torch.cuda.is_available(), reason="the case runs for real on CUDA")
def test_the_gpu_case_is_not_measured_without_cuda() -> None:
    results = bench_stream._gpu_case(2, 128)
    assert [r.name for r in results] == ["stream_gpu_7b_mem", "stream_gpu_7b_time"]
    for r in results:
        assert r.status == "not measured" and not r.short
        assert "not measured" in r.line() and "no CUDA device" in r.line()


def test_the_generation_gpu_case_is_not_measured_without_cuda() -> None:
    """The same for bench_generate: no CUDA is 'not measured', never 'short'."""
    from benchmarks import bench_generate

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the case runs")
    r = bench_generate._gpu_case()
    assert r.status == "not measured" and not r.short, r.line()
