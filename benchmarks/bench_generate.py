"""generate: trace generation at batch 1 vs batch N, side by side in one run (issue 19.7).

CPU case (always): the whole ``reasondiff-traces`` command path -- ``generate.main``:
model and tokenizer load, prompts, generation, the appended and rewritten output file --
on the toy base, the same problems at ``--batch-size 1`` and ``--batch-size 16``, in this
process (interpreter start-up and imports, the same for both, are left out). Reported:
generated tokens/s of each, their ratio (goal >= 3), how many traces have identical ids,
and what the study's trace generation (2 sets x 50 traces x 4,096 tokens) would take at
each rate on this model and machine.

GPU case (only where CUDA is available): a random Qwen2 of the 1.5B shape in bf16,
32 prompts x 1,024 new tokens through the transformers backend at batch 32, against
batch 1 on 4 of the prompts (tokens/s is per-token work, so a subset measures it);
goal >= 20. bf16 batched ids may differ from batch 1 (see reasondiff.decode), so the
identical count is reported, not required.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from benchmarks.harness import Result, print_table

NAME = "generate"
STUDY_TOKENS = 2 * 50 * 4096


def _hours(tokens_per_s: float) -> str:
    return f"{STUDY_TOKENS / tokens_per_s / 3600:.1f} h" if tokens_per_s > 0 else "n/a"


def _cpu_case(quick: bool) -> Result:
    from reasondiff import generate
    from reasondiff.fixtures.toy import ensure_toy_model

    n, new, batch = (16, 32, 16) if quick else (16, 128, 16)
    with tempfile.TemporaryDirectory(prefix="rd-bench-gen-") as tmp:
        root = Path(tmp)
        toy = ensure_toy_model(root / "toy", "base")
        problems = root / "p.jsonl"
        rows = [
            {"id": f"q{i:02d}", "problem": f"What is {i} + {3 * i}? Step {i}."} for i in range(n)
        ]
        problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tok = generate.load_tokenizer(str(toy))
        prompt = sum(len(generate.build_prompt_ids(tok, r["problem"])) for r in rows)
        runs: dict[int, tuple[float, int, list[list[int]]]] = {}
        for b in (1, batch):
            out = root / str(b) / "set.jsonl"
            argv = ["--model", str(toy), "--problems", str(problems), "--device", "cpu"]
            argv += ["--max-new-tokens", str(new), "--batch-size", str(b), "--out", str(out)]
            start = time.perf_counter()
            if generate.main([*argv, "--quiet"]) != 0:
                raise RuntimeError(f"reasondiff-traces failed at batch size {b}")
            wall = time.perf_counter() - start
            ids = [json.loads(line)["token_ids"] for line in out.read_text().splitlines()[1:]]
            runs[b] = (wall, sum(map(len, ids)) - prompt, ids)
    (w1, t1, ids1), (wn, tn, idsn) = runs[1], runs[batch]
    same = sum(a == b for a, b in zip(ids1, idsn, strict=True))
    r1, rn = t1 / w1, tn / wn
    print_table(
        f"toy base, {n} problems x {new} new tokens, CPU, whole command (generate.main)",
        ["batch", "wall s", "new tokens", "tokens/s", "study 2x50x4096 at this rate"],
        [[1, w1, t1, r1, _hours(r1)], [batch, wn, tn, rn, _hours(rn)]],
    )
    print(f"identical ids: {same} of {n} traces")
    return Result(f"{NAME}_cpu_toy_b{batch}", rn / r1, ">=", 3.0, reason=f"identical {same}/{n}")


def _gpu_case() -> Result:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from reasondiff.decode import Decoding, TransformersBackend

    name = f"{NAME}_gpu_1.5b_b32"
    if not torch.cuda.is_available():
        return Result(
            name, None, ">=", 20.0, reason="no CUDA device on this machine", scope="not measured"
        )
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 151936, (80 + i,), generator=gen).tolist() for i in range(32)]
    backend = TransformersBackend(model, decoding=Decoding(1024), eos=[], pad=0)
    rates, outs = {}, {}
    for b, subset in ((1, prompts[:4]), (32, prompts)):
        torch.cuda.synchronize()
        start = time.perf_counter()
        got = [backend.generate([p])[0] for p in subset] if b == 1 else backend.generate(subset)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        rates[b] = sum(map(len, got)) / wall
        outs[b] = got
    same = sum(a == b for a, b in zip(outs[1], outs[32][:4], strict=True))
    print_table(
        "random Qwen2 1.5B shape, bf16, CUDA, 1,024 new tokens",
        ["batch", "prompts", "tokens/s", "study 2x50x4096 at this rate"],
        [[1, 4, rates[1], _hours(rates[1])], [32, 32, rates[32], _hours(rates[32])]],
    )
    print(f"identical ids (bf16, first 4 prompts): {same} of 4")
    return Result(name, rates[32] / rates[1], ">=", 20.0, reason=f"identical {same}/4 (bf16)")


def run(*, quick: bool) -> list[Result]:
    return [_cpu_case(quick), _gpu_case()]


if __name__ == "__main__":
    import sys

    for r in run(quick="--quick" in sys.argv):
        print(r.line())
