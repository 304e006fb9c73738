"""Batched generation equals batch 1 token for token in float32 (issue 19.1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reasondiff import generate
from reasondiff.decode import Decoding, TransformersBackend, auto_batch_size, cut_after_eos
from reasondiff.fixtures.toy import ensure_toy_model
from reasondiff.fixtures.toy_traces import build_toy_tokenizer

PROBLEMS = [
    {"id": "short", "problem": "2 + 2?"},
    {"id": "long", "problem": "A train leaves at 3 pm going 60 miles per hour. When has it gone 150 miles?"},
    {"id": "mid", "problem": "What is 12 * 12 - 44?"},
    {"id": "mid2", "problem": "Compute 7 + 8 + 9 + 10."},
]  # fmt: skip


def test_toy_base_batched_ids_equal_batch_one(tmp_path: Path) -> None:
    toy = ensure_toy_model(tmp_path / "toy", "base")
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps(r) + "\n" for r in PROBLEMS))
    tok = build_toy_tokenizer()
    lengths = {len(generate.build_prompt_ids(tok, p["problem"])) for p in PROBLEMS}
    assert len(lengths) == len(PROBLEMS)  # every row of the batch is padded differently
    files = {}
    for batch in ("1", "4"):
        out = tmp_path / batch / "set.jsonl"
        argv = ["--model", str(toy), "--problems", str(problems), "--max-new-tokens", "24"]
        argv += ["--device", "cpu", "--batch-size", batch, "--out", str(out), "--quiet"]
        assert generate.main(argv) == 0
        lines = out.read_text().splitlines()
        assert json.loads(lines[0])["batch_size"] == int(batch)
        files[batch] = [json.loads(line)["token_ids"] for line in lines[1:]]
    assert files["4"] == files["1"]
    assert len({len(ids) for ids in files["1"]}) > 1


def _random_qwen2_100m() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg).eval()


@pytest.mark.slow
def test_random_qwen2_100m_batched_ids_equal_batch_one() -> None:
    model = _random_qwen2_100m()
    params = sum(p.numel() for p in model.parameters())
    assert 90e6 < params < 110e6
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 32000, (n,), generator=gen).tolist() for n in (5, 23, 11, 17)]
    # a frequent id as EOS, so some rows stop early and are padded while others run on
    backend = TransformersBackend(model, decoding=Decoding(10), eos=[0], pad=0)
    one = [backend.generate([p])[0] for p in prompts]
    counted: list[int] = []
    batched = backend.generate(prompts, counted.append)
    assert batched == one
    assert sum(counted) == sum(len(c) for c in one)  # finished rows are not counted


def test_cut_after_eos_keeps_the_first_eos() -> None:
    assert cut_after_eos([5, 6, 2, 0, 0], {2}) == (5, 6, 2)
    assert cut_after_eos([5, 6, 7], {2}) == (5, 6, 7)


class _Cfg:
    num_hidden_layers = 28
    hidden_size = 3584
    num_attention_heads = 28
    num_key_value_heads = 4
    vocab_size = 152064


def test_auto_batch_size() -> None:
    def auto(device: str, n: int = 50, free: int = 40 * 2**30, new: int = 4096) -> int:
        return auto_batch_size(
            device=device, n_prompts=n, longest_prompt=200, max_new_tokens=new,
            config=_Cfg(), dtype_bytes=2, free_bytes=free,
        )  # fmt: skip

    assert auto("cpu") == 8 and auto("cpu", n=3) == 3
    # 7B shape, bf16: KV cache 2 x 28 x 4 x 128 x 2 B = 56 KiB per token, 4296 tokens each
    per_seq = 2 * 28 * 4 * 128 * 2 * 4296 + 4 * 3584 * 2 * 4296 + 8 * 152064
    assert auto("cuda") == min(50, int(40 * 2**30 * 0.7 // per_seq)) == 50  # 81 fit
    assert auto("cuda", free=10 * 2**30) == int(10 * 2**30 * 0.7 // per_seq) == 20
    assert auto("cuda", n=100, free=10 * 2**30, new=1024) > 20
    assert auto("cuda", free=2**40) == 50 and auto("cuda", free=1) == 1
    assert auto("cuda", n=200, free=2**40) == 64
