"""Synthetic sharded bf16 checkpoint pairs with the tensor shapes of real Qwen2 models.

The weights are random (base) and base + small noise (descendant); only the shapes, names,
dtype, sharding and the index file match the real checkpoints, which is all that loading
and streaming cost depends on. Written shard by shard so memory stays at one shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Shape:
    """The architecture numbers of a Qwen2 checkpoint that fix its tensor shapes."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int = 151936

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(name, shape) in checkpoint order; embeddings tied, so no lm_head.weight."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        yield "model.embed_tokens.weight", (self.vocab, h)
        for i in range(self.layers):
            p = f"model.layers.{i}."
            yield p + "self_attn.q_proj.weight", (h, h)
            yield p + "self_attn.q_proj.bias", (h,)
            yield p + "self_attn.k_proj.weight", (kv, h)
            yield p + "self_attn.k_proj.bias", (kv,)
            yield p + "self_attn.v_proj.weight", (kv, h)
            yield p + "self_attn.v_proj.bias", (kv,)
            yield p + "self_attn.o_proj.weight", (h, h)
            yield p + "mlp.gate_proj.weight", (self.intermediate, h)
            yield p + "mlp.up_proj.weight", (self.intermediate, h)
            yield p + "mlp.down_proj.weight", (h, self.intermediate)
            yield p + "input_layernorm.weight", (h,)
            yield p + "post_attention_layernorm.weight", (h,)
        yield "model.norm.weight", (h,)

    def numel(self) -> int:
        total = 0
        for _, shape in self.tensors():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def config(self) -> dict[str, object]:
        """A config.json that transformers loads as Qwen2ForCausalLM."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "use_cache": False,
        }


QWEN2_1_5B = Shape("Qwen2-1.5B", hidden=1536, layers=28, intermediate=8960, heads=12, kv_heads=2)
QWEN2_0_5B = Shape("Qwen2-0.5B", hidden=896, layers=24, intermediate=4864, heads=14, kv_heads=2)
#: The study's shapes (METHODS §9): R1-Distill-Qwen-1.5B and Qwen2.5-7B.
R1_DISTILL_1_5B = Shape(
    "R1-Distill-Qwen-1.5B", hidden=1536, layers=28, intermediate=8960, heads=12, kv_heads=2
)
QWEN2_5_7B = Shape(
    "Qwen2.5-7B", hidden=3584, layers=28, intermediate=18944, heads=28, kv_heads=4, vocab=152064
)
#: Seconds-on-a-CPU shape for ``--tiny`` runs of the same code.
TINY = Shape("tiny", hidden=64, layers=4, intermediate=128, heads=4, kv_heads=2, vocab=512)


def write_pair(
    shape: Shape, base_dir: Path, desc_dir: Path, *, shard_bytes: int = 2 * 2**30, seed: int = 0
) -> int:
    """Write base and descendant checkpoints (sharded safetensors + index); returns bytes each."""
    return write_family(
        shape, base_dir, [desc_dir], scales=[1e-2], shard_bytes=shard_bytes, seed=seed
    )


def write_family(
    shape: Shape,
    base_dir: Path,
    desc_dirs: list[Path],
    *,
    scales: list[float],
    shard_bytes: int = 2 * 2**30,
    seed: int = 0,
) -> int:
    """A base and descendants (base + dense noise of relative size ``scales[i]``), sharded
    bf16 safetensors + index; returns bytes per checkpoint.

    Every tensor is non-zero, biases and norms included (real checkpoints have no
    all-zero tensor, and a zero base tensor makes a relative difference infinite).
    """
    from safetensors.torch import save_file

    if len(scales) != len(desc_dirs):
        raise ValueError(f"{len(desc_dirs)} descendants but {len(scales)} scales")
    gen = torch.Generator().manual_seed(seed)
    dirs = [base_dir, *desc_dirs]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(shape.config(), indent=2))
    shards: list[list[str]] = [[]]
    size = 0
    for name, shp in shape.tensors():
        nbytes = 2 * _prod(shp)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    shapes = dict(shape.tensors())
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        parts: list[dict[str, torch.Tensor]] = [{} for _ in dirs]
        for name in names:
            w = torch.randn(shapes[name], generator=gen, dtype=torch.float32).mul_(0.02)
            if name.endswith("norm.weight"):
                w.add_(1.0)
            parts[0][name] = w.to(torch.bfloat16)
            for j, scale in enumerate(scales, start=1):
                noise = torch.randn(shapes[name], generator=gen, dtype=torch.float32)
                parts[j][name] = (w + noise.mul_(0.02 * scale)).to(torch.bfloat16)
            weight_map[name] = fname
            total += parts[0][name].numel() * 2
        for d, part in zip(dirs, parts, strict=True):
            save_file(part, str(d / fname), metadata={"format": "pt"})
        del parts
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for d in dirs:
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def checkpoint_files(path: Path) -> list[Path]:
    """The files a loader reads: weights, index and config."""
    return sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".json"})
