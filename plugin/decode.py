"""Decode continuations of prompt-id lists in batches: transformers (default) or vLLM.

A backend takes a batch of prompts (token ids) and returns each continuation's ids; it
knows nothing of problems, files or progress bars (``reasondiff.generate`` does those).

transformers: the prompts of a batch are left-padded with an attention mask (so every
row's last prompt token sits at the same position and its position ids skip the pads),
one ``generate`` call per batch; a row that hits EOS early is padded until the longest
row finishes (``generate`` cannot drop rows from a running batch), and the batch ends
with its longest row: once every row has hit EOS no further step runs. Each continuation
is cut after its first EOS, which is exactly what ``generate`` returns at batch 1. In
float32 the ids equal batch 1's token for token (tests/test_generate_batched.py); in
bf16 on a GPU batched kernels may round differently and the ids can differ -- the trace
stored is what was generated, and the comparison teacher-forces those ids.

vLLM (optional extra ``vllm``): ``LLM.generate`` with ``{"prompt_token_ids": ...}``
prompts and ``SamplingParams(temperature=0, max_tokens=...)``; a continuation is
``RequestOutput.outputs[0].token_ids``. vLLM schedules its own batches; ``batch_size``
only sets how many traces are in flight between two writes of the output file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import ReasondiffError

#: Auto batch size on CPU (measured: 3.8x at 8 prompts for a 100M Qwen2 on 2 cores).
CPU_BATCH = 8
#: Upper bound of the automatic CUDA batch size.
MAX_AUTO_BATCH = 64
#: Share of free GPU memory the automatic batch size may plan for.
GPU_MEMORY_SHARE = 0.7

OnTokens = Callable[[int], None]


@dataclass(frozen=True)
class Decoding:
    """Decoding settings; recorded in the trace set's header and checked on resume."""

    max_new_tokens: int
    temperature: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def as_header(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "strategy": "greedy" if self.greedy else "sample",
            "max_new_tokens": self.max_new_tokens,
        }
        if not self.greedy:
            out.update(temperature=self.temperature, top_p=1.0, top_k=0)
        return out


class Backend(Protocol):
    name: str

    def generate(
        self, prompts: Sequence[Sequence[int]], on_tokens: OnTokens | None = None
    ) -> list[tuple[int, ...]]:
        """One continuation (token ids after the prompt) per prompt, in order."""
        ...


# ---------------------------------------------------------------- batch size
def auto_batch_size(
    *,
    device: str,
    n_prompts: int,
    longest_prompt: int,
    max_new_tokens: int,
    config: Any,
    dtype_bytes: int,
    free_bytes: int | None = None,
) -> int:
    """``--batch-size auto``: CPU 8; CUDA as many sequences as their KV cache (longest
    prompt + ``max_new_tokens`` each) and logits fit in 70% of the free memory."""
    if n_prompts < 1:
        return 1
    if not device.startswith("cuda"):
        return min(CPU_BATCH, n_prompts)
    if free_bytes is None:
        import torch

        free_bytes, _ = torch.cuda.mem_get_info(torch.device(device))
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 1)
    kv_heads = int(getattr(config, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(config, "head_dim", 0) or hidden // heads)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    tokens = longest_prompt + max_new_tokens
    kv = 2 * layers * kv_heads * head_dim * dtype_bytes * tokens
    # prefill activations (a few hidden-size rows per token) and float32 logits per step
    per_seq = kv + 4 * hidden * dtype_bytes * tokens + 2 * 4 * vocab
    fit = int(free_bytes * GPU_MEMORY_SHARE // max(per_seq, 1))
    return max(1, min(n_prompts, MAX_AUTO_BATCH, fit))


# ---------------------------------------------------------------- transformers
class _TokenCounter:
    """A ``generate`` streamer: calls ``on_tokens`` with the rows still running per step
    (the first ``put`` is the prompt batch; finished rows are not counted)."""

    def __init__(self, on_tokens: OnTokens, eos: set[int], rows: int) -> None:
        self.on_tokens = on_tokens
        self.eos = eos
        self.running = [True] * rows
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        tokens = [int(t) for t in value.reshape(-1).tolist()]
        n = 0
        for i, tok in enumerate(tokens[: len(self.running)]):
            if self.running[i]:
                n += 1
                if tok in self.eos:
                    self.running[i] = False
        self.on_tokens(n)

    def end(self) -> None:
        pass


def cut_after_eos(ids: Sequence[int], eos: set[int]) -> tuple[int, ...]:
    """``ids`` up to and including the first EOS (what batch-1 ``generate`` stops at)."""
    for i, tok in enumerate(ids):
        if tok in eos:
            return tuple(int(t) for t in ids[: i + 1])
    return tuple(int(t) for t in ids)


class TransformersBackend:
    """Batched ``model.generate`` with left padding and an attention mask."""

    name = "transformers"

    def __init__(
        self,
        model: Any,
        *,
        decoding: Decoding,
        eos: Sequence[int],
        pad: int,
        suppress: Sequence[int] = (),
    ) -> None:
        self.model = model
        self.decoding = decoding
        self.eos = {int(e) for e in eos}
        self.pad = int(pad)
        self.suppress = list(suppress)

    def generate(
        self, prompts: Sequence[Sequence[int]], on_tokens: OnTokens | None = None
    ) -> list[tuple[int, ...]]:
        import torch
        from transformers import GenerationConfig

        if not prompts:
            return []
        width = max(len(p) for p in prompts)
        ids = [[self.pad] * (width - len(p)) + [int(t) for t in p] for p in prompts]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        device = next(self.model.parameters()).device
        d = self.decoding
        config = GenerationConfig(  # type: ignore[no-untyped-call]
            max_new_tokens=d.max_new_tokens,
            do_sample=not d.greedy,
            eos_token_id=sorted(self.eos) or None,
            pad_token_id=self.pad,
            suppress_tokens=self.suppress or None,
            **({} if d.greedy else {"temperature": d.temperature, "top_p": 1.0, "top_k": 0}),
        )
        streamer = (
            _TokenCounter(on_tokens, self.eos, len(prompts)) if on_tokens is not None else None
        )
        with torch.no_grad():
            out = self.model.generate(
                input_ids=torch.tensor(ids, device=device),
                attention_mask=torch.tensor(mask, device=device),
                generation_config=config,
                streamer=streamer,
            )
        return [cut_after_eos(row[width:].tolist(), self.eos) for row in out]


# ---------------------------------------------------------------- vLLM
def _vllm() -> Any:
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        raise ReasondiffError(
            f"--backend vllm needs the optional 'vllm' package ({exc}): "
            "pip install 'reasondiff[vllm]' on a machine vLLM supports (CUDA), "
            "or use the default --backend transformers"
        ) from exc


class VllmBackend:
    """vLLM's offline ``LLM.generate`` on token-id prompts (verified only where vLLM runs)."""

    name = "vllm"

    def __init__(self, llm: Any, *, decoding: Decoding) -> None:
        self.llm = llm
        self.decoding = decoding
        sampling = _vllm().SamplingParams
        d = decoding
        self.params = (
            sampling(temperature=0, max_tokens=d.max_new_tokens)
            if d.greedy
            else sampling(temperature=d.temperature, top_p=1.0, max_tokens=d.max_new_tokens)
        )

    @classmethod
    def load(cls, path: str, *, dtype: str, decoding: Decoding) -> VllmBackend:
        """``vllm.LLM`` on a local checkpoint directory (``dtype``: auto or a torch name)."""
        llm = _vllm().LLM(model=path, tokenizer=path, dtype=dtype, seed=0)
        return cls(llm, decoding=decoding)

    @property
    def dtype(self) -> str | None:
        """The dtype vLLM chose, where its engine says (None: unknown)."""
        engine = getattr(self.llm, "llm_engine", None)
        got = getattr(getattr(engine, "model_config", None), "dtype", None)
        return None if got is None else str(got).removeprefix("torch.")

    def generate(
        self, prompts: Sequence[Sequence[int]], on_tokens: OnTokens | None = None
    ) -> list[tuple[int, ...]]:
        requests = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        outputs = self.llm.generate(requests, self.params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise ReasondiffError(
                f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts"
            )
        result: list[tuple[int, ...]] = []
        for prompt, out in zip(prompts, outputs, strict=True):
            got = getattr(out, "prompt_token_ids", None)
            if got is not None and [int(t) for t in got] != [int(t) for t in prompt]:
                raise ReasondiffError(
                    "vLLM returned an output for another prompt than the one sent "
                    "(prompt_token_ids differ); outputs must come back in request order"
                )
            ids = tuple(int(t) for t in out.outputs[0].token_ids)
            if on_tokens is not None:
                on_tokens(len(ids))
            result.append(ids)
        return result
