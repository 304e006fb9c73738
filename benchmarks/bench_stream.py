"""stream: block-streamed vs whole-model passes on the same pair, peak RSS and time.

The pair is issue 17's: random Qwen2 checkpoints, 16 blocks, hidden 1024 (0.97 GB each
in float32, stored as sharded bf16), built deterministically once under
``$XDG_CACHE_HOME/reasondiff-bench`` (``--fresh`` rebuilds). Each mode runs in its own
process, so its peak RSS is its own (``benchmarks.harness.run_child``):

- whole: both models loaded with ``reasondiff.models.load_model``, one forward per trace
  with every hidden state (``extract_activations``), then every layer scored;
- streamed: ``reasondiff.streaming.stream_layers`` (one block in memory), the same
  scoring on each yielded layer.

Scoring is the engine's per-layer path (``prepare_base_layer`` once, ``score_layer``),
so the two modes differ only in how hidden states are made. Both print every
(trace, layer) CKA row; the parent checks they agree. Figures are CPU, float32.

Two more cases:

- ``--engine``: the same pair through the engine, ``reasondiff.compare(base, [desc],
  stream_blocks=True)`` vs the whole ``compare`` (fresh metric cache each, weight diffs
  included in both), so scheduling, tokenization and storing are measured too. The pair
  gets the toy family's tokenizer (its ids fit the pair's vocabulary) and a trace set of
  random ids written for it.
- GPU (always tried): a pair with Qwen2.5-7B's shapes (random bf16 weights, ~15 GB each
  on disk, built once under the same cache), whole (both models on the GPU) vs streamed
  on CUDA: peak GPU memory (``torch.cuda.max_memory_allocated``) and time. Without CUDA
  its lines say ``not measured``.

``python -m benchmarks.bench_stream [--quick] [--traces T] [--tokens N] [--engine]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import checkpoints
from benchmarks.harness import NotReady, Result, mib, print_table, python_child, run_child

NAME = "stream"
RSS_GOAL = 0.5
TIME_GOAL = 1.5
#: issue 17's pair: 16 blocks, hidden 1024 (0.97 GB float32 per model).
SHAPE = checkpoints.Shape(
    "stream-1024x16", hidden=1024, layers=16, intermediate=3584, heads=16, kv_heads=4, vocab=24000
)
K_DOMINANT = 8
#: The GPU case: Qwen2.5-7B's shapes (28 blocks, hidden 3584, 152k vocab), bf16.
GPU_SHAPE = checkpoints.QWEN2_5_7B


def _cache_root(shape: checkpoints.Shape = SHAPE) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "reasondiff-bench" / shape.name


def ensure_pair(*, fresh: bool = False, shape: checkpoints.Shape = SHAPE) -> tuple[Path, Path]:
    """The benchmark pair (seed 0), written once; a ``done`` marker guards half-writes."""
    root = _cache_root(shape)
    base, desc, done = root / "base", root / "desc", root / "done"
    if fresh or not done.is_file():
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        checkpoints.write_pair(
            shape, base, desc, shard_bytes=2**28 if shape is SHAPE else 2**31, seed=0
        )
        done.write_text("ok\n")
    return base, desc


def _traces(count: int, tokens: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(17)
    return [torch.randint(0, SHAPE.vocab, (tokens,), generator=gen).tolist() for _ in range(count)]


# ---------------------------------------------------------------------- child
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(x.split()[1]) for x in fh if x.startswith(key + ":"))


def _score(base: Any, desc: Any) -> float:
    from reasondiff.metrics.layer import prepare_base_layer, score_layer

    side = prepare_base_layer(base, name="base", k=K_DOMINANT)
    return float(score_layer(side, desc, k=K_DOMINANT)["metrics"]["linear"])


def _whole(base: Path, desc: Path, traces: list[list[int]]) -> dict[str, float]:
    from reasondiff.activations import extract_activations
    from reasondiff.models import load_model

    models = [load_model(p, device="cpu", dtype="auto", name=p.name) for p in (base, desc)]
    rows = {}
    for t, ids in enumerate(traces):
        a, b = (extract_activations(m, ids) for m in models)
        for key in a:
            rows[f"{t}:{key}"] = _score(a[key], b[key])
    return rows


def _streamed(base: Path, desc: Path, traces: list[list[int]]) -> dict[str, float]:
    from reasondiff.streaming import StreamModel, stream_layers

    models = [StreamModel("base", base), StreamModel("desc", desc)]
    rows = {}
    for kind, layer, states in stream_layers(models, traces, device="cpu", dtype="auto"):
        for t in range(len(traces)):
            rows[f"{t}:{kind}.{layer}"] = _score(states["base"][t], states["desc"][t])
    return rows


def _gpu_whole(base: Path, desc: Path, traces: list[list[int]]) -> dict[str, float]:
    """Both models on the GPU in their dtype (bf16), hidden states kept there."""
    from reasondiff.activations import extract_activations
    from reasondiff.models import load_model

    models = [load_model(p, device="cuda", dtype="auto", name=p.name) for p in (base, desc)]
    rows = {}
    for t, ids in enumerate(traces):
        a, b = (extract_activations(m, ids, on_device=True) for m in models)
        for key in a:
            rows[f"{t}:{key}"] = _score(a[key], b[key])
    return rows


def _gpu_streamed(base: Path, desc: Path, traces: list[list[int]]) -> dict[str, float]:
    from reasondiff.streaming import StreamModel, stream_layers

    models = [StreamModel("base", base), StreamModel("desc", desc)]
    rows = {}
    for kind, layer, states in stream_layers(models, traces, device="cuda", dtype="auto"):
        for t in range(len(traces)):
            rows[f"{t}:{kind}.{layer}"] = _score(states["base"][t], states["desc"][t])
    return rows


def _engine(base: Path, desc: Path, traces: Path, streamed: bool) -> dict[str, float]:
    """``reasondiff.compare`` on the pair in a fresh metric cache: every pass computed."""
    import tempfile

    from reasondiff.api import compare

    with tempfile.TemporaryDirectory(prefix="bench-stream-cache-") as cache:
        got = compare(
            str(base),
            [str(desc)],
            traces=str(traces),
            cache_dir=cache,
            raise_on_error=True,
            stream_blocks=streamed,
            dominant_k=K_DOMINANT,
            bootstrap=50,
        )
    return {f"{r.trace}:{r.layer}:{r.metric}": r.value for res in got for r in res.cka}


def child(argv: list[str]) -> int:
    mode, base, desc, count, tokens = argv[0], Path(argv[1]), Path(argv[2]), *map(int, argv[3:5])
    start = time.perf_counter()
    import torch  # (import cost measured apart from the work)
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401  both modes run it

    import reasondiff.activations
    import reasondiff.metrics.layer
    import reasondiff.streaming  # noqa: F401

    traces = _traces(count, tokens)
    imported = time.perf_counter()
    rss_imported = _status_kib("VmRSS")
    if mode.startswith("engine-"):
        rows = _engine(base, desc, Path(argv[5]), streamed=mode == "engine-streamed")
    else:
        work = {
            "whole": _whole,
            "streamed": _streamed,
            "gpu-whole": _gpu_whole,
            "gpu-streamed": _gpu_streamed,
        }
        rows = work[mode](base, desc, traces)
    if mode.startswith("gpu-"):
        torch.cuda.synchronize()
    done = time.perf_counter()
    gpu_peak = torch.cuda.max_memory_allocated() if mode.startswith("gpu-") else None
    print(
        json.dumps(
            {
                "import_s": imported - start,
                "work_s": done - imported,
                "rss_imported_kib": rss_imported,
                "hwm_kib": _status_kib("VmHWM"),
                "gpu_peak_bytes": gpu_peak,
                "rows": rows,
            }
        )
    )
    return 0


# ---------------------------------------------------------------------- parent
def _mode(
    mode: str, base: Path, desc: Path, count: int, tokens: int, *extra: str
) -> dict[str, Any]:
    argv = ["child", mode, str(base), str(desc), str(count), str(tokens), *extra]
    run = run_child(python_child("bench_stream", *argv), check=False)
    if run.returncode != 0:
        tail = run.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        if mode == "streamed" and "reasondiff" in run.stderr:
            raise NotReady(f"reasondiff.streaming failed: {tail[0]}")
        raise RuntimeError(f"bench_stream {mode} exited {run.returncode}:\n{run.stderr[-3000:]}")
    data: dict[str, Any] = run.json()
    data["peak_rss"] = run.peak_rss_bytes
    data["wall_s"] = run.seconds
    return data


def _engine_pair(base: Path, desc: Path, count: int, n: int) -> tuple[Path, Path, Path]:
    """The benchmark pair as compare() takes it: weights linked, the toy tokenizer added
    (its ids fit the pair's 24k vocabulary), and a trace set of random ids in that
    tokenizer's vocabulary, written for it."""
    import torch

    from reasondiff.fixtures.toy import ensure_toy_model
    from reasondiff.tokenizer import load_fast_tokenizer
    from reasondiff.traces import Trace, TraceSet, save_trace_set, tokenizer_identity

    root = _cache_root() / "engine"
    toy = ensure_toy_model(root / "toy", "base")
    tok_files = [p for p in toy.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))]
    dirs = []
    for src in (base, desc):
        dst = root / src.name
        dst.mkdir(parents=True, exist_ok=True)
        for f in [*src.iterdir(), *tok_files]:
            link = dst / f.name
            if f.is_file() and not link.exists():
                link.symlink_to(f.resolve())
        dirs.append(dst)
    tokenizer = load_fast_tokenizer(dirs[0])
    vocab = len(tokenizer.get_vocab())
    gen = torch.Generator().manual_seed(17)
    traces = [
        Trace(f"r{i}", "", tuple(torch.randint(0, vocab, (n,), generator=gen).tolist()))
        for i in range(count)
    ]
    path = root / f"traces-{count}x{n}.jsonl"
    save_trace_set(path, TraceSet("bench", tuple(traces), tokenizer_identity(tokenizer)))
    return dirs[0], dirs[1], path


def _engine_case(base: Path, desc: Path, count: int, n: int) -> list[Result]:
    """compare(stream_blocks=True) vs the whole compare, each in its own process."""
    eb, ed, traces = _engine_pair(base, desc, count, n)
    figures = {
        m: _mode(f"engine-{m}", eb, ed, count, n, str(traces)) for m in ("whole", "streamed")
    }
    print_table(
        "stream --engine: reasondiff.compare whole vs stream_blocks=True (fresh cache each)",
        ["mode", "work s", "peak RSS MiB", "peak - imported MiB"],
        [
            [m, f["work_s"], mib(f["peak_rss"]), mib((f["hwm_kib"] - f["rss_imported_kib"]) * 1024)]
            for m, f in figures.items()
        ],
    )
    whole, streamed = figures["whole"], figures["streamed"]
    keys = sorted(whole["rows"])
    diff = max(
        (abs(whole["rows"][k] - streamed["rows"].get(k, float("nan"))) for k in keys), default=0.0
    )
    print(f"engine CKA rows: {len(keys)}, max |whole - streamed| = {diff:.2e}")
    results = [
        Result(f"{NAME}_engine_rss", streamed["peak_rss"] / whole["peak_rss"], "<=", RSS_GOAL),
        Result(f"{NAME}_engine_time", streamed["work_s"] / whole["work_s"], "<=", TIME_GOAL),
    ]
    if sorted(streamed["rows"]) != keys or not diff <= 1e-9:
        results.append(Result(f"{NAME}_engine_agree", diff, "<=", 1e-9, reason="rows differ"))
    return results


def _gpu_case(count: int, n: int) -> list[Result]:
    """The 7B-shaped pair on CUDA, whole vs streamed: peak GPU memory and time."""
    import torch

    names = (f"{NAME}_gpu_7b_mem", f"{NAME}_gpu_7b_time")
    if not torch.cuda.is_available():
        why = "no CUDA device on this machine"
        return [
            Result(names[0], None, "<=", RSS_GOAL, reason=why, scope="not measured"),
            Result(names[1], None, "<=", TIME_GOAL, reason=why, scope="not measured"),
        ]
    base, desc = ensure_pair(shape=GPU_SHAPE)
    print(
        f"{GPU_SHAPE.name}: {GPU_SHAPE.numel() / 1e9:.2f} B params, bf16 "
        f"{GPU_SHAPE.numel() * 2 / 1e9:.1f} GB each; {count} traces x {n} tokens; "
        f"{torch.cuda.get_device_name()}"
    )
    figures = {m: _mode(f"gpu-{m}", base, desc, count, n) for m in ("whole", "streamed")}
    print_table(
        "stream GPU: 7B-shaped pair, whole vs block-streamed (bf16, CUDA)",
        ["mode", "work s", "peak GPU MiB", "peak RSS MiB"],
        [
            [m, f["work_s"], mib(f["gpu_peak_bytes"]), mib(f["peak_rss"])]
            for m, f in figures.items()
        ],
    )
    whole, streamed = figures["whole"], figures["streamed"]
    keys = sorted(whole["rows"])
    diff = max(abs(whole["rows"][k] - streamed["rows"].get(k, float("nan"))) for k in keys)
    agree = f"bf16 rows max |whole - streamed| = {diff:.2e}"
    return [
        Result(
            names[0],
            streamed["gpu_peak_bytes"] / whole["gpu_peak_bytes"],
            "<=",
            RSS_GOAL,
            reason=agree,
        ),
        Result(names[1], streamed["work_s"] / whole["work_s"], "<=", TIME_GOAL, reason=agree),
    ]


def run(
    *,
    quick: bool,
    traces: int | None = None,
    tokens: int | None = None,
    engine: bool = False,
    gpu: bool = True,
) -> list[Result]:
    count = traces or (2 if quick else 4)
    n = tokens or (128 if quick else 512)
    base, desc = ensure_pair()
    if engine:  # the engine-level comparison alone (the function level is the default)
        return _engine_case(base, desc, count, n)
    print(
        f"{SHAPE.name}: {SHAPE.numel() / 1e6:.0f} M params, {SHAPE.numel() * 4 / 1e9:.2f} GB "
        f"float32 each (stored bf16); {count} traces x {n} tokens; CPU, {os.cpu_count()} cores"
    )
    figures = {mode: _mode(mode, base, desc, count, n) for mode in ("whole", "streamed")}
    rows = [
        [
            mode,
            f["work_s"],
            f["import_s"],
            mib(f["peak_rss"]),
            mib((f["hwm_kib"] - f["rss_imported_kib"]) * 1024),
        ]
        for mode, f in figures.items()
    ]
    print_table(
        "stream: whole vs block-streamed pass (same pair, same scoring)",
        ["mode", "work s", "import s", "peak RSS MiB", "peak - imported MiB"],
        rows,
    )
    whole, streamed = figures["whole"], figures["streamed"]
    keys = sorted(whole["rows"])
    diff = max(abs(whole["rows"][k] - streamed["rows"][k]) for k in keys)
    same = sorted(streamed["rows"]) == keys
    print(
        f"CKA rows: {len(keys)} (trace, layer) linear values, max |whole - streamed| = {diff:.2e}"
    )
    results = [
        Result(f"{NAME}_rss", streamed["peak_rss"] / whole["peak_rss"], "<=", RSS_GOAL),
        Result(f"{NAME}_time", streamed["work_s"] / whole["work_s"], "<=", TIME_GOAL),
    ]
    if not same or diff > 1e-9:
        results.append(Result(f"{NAME}_agree", diff, "<=", 1e-9, reason="rows differ"))
    if gpu:
        results += _gpu_case(count, n)
    return results


def main(argv: list[str]) -> int:
    if argv[:1] == ["child"]:
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 traces x 128 tokens")
    parser.add_argument("--traces", type=int, help="number of traces (default 4)")
    parser.add_argument("--tokens", type=int, help="tokens per trace (default 512)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the cached pair")
    parser.add_argument(
        "--engine",
        action="store_true",
        help="only the engine level: compare(stream_blocks=True) vs whole compare",
    )
    args = parser.parse_args(argv)
    if args.fresh:
        ensure_pair(fresh=True)
    results = run(quick=args.quick, traces=args.traces, tokens=args.tokens, engine=args.engine)
    for result in results:
        print(result.line())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
