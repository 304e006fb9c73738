"""Tiny checkpoints for tests, built in seconds without fixtures/toy.py.

Import as ``from _checkpoints import ...`` (pytest prepends ``tests/`` to sys.path).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 128,
}


def make_qwen2(path: Path, *, seed: int = 0, tie: bool = False, **overrides: int) -> Path:
    """A random tiny Qwen2ForCausalLM saved as safetensors (float32)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**{**TINY, **overrides}, tie_word_embeddings=tie)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(path)
    return path


def make_bert(path: Path, *, seed: int = 0) -> Path:
    """A random tiny BertModel (encoder, no LM head) saved as safetensors."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
    )
    BertModel(cfg).save_pretrained(path)
    return path


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensors(path: Path, edits: dict[str, torch.Tensor | None]) -> None:
    """Replace (or, with None, delete) tensors of a single-file checkpoint in place."""
    f = path / "model.safetensors"
    tensors = load_file(f)
    for name, value in edits.items():
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value.contiguous()
    save_file(tensors, f, metadata={"format": "pt"})


def shard_checkpoint(src: Path, dst: Path, *, shards: int = 3) -> Path:
    """Copy ``src`` into ``dst`` with its tensors split over ``shards`` files + index."""
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, dst / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def install_in_hub_cache(
    src: Path, cache: Path, repo_id: str, *, commit: str, refs: tuple[str, ...] = ("main",)
) -> Path:
    """Lay ``src`` out as huggingface_hub does: blobs by sha256, snapshot symlinks, refs.

    ``models--org--name/blobs/<sha256>``, ``snapshots/<commit>/<file> -> ../../blobs/<sha>``
    and ``refs/<ref>`` containing the commit hash. Returns the snapshot directory.
    """
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs = repo / "blobs"
    snap = repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = blobs / digest
        if not blob.exists():
            shutil.copy(f, blob)
        link = snap / f.name
        os.symlink(os.path.relpath(blob, snap), link)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap
