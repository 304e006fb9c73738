"""Tiny random Qwen2 checkpoints for benchmarks that need real models (offline, seconds).

A base and k descendants (base + seeded weight noise) saved with ``save_pretrained`` in a
directory the caller owns. Not the toy family of ``reasondiff.fixtures``: the baseline
side of a benchmark must not depend on project code.
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_config(*, layers: int = 4, hidden: int = 64, vocab: int = 512) -> object:
    """A small Qwen2 config (GQA, q/k/v biases, tied embeddings like Qwen2-0.5B/1.5B)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )


def build_family(
    root: Path, *, descendants: int, seed: int = 0, layers: int = 4
) -> tuple[Path, list[Path]]:
    """Write ``root/base`` and ``root/desc-<j>``; returns their directories."""
    from transformers import Qwen2ForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_config(layers=layers)).eval()  # type: ignore[arg-type]
    base_dir = root / "base"
    model.save_pretrained(base_dir)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    out: list[Path] = []
    gen = torch.Generator().manual_seed(seed + 1)
    for j in range(descendants):
        with torch.no_grad():
            for name, param in model.named_parameters():
                noise = torch.randn(param.shape, generator=gen) * 0.01 * (j + 1)
                param.copy_(original[name] + noise)
        d = root / f"desc-{j}"
        model.save_pretrained(d)
        out.append(d)
    return base_dir, out


def load(path: Path) -> torch.nn.Module:
    """Load a checkpoint in float32 eval mode on CPU."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def random_traces(count: int, *, length: int, vocab: int = 512, seed: int = 0) -> list[list[int]]:
    """``count`` seeded random token-id sequences of ``length`` ids."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(count)]
