"""Batched generation equals batch 1 token for token in float32 (issue 19.1)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_toy_model(tmp_path_factory.mktemp("batched-toy"), "base")


def _early_eos(conts: Sequence[Sequence[int]], row: int, new: int) -> int:
    """An id that ``row``'s continuation generates mid-way (first at step 2 .. new - 3) and
    no other row generates before that step: with it as EOS, ``row`` stops early."""
    for k in range(max(2, new // 3), new - 2):
        tok = conts[row][k]
        if tok in conts[row][:k]:
            continue
        if all(tok not in c[: k + 1] for i, c in enumerate(conts) if i != row):
            return int(tok)
    raise AssertionError(f"no mid-way id of row {row} stops it early: {conts}")


def _assert_cut_at_first_eos(conts: Sequence[Sequence[int]], eos: set[int], new: int) -> None:
    """Every continuation ends at its first EOS (nothing generated after it) or runs to
    ``new`` tokens without one."""
    for c in conts:
        assert not eos & set(c[:-1]), f"tokens after EOS: {c}"
        assert c[-1] in eos or len(c) == new, c


def test_toy_base_batched_ids_equal_batch_one(toy_base: Path, tmp_path: Path) -> None:
    """Through the CLI, one row of the batch stopping early at its EOS: batch 4 writes the
    same ids as batch 1, and that row is shorter (not padded, not continued)."""
    toy = toy_base
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps(r) + "\n" for r in PROBLEMS))
    tok = build_toy_tokenizer()
    prompts = [generate.build_prompt_ids(tok, p["problem"]) for p in PROBLEMS]
    assert len({len(p) for p in prompts}) == len(PROBLEMS)  # every row padded differently
    new = 24

    def run(model: Path, batch: str) -> list[tuple[int, ...]]:
        """The continuations (ids after the prompt) the CLI writes, in problem order."""
        out = tmp_path / model.name / batch / "set.jsonl"
        argv = ["--model", str(model), "--problems", str(problems), "--max-new-tokens", str(new)]
        argv += ["--device", "cpu", "--batch-size", batch, "--out", str(out), "--quiet"]
        assert generate.main(argv) == 0
        lines = out.read_text().splitlines()
        assert json.loads(lines[0])["batch_size"] == int(batch)
        ids = [json.loads(line)["token_ids"] for line in lines[1:]]
        assert [i[: len(p)] for i, p in zip(ids, prompts, strict=True)] == prompts
        return [tuple(i[len(p) :]) for i, p in zip(ids, prompts, strict=True)]

    free = run(toy, "1")
    assert [len(c) for c in free] == [new] * len(PROBLEMS)  # the toy's own EOS never comes
    # the same weights with an extra EOS id that the longest prompt's row generates mid-way
    row = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop = _early_eos(free, row, new)
    early = tmp_path / "early"
    shutil.copytree(toy, early)
    gen_config = json.loads((early / "generation_config.json").read_text())
    eos = {int(gen_config["eos_token_id"]), stop}
    gen_config["eos_token_id"] = sorted(eos)
    (early / "generation_config.json").write_text(json.dumps(gen_config))

    one, four = run(early, "1"), run(early, "4")
    assert four == one  # token for token, the early row included
    assert one == [cut_after_eos(c, eos) for c in free]  # greedy: EOS only cuts
    lengths = [len(c) for c in one]
    assert one[row][-1] == stop and lengths[row] < new
    assert all(lengths[row] < n for i, n in enumerate(lengths) if i != row), lengths
    _assert_cut_at_first_eos(four, eos, new)


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


class _Steps:
    """Counts the model's forward calls (one per generated token: prefill, then decode)
    and keeps what ``generate`` returned (the padded batch)."""

    def __init__(self, model: Any) -> None:
        self.forwards = 0
        self.raw: list[list[int]] = []
        model.register_forward_hook(self._hook)
        real = model.generate

        def recording(*args: Any, **kwargs: Any) -> Any:
            out = real(*args, **kwargs)
            self.raw = out.tolist()
            return out

        model.generate = recording

    def _hook(self, *_: Any) -> None:
        self.forwards += 1


@pytest.mark.slow
def test_random_qwen2_100m_batched_ids_equal_batch_one() -> None:
    model = _random_qwen2_100m()
    params = sum(p.numel() for p in model.parameters())
    assert 90e6 < params < 110e6
    gen = torch.Generator().manual_seed(1)
    lengths = (5, 23, 11, 17)
    prompts = [torch.randint(1, 32000, (n,), generator=gen).tolist() for n in lengths]
    new, pad = 8, 0
    free = TransformersBackend(model, decoding=Decoding(new), eos=[pad], pad=pad)
    ref = [free.generate([p])[0] for p in prompts]
    assert [len(c) for c in ref] == [new] * len(prompts)  # id 0 never comes
    # an id the shortest prompt's row generates mid-way becomes EOS: that row stops early
    # in both modes and is padded while the others run on
    row = 0
    stop = _early_eos(ref, row, new)
    eos = {pad, stop}
    backend = TransformersBackend(model, decoding=Decoding(new), eos=sorted(eos), pad=pad)
    one = [backend.generate([p])[0] for p in prompts]
    assert one == [cut_after_eos(c, eos) for c in ref]
    assert one[row][-1] == stop
    assert all(len(one[row]) < len(c) for i, c in enumerate(one) if i != row)
    steps = _Steps(model)
    counted: list[int] = []
    batched = backend.generate(prompts, counted.append)
    assert batched == one  # token for token
    _assert_cut_at_first_eos(batched, eos, new)
    # the finished row got only padding after its EOS while the batch ran on
    width = max(lengths)
    raw = steps.raw[row][width:]
    assert raw[: len(one[row])] == list(one[row])
    assert set(raw[len(one[row]) :]) == {pad} and len(raw) == new
    assert sum(counted) == sum(len(c) for c in one)  # finished rows are not counted
    assert len(counted) == steps.forwards == max(len(c) for c in one)


def test_a_batch_whose_rows_all_finish_early_stops(toy_base: Path) -> None:
    """When every row has hit EOS, generation ends: no step runs to max_new_tokens."""
    model, tok = generate.load_generator(str(toy_base), device="cpu", dtype=torch.float32)
    prompts = [generate.build_prompt_ids(tok, p["problem"]) for p in PROBLEMS]
    new = 40
    eos_id = int(tok.eos_token_id)
    free = TransformersBackend(model, decoding=Decoding(new), eos=[eos_id], pad=0)
    ref = [free.generate([p])[0] for p in prompts]
    assert [len(c) for c in ref] == [new] * len(prompts)  # the toy's EOS never comes
    # each row's first id that is new from step 2 on becomes an EOS id: every row stops
    # before max_new_tokens, at different steps
    eos = {eos_id}
    for c in ref:
        firsts = [t for k, t in enumerate(c) if k >= 2 and t not in c[:k]]
        assert firsts, f"the toy repeats one id from step 2 on: {c}"
        eos.add(firsts[0])
    want = [cut_after_eos(c, eos) for c in ref]
    lengths = [len(c) for c in want]
    assert max(lengths) < new and len(set(lengths)) > 1, lengths
    backend = TransformersBackend(model, decoding=Decoding(new), eos=sorted(eos), pad=0)
    steps = _Steps(model)
    counted: list[int] = []
    batched = backend.generate(prompts, counted.append)
    assert batched == want  # batch 1's ids, each cut at its first EOS
    # one forward per step, and the steps end with the longest row
    assert steps.forwards == len(counted) == max(len(c) for c in want)
    assert sum(counted) == sum(len(c) for c in want)


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
