"""Weight figures over matrices, the zero-base flag and the robust heatmap scale (issue 18.4).

The pair: a tiny Qwen2 whose q/k/v biases are all zero in the base (as a checkpoint
re-saved with zero biases), and a descendant whose matrices move a little and whose
biases become small non-zero vectors. Every expected number is computed here from the
tensors with torch, not copied from a run.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from _checkpoints import copy_checkpoint, edit_tensors, make_qwen2
from safetensors.torch import load_file

from reasondiff import findings
from reasondiff.metrics.aggregate import (
    weight_kind,
    weight_layer_table,
    weight_layer_totals,
    weight_summary,
    zero_base_tensors,
)
from reasondiff.records import PairInfo, PairResult, ReportData, WeightRecord
from reasondiff.reports.tables import heat_scale
from reasondiff.weightdiff import stream_weight_diff


def _normalized(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (b.double() - a.double()).norm()
    return float(d / (0.5 * a.double().norm() + 0.5 * b.double().norm()))


@pytest.fixture(scope="module")
def zero_bias_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("zero-bias")
    base = make_qwen2(root / "base", seed=1)
    tensors = load_file(base / "model.safetensors")
    biases = [n for n in tensors if n.endswith(".bias")]
    assert biases, "Qwen2 has q/k/v biases"
    edit_tensors(base, {n: torch.zeros_like(tensors[n]) for n in biases})
    desc = copy_checkpoint(base, root / "desc")
    gen = torch.Generator().manual_seed(2)
    edits: dict[str, torch.Tensor | None] = {}
    for name, t in load_file(base / "model.safetensors").items():
        if name.endswith(".bias"):
            edits[name] = 1e-4 * torch.randn(t.shape, generator=gen)  # tiny, yet diff = 2
        elif t.ndim == 2 and ".layers." in name:
            edits[name] = t + 0.01 * t.std() * torch.randn(t.shape, generator=gen)
    edit_tensors(desc, edits)
    return base, desc


@pytest.fixture(scope="module")
def records(zero_bias_pair: tuple[Path, Path]) -> list[WeightRecord]:
    base, desc = zero_bias_pair
    return stream_weight_diff(base, desc, base_name="base", desc_name="desc")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_a_zero_base_tensor_is_flagged_and_sits_at_two(records, zero_bias_pair) -> None:
    biases = [r for r in records if r.tensor.endswith(".bias")]
    assert len(biases) == 6  # q, k, v in each of 2 blocks
    for r in biases:
        assert r.base_near_zero, r.tensor
        assert r.normalized_diff == pytest.approx(2.0)
        assert r.relative_diff == math.inf
    assert sorted(zero_base_tensors(records)) == sorted(r.tensor for r in biases)
    # a moved matrix is not flagged, nor is an unchanged norm
    assert not any(r.base_near_zero for r in records if not r.tensor.endswith(".bias"))


def test_headline_numbers_are_over_weight_matrices(records, zero_bias_pair) -> None:
    base, desc = (_tensors(p) for p in zero_bias_pair)
    mats = [n for n, t in base.items() if t.ndim == 2 and ".layers." in n]
    want = [_normalized(base[n], desc[n]) for n in mats]
    summary = weight_summary(records)
    assert summary["n_matrices"] == len(mats) == 14  # 7 matrices x 2 blocks
    assert summary["mean_diff"] == pytest.approx(sum(want) / len(want), rel=1e-6)
    assert summary["mean_diff"] < 0.05  # the zero-base biases (2.0) do not enter it
    assert summary["bias_mean_diff"] == pytest.approx(2.0)
    assert summary["norm_mean_diff"] == 0.0  # norms unchanged, in their own number
    assert summary["n_zero_base"] == 6
    assert {weight_kind(r) for r in records} == {"matrix", "embedding", "bias", "norm"}


def test_weight_distributed_sums_matrices_only(records, zero_bias_pair) -> None:
    base, desc = (_tensors(p) for p in zero_bias_pair)
    per_block = [0.0, 0.0]
    for n, t in base.items():
        if t.ndim == 2 and ".layers." in n:
            per_block[int(n.split(".layers.")[1].split(".")[0])] += _normalized(t, desc[n])
    totals = weight_layer_totals(records, matrices_only=True)
    assert totals == pytest.approx(per_block, rel=1e-6)
    assert weight_layer_totals(records)[0] > totals[0] + 5.9  # all kinds: 3 biases at 2
    info = PairInfo("base__desc", "base", "desc", "b", "d", expect={"weight_distributed": True})
    verdict = findings.weight_distributed(PairResult(info=info, weights=records))
    assert verdict.details["total"] == pytest.approx(sum(per_block), rel=1e-6)
    assert verdict.status == "pass"
    assert "over weight matrices" in verdict.summary


def test_heat_scale_leaves_saturated_cells_out() -> None:
    assert heat_scale([0.010, 0.012, 0.011, 2.0]) == pytest.approx(0.012)
    # a far outlier below 2 is left out too (Q3 + 3 IQR)
    assert heat_scale([0.010, 0.011, 0.012, 0.013, 0.9]) == pytest.approx(0.013)
    assert heat_scale([0.0, 0.0]) == 0.0
    assert heat_scale([2.0, 2.0]) == 2.0  # nothing else to scale by
    assert heat_scale([float("nan")]) == 0.0


def test_terminal_heatmap_marks_zero_base_cells_saturated(records) -> None:
    from reasondiff.reports import make_console, render_terminal

    info = PairInfo("base__desc", "base", "desc", "b", "d", num_layers=2)
    comps = weight_layer_table(records)
    data = ReportData(
        pairs=[info],
        weight_layers={info.pair_id: comps},
        weight_summary={info.pair_id: weight_summary(records)},
    )
    buf = io.StringIO()
    console = make_console(buf, color="no", width=200)
    render_terminal(data, console=console)
    text = buf.getvalue()
    vmax = heat_scale(v for row in comps.values() for v in row)
    assert vmax < 0.05
    assert f"scale 0..{vmax:.3g}; 6 saturated, up to 2" in text
    bias_rows = [line for line in text.splitlines() if "q_proj.bias" in line or "q bias" in line]
    assert bias_rows and all("▲" in line for line in bias_rows), text
    assert "zero base" in text  # the pair table's column
