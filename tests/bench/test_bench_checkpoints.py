"""Synthetic checkpoints for weight_diff and the forward counter of the forwards benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import checkpoints
from benchmarks.bench_forwards import CallCounter

TINY = checkpoints.Shape(
    "tiny", hidden=16, layers=2, intermediate=24, heads=4, kv_heads=2, vocab=64
)


def test_real_shapes_have_the_published_parameter_counts() -> None:
    # Qwen2-1.5B / Qwen2-0.5B with tied embeddings (no lm_head.weight stored)
    assert checkpoints.QWEN2_1_5B.numel() == 1_543_714_304
    assert checkpoints.QWEN2_0_5B.numel() == 494_032_768
    names = [n for n, _ in checkpoints.QWEN2_1_5B.tensors()]
    assert "lm_head.weight" not in names
    assert len(names) == 2 + 28 * 12
    assert dict(checkpoints.QWEN2_1_5B.tensors())["model.layers.0.self_attn.k_proj.weight"] == (
        256,
        1536,
    )


def test_write_pair_shards_and_indexes_every_tensor(tmp_path: Path) -> None:
    from safetensors import safe_open

    total = checkpoints.write_pair(TINY, tmp_path / "b", tmp_path / "d", shard_bytes=4096)
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert set(index["weight_map"]) == {n for n, _ in TINY.tensors()}
    assert index["metadata"]["total_size"] == total == 2 * TINY.numel()
    files = checkpoints.checkpoint_files(tmp_path / "b")
    assert [f.name for f in files if f.suffix == ".safetensors"] == shards
    name = "model.layers.1.mlp.up_proj.weight"
    with (
        safe_open(str(tmp_path / "b" / index["weight_map"][name]), "pt") as fb,
        safe_open(str(tmp_path / "d" / index["weight_map"][name]), "pt") as fd,
    ):
        a, b = fb.get_tensor(name), fd.get_tensor(name)
    assert a.dtype == torch.bfloat16 and a.shape == (24, 16)
    rel = float((b.float() - a.float()).norm() / a.float().norm())
    assert 1e-3 < rel < 0.1  # a descendant: close to the base, not equal


@pytest.mark.slow
def test_transformers_loads_the_synthetic_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    checkpoints.write_pair(TINY, tmp_path / "b", tmp_path / "d", shard_bytes=4096)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert set(params) == {n for n, _ in TINY.tensors()}  # tied: lm_head shares embed_tokens
    assert params["model.norm.weight"].dtype == torch.bfloat16


def test_call_counter_counts_each_model_call() -> None:
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    counter = CallCounter()
    removers = [counter.attach("a", a), counter.attach("b", b)]
    x = torch.zeros(1, 2)
    a(x), a(x), b(x)
    assert counter.calls == {"a": 2, "b": 1}
    assert counter.total == 3
    for remove in removers:
        remove()
    a(x)
    assert counter.total == 3
