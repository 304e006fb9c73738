"""Write reasoning-trace sets: ``reasondiff-traces``.

Usage::

    reasondiff-traces --group distill7b --out traces/          # the group's recipe
    reasondiff-traces --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B \\
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

Prompts go through the backend (``reasondiff.decode``) in batches of ``--batch-size``,
longest first. The header (with provenance) is written first and every finished trace
is appended and fsync'd, so rerunning the same command resumes where a killed run
stopped; a rerun with other settings is refused instead of mixing two runs in one file.
When all traces are present the file is rewritten (atomically) in problem order.

Not here: scoring answers, sampling strategies beyond greedy / temperature.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .decode import Backend, Decoding, TransformersBackend, VllmBackend, auto_batch_size
from .errors import ModelLoadError, ReasondiffError, TraceError
from .traces import (
    FORMAT_VERSION,
    HEADER_KEY,
    MIN_TRACE_TOKENS,
    Trace,
    TraceAppender,
    TraceSet,
    header_mismatch,
    iter_jsonl_objects,
    read_partial,
    save_trace_set,
    tokenizer_identity,
)

if TYPE_CHECKING:
    from .registry import TraceRecipe

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
THINK = "<think>"
FALLBACK_TEMPLATE = "{bos}Problem: {problem}\n{instruction}\nSolution:\n"
DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("transformers", "vllm")
#: The study's problems (METHODS §9): the first 50 of MATH-500's test split.
STUDY_DATASET = "HuggingFaceH4/MATH-500"
#: Header keys that must match for a rerun to resume (before / after loading the model).
RESUME_KEYS = ("name", "tokenizer", "generator", "recipe", "decoding", "backend")
RESUME_KEYS_LOADED = ("dtype", "batch_size")

Say = Callable[[str], None]


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
    """The first ``limit`` rows of a Hugging Face dataset's ``field``.

    Through the ``datasets`` library when it is installed, else straight from the hub
    with ``huggingface_hub`` (JSON / JSONL data files; ``HF_HUB_OFFLINE=1``: the local
    cache only). Unreachable: an error naming the dataset and ``--problems``.
    """
    try:
        rows = list(_dataset_rows(dataset, split))
    except ReasondiffError:
        raise
    except Exception as exc:  # network, unknown id, unknown split: all end here
        raise ReasondiffError(
            f"cannot load dataset {dataset!r} split {split!r} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); where the dataset cannot be "
            'reached, pass --problems FILE.jsonl (one {"id": ..., "problem": ...} per line) '
            "with its problems instead"
        ) from exc
    out: list[Problem] = []
    for i, row in enumerate(rows):
        if limit is not None and len(out) >= limit:
            break
        if field not in row:
            raise ReasondiffError(
                f"dataset {dataset!r} has no field {field!r}; fields: {', '.join(sorted(row))}"
            )
        pid = row.get("unique_id") or row.get("id") or f"p{i:03d}"
        out.append(Problem(id=str(pid), problem=str(row[field])))
    if not out:
        raise ReasondiffError(f"dataset {dataset!r} split {split!r} has no rows")
    return out


def _dataset_rows(dataset: str, split: str) -> Iterator[dict[str, Any]]:
    if importlib.util.find_spec("datasets") is not None:
        datasets: Any = importlib.import_module("datasets")
        yield from datasets.load_dataset(dataset, split=split)
        return
    from huggingface_hub import snapshot_download

    from .models import hub_cache_dir, hub_offline

    root = Path(
        snapshot_download(
            dataset,
            repo_type="dataset",
            allow_patterns=["*.jsonl", "*.json", "**/*.jsonl", "**/*.json"],
            cache_dir=hub_cache_dir(),
            local_files_only=hub_offline(),
        )
    )
    files = sorted(
        p for p in root.rglob("*") if p.suffix in (".jsonl", ".json") and split in p.stem
    )
    if not files:
        raise ReasondiffError(
            f"dataset {dataset!r} has no JSON / JSONL file for split {split!r} in {root} "
            "(install the 'datasets' extra for other formats, or pass --problems FILE.jsonl)"
        )
    for f in files:
        if f.suffix == ".jsonl":
            for _, _, obj in iter_jsonl_objects(f, what="dataset"):
                yield obj
        else:
            data = json.loads(f.read_text("utf-8"))
            yield from (data if isinstance(data, list) else [])


def problems_hash(problems: Sequence[Problem]) -> str:
    """Content hash of the problems, in order: resuming onto other problems is refused."""
    h = hashlib.sha256()
    for p in problems:
        h.update(f"{p.id}\0{p.problem}\n".encode())
    return "sha256:" + h.hexdigest()[:16]


# ---------------------------------------------------------------- prompt
def _think_token_id(tokenizer: Any) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(THINK)
    if not isinstance(tid, int) or tid == tokenizer.unk_token_id:
        return None
    return tid


def _render(tokenizer: Any, problem: str) -> tuple[str, bool]:
    """(prompt text, whether ``<think>`` + newline must still be appended)."""
    content = f"{problem.strip()}\n{INSTRUCTION}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = FALLBACK_TEMPLATE.format(
            bos=tokenizer.bos_token or "", problem=problem.strip(), instruction=INSTRUCTION
        )
    return str(text), not str(text).rstrip().endswith(THINK)


def build_prompt_ids(tokenizer: Any, problem: str) -> list[int]:
    """Token ids of the METHODS §9 prompt, ending in ``<think>`` + newline."""
    text, append_think = _render(tokenizer, problem)

    def enc(s: str) -> list[int]:
        return [int(i) for i in tokenizer(s, add_special_tokens=False)["input_ids"]]

    if not append_think:  # the template already opens the thinking block
        return enc(text)
    think_id = _think_token_id(tokenizer)
    return enc(text) + ([think_id] if think_id is not None else enc(THINK)) + enc("\n")


def prompt_recipe(tokenizer: Any) -> dict[str, Any]:
    """The prompt half of the provenance: instruction, template hash, forced ``<think>``."""
    template = getattr(tokenizer, "chat_template", None)
    digest = hashlib.sha256(str(template or FALLBACK_TEMPLATE).encode()).hexdigest()[:16]
    _, append_think = _render(tokenizer, "x")
    return {
        "instruction": INSTRUCTION,
        "chat_template": f"sha256:{digest}" if template else f"fallback:sha256:{digest}",
        "forced_think": "appended <think>\\n" if append_think else "opened by the template",
    }


# ---------------------------------------------------------------- models
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


def resolve_model_path(source: str, *, key: str) -> Path:
    """A local checkpoint directory for a hub id, a directory or ``toy:<recipe>``."""
    from .cache import default_cache_dir
    from .diskcheck import toy_root
    from .models import resolve_source
    from .registry import ModelSpec

    try:
        spec = ModelSpec(key=key, source=source)
        return resolve_source(spec, toy_root=toy_root(default_cache_dir()))
    except ModelLoadError as exc:
        raise ModelLoadError(f"cannot load model {source!r}: {exc}") from exc


def load_generator(model: str, *, device: str, dtype: Any) -> tuple[Any, Any]:
    """(model in eval mode on ``device``, tokenizer) from a local dir (or a hub id)."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model)
    try:
        lm: Any = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot load model {model!r} (a local directory or a hub id reachable from here): {exc}"
        ) from exc
    return lm.to(device).eval(), tok


def load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except OSError as exc:
        raise ModelLoadError(f"cannot load the tokenizer of model {model!r}: {exc}") from exc


def transformers_backend(model: Any, tokenizer: Any, decoding: Decoding) -> TransformersBackend:
    """The default backend for a loaded model: its EOS, a pad id, undecodable ids suppressed."""
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = gen_eos if gen_eos is not None else tokenizer.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    # ids past the tokenizer (embedding rows padded to a multiple of 64) cannot be decoded
    vocab_size = int(getattr(model.config, "vocab_size", 0) or 0)
    unused = list(range(len(tokenizer), vocab_size))
    return TransformersBackend(model, decoding=decoding, eos=eos_ids, pad=pad, suppress=unused)


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
    backend = transformers_backend(model, tokenizer, Decoding(max_new_tokens, temperature))
    prompt = build_prompt_ids(tokenizer, problem.problem)
    (cont,) = backend.generate([prompt], on_token)
    return _trace(tokenizer, problem.id, tuple(prompt) + cont)


def _trace(tokenizer: Any, trace_id: str, ids: tuple[int, ...]) -> Trace:
    if len(ids) < MIN_TRACE_TOKENS:
        raise TraceError(f"trace {trace_id!r} is shorter than {MIN_TRACE_TOKENS} tokens")
    text = tokenizer.decode(
        list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    return Trace(id=trace_id, text=text, token_ids=ids)


# ---------------------------------------------------------------- progress
class _Progress:
    """One bar over the problems (tokens/s, ETA) and one line per finished trace; plain
    lines only where ``reasondiff.progress`` draws no live bar (CI, non-TTY, xdist)."""

    def __init__(self, total: int, done: int, *, label: str, quiet: bool) -> None:
        from .progress import live_bar_wanted

        self.total, self.done_at_start, self.label, self.quiet = total, done, label, quiet
        self.done, self.tokens = done, 0
        self.started = time.perf_counter()
        self._bar: Any = None
        self._task: Any = None
        if not quiet and live_bar_wanted(None, sys.stderr):
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} tok/s  ETA {task.fields[eta]}", markup=False),
                console=Console(stderr=True, markup=False, highlight=False),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(label, total=total, completed=done, rate="-", eta="-")

    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.started, 1e-9)

    def eta(self) -> str:
        made = self.done - self.done_at_start
        if made == 0:
            return "-"
        per = (time.perf_counter() - self.started) / made
        secs = int(per * (self.total - self.done))
        return f"{secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"

    def on_tokens(self, n: int) -> None:
        self.tokens += n
        if self._bar is not None:
            self._bar.update(self._task, rate=f"{self.rate():.1f}", eta=self.eta())

    def finished(self, trace: Trace, new: int) -> None:
        self.done += 1
        line = f"{self.label} {trace.id}: {len(trace)} tokens ({new} generated)"
        if self._bar is not None:  # redrawn now, not at the next 10 Hz tick
            self._bar.update(
                self._task, advance=1, rate=f"{self.rate():.1f}", eta=self.eta(), refresh=True
            )
            self._bar.console.print(line)
        elif not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


@contextmanager
def _progress(total: int, done: int, *, label: str, quiet: bool) -> Iterator[_Progress]:
    bar = _Progress(total, done, label=label, quiet=quiet)
    try:
        yield bar
    finally:
        bar.close()


# ---------------------------------------------------------------- one trace set
@dataclass(frozen=True)
class Job:
    """One trace set to make: which model, into which file."""

    source: str
    key: str
    out: Path
    name: str
    group: str | None = None
    role: str | None = None


@dataclass(frozen=True)
class Settings:
    """What every job of a run shares (the CLI's options)."""

    decoding: Decoding
    device: str = "cpu"
    dtype: str = "auto"
    batch_size: int | None = None  # None: auto (on resume: the file's)
    backend: str = "transformers"
    problems_from: str = ""
    quiet: bool = False


def _version() -> str:
    from . import __version__

    return str(__version__)


def make_trace_set(
    job: Job,
    problems: Sequence[Problem],
    settings: Settings,
    *,
    say: Say | None = None,
    load_backend: Callable[[Path, Any, Settings], tuple[Backend, str, Any]] | None = None,
) -> TraceSet:
    """Generate (or finish) one trace set in ``job.out``; returns it in problem order.

    ``load_backend(path, tokenizer, settings) -> (backend, dtype name, model config)`` is
    :func:`_load_backend` unless given (tests pass a vLLM test double through it).
    """
    from .fingerprint import fingerprint

    say = say or (lambda line: None if settings.quiet else print(line, file=sys.stderr))
    path = resolve_model_path(job.source, key=job.key)
    tokenizer = load_tokenizer(str(path))
    prompts = {p.id: build_prompt_ids(tokenizer, p.problem) for p in problems}
    header: dict[str, Any] = {
        HEADER_KEY: FORMAT_VERSION,
        "name": job.name,
        "tokenizer": tokenizer_identity(tokenizer),
        "generator": {"key": job.key, "source": job.source, "fingerprint": fingerprint(path)},
        "recipe": {
            **prompt_recipe(tokenizer),
            "problems": {"count": len(problems), "sha256": problems_hash(problems)},
            "group": job.group,
            "role": job.role,
        },
        "decoding": settings.decoding.as_header(),
        "backend": settings.backend,
        "problems_from": settings.problems_from,
        "reasondiff_version": _version(),
    }
    partial = read_partial(job.out)
    for note in partial.notes if partial else ():
        say(f"note: {note}")
    existing = partial.header if partial is not None and partial.header else None
    present: dict[str, Trace] = {}
    if existing is not None and partial is not None:
        _check_resumable(job.out, existing, header, RESUME_KEYS)
        if settings.batch_size is not None:  # an explicit --batch-size must match too
            _check_resumable(job.out, existing, {"batch_size": settings.batch_size}, ["batch_size"])
        present = {t.id: t for t in partial.traces}
        say(f"resuming: {len(present)} of {len(problems)} traces present in {job.out}")
    pending = [p for p in problems if p.id not in present]
    if pending:
        backend, dtype, config = (load_backend or _load_backend)(path, tokenizer, settings)
        order = sorted(pending, key=lambda p: -len(prompts[p.id]))  # longest first, stable
        batch = settings.batch_size
        if batch is None and existing is not None:
            batch = int(existing.get("batch_size") or 0) or None
        if batch is None:
            batch = _auto_batch(settings, order, prompts, config, dtype)
        header.update(dtype=dtype, batch_size=batch)
        if existing is not None:
            _check_resumable(job.out, existing, header, RESUME_KEYS_LOADED)
            header = existing
        keep = partial.good_bytes if (existing is not None and partial is not None) else 0
        with (
            TraceAppender(job.out, header, keep_bytes=keep) as out,
            _progress(len(problems), len(present), label=job.name, quiet=settings.quiet) as bar,
        ):
            for start in range(0, len(order), batch):
                chunk = order[start : start + batch]
                conts = backend.generate([prompts[p.id] for p in chunk], bar.on_tokens)
                for prob, cont in zip(chunk, conts, strict=True):
                    trace = _trace(tokenizer, prob.id, tuple(prompts[prob.id]) + cont)
                    out.append(trace)
                    present[prob.id] = trace
                    bar.finished(trace, len(cont))
    elif existing is not None:
        header = existing
    final_header = {k: v for k, v in header.items() if k not in (HEADER_KEY, "name", "tokenizer")}
    result = TraceSet(
        name=job.name,
        traces=tuple(present[p.id] for p in problems),
        tokenizer=header["tokenizer"],
        provenance=final_header,
    )
    save_trace_set(job.out, result)  # all present: rewrite in problem order, atomically
    return result


def _check_resumable(
    out: Path, found: dict[str, Any], wanted: dict[str, Any], keys: Sequence[str]
) -> None:
    why = header_mismatch(found, wanted, keys)
    if why is not None:
        raise TraceError(
            f"{out} holds traces of another run and is left as is ({why}); rerun with that "
            "run's settings to resume it, or choose another --out"
        )


def _auto_batch(
    settings: Settings,
    order: Sequence[Problem],
    prompts: dict[str, list[int]],
    config: Any,
    dtype: str,
) -> int:
    if settings.backend == "vllm":  # vLLM batches itself; this only spaces the writes
        return min(len(order), 64)
    import torch

    return auto_batch_size(
        device=settings.device,
        n_prompts=len(order),
        longest_prompt=max(len(prompts[p.id]) for p in order),
        max_new_tokens=settings.decoding.max_new_tokens,
        config=config,
        dtype_bytes=torch.empty((), dtype=getattr(torch, dtype)).element_size(),
    )


def _load_backend(path: Path, tokenizer: Any, settings: Settings) -> tuple[Backend, str, Any]:
    """(backend, dtype it computes in, model config) for ``settings.backend``."""
    if settings.backend == "vllm":
        from .models import read_config

        backend = VllmBackend.load(str(path), dtype=settings.dtype, decoding=settings.decoding)
        return backend, backend.dtype or settings.dtype, read_config(path)
    model, _ = load_generator(
        str(path), device=settings.device, dtype=resolve_dtype(settings.dtype, settings.device)
    )
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return transformers_backend(model, tokenizer, settings.decoding), dtype, model.config


# ---------------------------------------------------------------- CLI
def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _batch_size(value: str) -> int | None:
    return None if value == "auto" else _positive(value)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="reasondiff-traces",
        description="Generate reasoning traces (prompt + greedy continuation) as reasondiff "
        "trace sets: one model's (--model), or a registry group's recipe (--group).",
    )
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--model", help="hub id (org/name), local checkpoint directory or toy:<recipe>"
    )
    who.add_argument(
        "--group",
        help="make the trace sets of this registry group's trace recipe (its dataset, "
        "generator and alternative models) into the directory --out",
    )
    ap.add_argument(
        "--registry", action="append", default=[], help="extra registry TOML file (repeatable)"
    )
    src = ap.add_mutually_exclusive_group()
    src.add_argument(
        "--problems",
        type=Path,
        help='JSONL file of {"problem": ..., "id": ...}; stands in for the dataset offline',
    )
    src.add_argument(
        "--dataset",
        help=f"Hugging Face dataset id (default: the group's recipe, else {STUDY_DATASET})",
    )
    ap.add_argument("--split", help="dataset split (default: the recipe's, else test)")
    ap.add_argument("--field", help="dataset field with the problem text (default: problem)")
    ap.add_argument(
        "--limit", type=_positive, help="first N problems (default: the recipe's, else 50)"
    )
    ap.add_argument("--max-new-tokens", type=_positive, help="default: the recipe's, else 4096")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument(
        "--batch-size",
        type=_batch_size,
        default=None,
        metavar="N|auto",
        help="prompts per generate call (default auto: on CUDA from free memory and the "
        "longest prompt + --max-new-tokens, on CPU 8; on resume the file's)",
    )
    ap.add_argument(
        "--backend",
        choices=BACKENDS,
        default="transformers",
        help="transformers (default) or vllm (the 'vllm' extra, CUDA only)",
    )
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    ap.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="auto: the checkpoint's own dtype on CUDA (its config's, float32 if it "
        "declares none), float32 on CPU",
    )
    ap.add_argument("--name", help="trace set name (--model only; default: the file's stem)")
    ap.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output JSONL trace set (--model), or directory of the group's sets (--group)",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress display")
    return ap


def _jobs(args: argparse.Namespace) -> tuple[list[Job], TraceRecipe]:
    """The trace sets to make and the recipe whose problems and settings they follow."""
    from .registry import Registry, TraceRecipe, key_from_source
    from .trace_choice import group_trace_file

    registry = Registry.load(args.registry)
    if args.group is None:
        known = registry.find_by_source(args.model)
        key = known.key if known is not None else key_from_source(args.model)
        job = Job(source=args.model, key=key, out=args.out, name=args.name or args.out.stem)
        return [job], TraceRecipe(dataset=STUDY_DATASET, generator=key)  # the defaults
    if args.name:
        raise ReasondiffError("--name is for --model; a group's sets are named after the group")
    recipe = registry.group(args.group).trace_recipe
    if recipe is None:
        raise ReasondiffError(
            f"group {args.group!r} has no trace recipe ([groups.{args.group}.trace_recipe] in "
            "the registry); use --model MODEL --problems FILE --out FILE.jsonl instead"
        )
    jobs = []
    for role, key in recipe.generators().items():
        spec = registry.model(key)
        out = group_trace_file(args.out, args.group, role)
        jobs.append(Job(spec.source, key, out, out.stem, group=args.group, role=role))
    return jobs, recipe


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (2 on a reasondiff error)."""
    args = build_parser().parse_args(argv)
    try:
        jobs, recipe = _jobs(args)
        limit = args.limit or recipe.limit
        if args.problems is not None:
            problems = load_problems(args.problems, limit=limit)
            problems_from = f"file {args.problems.name}"
        else:
            dataset = args.dataset or recipe.dataset
            split, field = args.split or recipe.split, args.field or recipe.field
            problems = load_dataset_problems(dataset, split=split, field=field, limit=limit)
            problems_from = f"dataset {dataset} split {split} field {field}"
        settings = Settings(
            decoding=Decoding(args.max_new_tokens or recipe.max_new_tokens, args.temperature),
            device="cuda" if args.backend == "vllm" else resolve_device(args.device),
            dtype=args.dtype,
            batch_size=args.batch_size,
            backend=args.backend,
            problems_from=problems_from,
            quiet=args.quiet,
        )
        for job in jobs:
            trace_set = make_trace_set(job, problems, settings)
            if not args.quiet:
                print(f"wrote {len(trace_set)} traces to {job.out}", file=sys.stderr)
    except ReasondiffError as exc:
        print(f"reasondiff-traces: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
