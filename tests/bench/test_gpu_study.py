"""``benchmarks/gpu_study.py --tiny``: the GPU study's code, end to end, on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import gpu_study


@pytest.mark.slow
def test_tiny_study_runs_both_ways_with_k_plus_one_forwards_and_no_activations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = {r.name: r for r in gpu_study.main(["--tiny", "--out", str(tmp_path)])}
    out = capsys.readouterr().out
    for how in ("compare", "pytest"):
        assert results[f"gpu_study_{how}_forwards_per_trace"].ratio == 4.0  # k + 1, k = 3
        assert results[f"gpu_study_{how}_metrics_ms"].ratio is not None
        assert results[f"gpu_study_{how}_projection_min"].ratio is not None
        cache = tmp_path / f"cache-{how}"
        assert list(cache.rglob("*.json")), "metric results are cached"
        assert not list(cache.rglob("*.safetensors")), "a default run writes no activations"
    for line in (
        "gpu_study_compare_metrics_ms: ratio=",
        "forwards/trace",
        "bytes written",
        "one forward with all hidden states",
    ):
        assert line in out


def test_stage_line_parsing() -> None:
    line = "reasondiff stages: resolve 6.1s, weight diffs 0.2s, metric cache 0.0s, forwards 37.9s"
    assert gpu_study._parse_stages(line) == {
        "resolve": 6.1, "weight diffs": 0.2, "metric cache": 0.0, "forwards": 37.9
    }  # fmt: skip
    assert gpu_study._parse_forwards("reasondiff cache: activations 12 computed, 0 loaded") == 12
