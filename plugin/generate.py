"""Write a reasoning-trace set with a real (or toy) model: ``reasondiff-traces``.

Usage::

    python -m reasondiff.generate --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B \\
        --problems math500.jsonl --limit 50 --out traces.jsonl

The prompt follows METHODS §9: the problem, then "Please reason step by step, and put
your final answer within \\boxed{}." as the user turn of the model's chat template
(``add_generation_prompt=True``). A tokenizer without a chat template gets the plain
fallback ``FALLBACK_TEMPLATE`` (BOS, "Problem: ...", the instruction, "Solution:").
Thinking is forced by appending ``<think>`` and a newline -- as the tokenizer's own
``<think>`` id when it has one -- unless the template already ends with ``<think>``.
Decoding is greedy by default (deterministic). Each stored trace is the prompt plus the
continuation: the exact token ids the compared models will see, with their decoded
text (special tokens kept; see ``reasondiff.traces`` for the format).

Not here: scoring answers, batching, sampling strategies beyond greedy / temperature.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelLoadError, ReasondiffError, TraceError
from .traces import (
    MIN_TRACE_TOKENS,
    Trace,
    TraceSet,
    iter_jsonl_objects,
    save_trace_set,
    tokenizer_identity,
)

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
THINK = "<think>"
FALLBACK_TEMPLATE = "{bos}Problem: {problem}\n{instruction}\nSolution:\n"
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Problem:
    """One problem to solve; ``id`` becomes the trace id."""

    id: str
    problem: str


# ---------------------------------------------------------------- problems
def load_problems(path: str | Path, *, limit: int | None = None) -> list[Problem]:
    """The first ``limit`` problems of a JSONL file of ``{"problem": str, "id"?: str|int}``."""
    p = Path(path)
    out: list[Problem] = []
    seen: set[str] = set()
    for where, _, obj in iter_jsonl_objects(p, what="problems"):
        if not isinstance(obj.get("problem"), str) or not obj["problem"].strip():
            raise TraceError(f'{where}: expected an object with a non-empty string "problem"')
        pid = obj.get("id", f"p{len(out):03d}")
        if isinstance(pid, bool) or not isinstance(pid, (str, int)) or str(pid) == "":
            raise TraceError(f'{where}: "id" must be a non-empty string or an integer, got {pid!r}')
        if str(pid) in seen:
            raise TraceError(f"{where}: duplicate problem id {str(pid)!r}")
        seen.add(str(pid))
        out.append(Problem(id=str(pid), problem=obj["problem"]))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise TraceError(f"problems file {p} contains no problems")
    return out


def load_dataset_problems(
    dataset: str, *, split: str = "test", field: str = "problem", limit: int | None = None
) -> list[Problem]:
    """Problems from a Hugging Face dataset (needs the optional ``datasets`` package)."""
    if importlib.util.find_spec("datasets") is None:
        raise ReasondiffError(
            f"--dataset {dataset} needs the optional 'datasets' package, which is not installed: "
            "pip install 'reasondiff[datasets]', or pass --problems FILE.jsonl instead"
        )
    datasets: Any = importlib.import_module("datasets")
    try:
        rows = datasets.load_dataset(dataset, split=split)
    except Exception as exc:  # network, unknown id, unknown split: all end here
        raise ReasondiffError(f"cannot load dataset {dataset!r} split {split!r}: {exc}") from exc
    if field not in rows.column_names:
        raise ReasondiffError(
            f"dataset {dataset!r} has no field {field!r}; fields: {', '.join(rows.column_names)}"
        )
    n = len(rows) if limit is None else min(limit, len(rows))
    out = []
    for i in range(n):
        row = rows[i]
        pid = row.get("unique_id") or row.get("id") or f"p{i:03d}"
        out.append(Problem(id=str(pid), problem=str(row[field])))
    return out


# ---------------------------------------------------------------- prompt
def _think_token_id(tokenizer: Any) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(THINK)
    if not isinstance(tid, int) or tid == tokenizer.unk_token_id:
        return None
    return tid


def build_prompt_ids(tokenizer: Any, problem: str) -> list[int]:
    """Token ids of the METHODS §9 prompt, ending in ``<think>`` + newline."""
    content = f"{problem.strip()}\n{INSTRUCTION}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = FALLBACK_TEMPLATE.format(
            bos=tokenizer.bos_token or "", problem=problem.strip(), instruction=INSTRUCTION
        )

    def enc(s: str) -> list[int]:
        return [int(i) for i in tokenizer(s, add_special_tokens=False)["input_ids"]]

    if text.rstrip().endswith(THINK):  # the template already opens the thinking block
        return enc(text)
    think_id = _think_token_id(tokenizer)
    return enc(text) + ([think_id] if think_id is not None else enc(THINK)) + enc("\n")


# ---------------------------------------------------------------- generation
class _TokenCounter:
    """A ``generate`` streamer that reports each new token (the first put is the prompt)."""

    def __init__(self, on_token: Callable[[int], None]) -> None:
        self.on_token = on_token
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.on_token(int(value.numel()))

    def end(self) -> None:
        pass


def generate_trace(
    model: Any,
    tokenizer: Any,
    problem: Problem,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    on_token: Callable[[int], None] | None = None,
) -> Trace:
    """Prompt + continuation of one problem as a :class:`Trace` (greedy when temperature 0)."""
    import torch
    from transformers import GenerationConfig

    prompt = build_prompt_ids(tokenizer, problem.problem)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = gen_eos if gen_eos is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    sample = temperature > 0
    # ids past the tokenizer (embedding rows padded to a multiple of 64) cannot be decoded
    vocab_size = int(getattr(model.config, "vocab_size", 0) or 0)
    unused = list(range(len(tokenizer), vocab_size))
    config = GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        eos_token_id=eos,
        pad_token_id=pad,
        suppress_tokens=unused or None,
        **({"temperature": temperature, "top_p": 1.0, "top_k": 0} if sample else {}),
    )
    streamer = _TokenCounter(on_token) if on_token is not None else None
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=config,
            streamer=streamer,
        )
    token_ids = tuple(int(t) for t in out[0].tolist())
    text = tokenizer.decode(
        list(token_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    return Trace(id=problem.id, text=text, token_ids=token_ids)


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when available, else cpu."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ReasondiffError("--device cuda was given but torch sees no CUDA device")
    return name


def resolve_dtype(name: str, device: str) -> Any:
    """``auto``: the checkpoint's own dtype on GPU (transformers' ``dtype="auto"``, as
    :func:`reasondiff.dtypes.resolve_dtype` for the suite), float32 on CPU (bf16 matmuls
    are ~40x slower there)."""
    import torch

    if name == "auto":
        return "auto" if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_generator(model: str, *, device: str, dtype: Any) -> tuple[Any, Any]:
    """(model in eval mode on ``device``, tokenizer) from a hub id or a local dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok: Any = AutoTokenizer.from_pretrained(model)
        lm: Any = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot load model {model!r} (a local directory or a hub id reachable from here): {exc}"
        ) from exc
    return lm.to(device).eval(), tok


def _advancer(progress: Any, task: Any) -> Callable[[int], None]:
    def advance(n: int) -> None:
        progress.advance(task, n)

    return advance


def generate_trace_set(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    name: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    quiet: bool = False,
) -> TraceSet:
    """Generate one trace per problem, with a rich progress bar per problem (on stderr)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True, quiet=quiet)
    traces: list[Trace] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=quiet) as progress:
        overall = progress.add_task("problems", total=len(problems))
        for prob in problems:
            task = progress.add_task(f"  {prob.id} tokens", total=max_new_tokens)
            trace = generate_trace(
                model,
                tokenizer,
                prob,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                on_token=_advancer(progress, task),
            )
            new = len(trace.token_ids) - len(build_prompt_ids(tokenizer, prob.problem))
            progress.remove_task(task)
            progress.console.print(f"{prob.id}: {len(trace.token_ids)} tokens ({new} generated)")
            progress.advance(overall)
            traces.append(trace)
    short = [t.id for t in traces if len(t.token_ids) < MIN_TRACE_TOKENS]
    if short:
        raise TraceError(f"traces {short} are shorter than {MIN_TRACE_TOKENS} tokens")
    return TraceSet(name=name, traces=tuple(traces), tokenizer=tokenizer_identity(tokenizer))


# ---------------------------------------------------------------- CLI
def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="reasondiff-traces",
        description="Generate reasoning traces (prompt + greedy continuation) as a reasondiff trace set.",
    )
    ap.add_argument(
        "--model", required=True, help="hub id (org/name) or local checkpoint directory"
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--problems", type=Path, help='JSONL file of {"problem": ..., "id": ...}')
    src.add_argument("--dataset", help="Hugging Face dataset id (needs the 'datasets' extra)")
    ap.add_argument("--split", default="test", help="dataset split (default: test)")
    ap.add_argument("--field", default="problem", help="dataset field with the problem text")
    ap.add_argument("--limit", type=_positive, default=50, help="first N problems (default: 50)")
    ap.add_argument("--max-new-tokens", type=_positive, default=4096, help="default: 4096")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    ap.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="auto: bf16 on GPU, fp32 on CPU"
    )
    ap.add_argument("--name", help="trace set name (default: the output file's stem)")
    ap.add_argument("--out", type=Path, required=True, help="output JSONL trace set")
    ap.add_argument("--quiet", action="store_true", help="no progress display")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (2 on a reasondiff error)."""
    args = build_parser().parse_args(argv)
    try:
        if args.problems is not None:
            problems = load_problems(args.problems, limit=args.limit)
        else:
            problems = load_dataset_problems(
                args.dataset, split=args.split, field=args.field, limit=args.limit
            )
        device = resolve_device(args.device)
        model, tokenizer = load_generator(
            args.model, device=device, dtype=resolve_dtype(args.dtype, device)
        )
        trace_set = generate_trace_set(
            model,
            tokenizer,
            problems,
            name=args.name or args.out.stem,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            quiet=args.quiet,
        )
        save_trace_set(args.out, trace_set)
    except ReasondiffError as exc:
        print(f"reasondiff-traces: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {len(trace_set)} traces to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
