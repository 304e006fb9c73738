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

``python -m benchmarks.bench_stream [--quick] [--traces T] [--tokens N]``
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


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "reasondiff-bench" / SHAPE.name


def ensure_pair(*, fresh: bool = False) -> tuple[Path, Path]:
    """The benchmark pair (seed 0), written once; a ``done`` marker guards half-writes."""
    root = _cache_root()
    base, desc, done = root / "base", root / "desc", root / "done"
    if fresh or not done.is_file():
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        checkpoints.write_pair(SHAPE, base, desc, shard_bytes=2**28, seed=0)
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


def child(argv: list[str]) -> int:
    mode, base, desc, count, tokens = argv[0], Path(argv[1]), Path(argv[2]), *map(int, argv[3:5])
    start = time.perf_counter()
    import torch  # noqa: F401  (import cost measured apart from the work)
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401  both modes run it

    import reasondiff.activations
    import reasondiff.metrics.layer
    import reasondiff.streaming  # noqa: F401

    traces = _traces(count, tokens)
    imported = time.perf_counter()
    rss_imported = _status_kib("VmRSS")
    rows = {"whole": _whole, "streamed": _streamed}[mode](base, desc, traces)
    done = time.perf_counter()
    print(
        json.dumps(
            {
                "import_s": imported - start,
                "work_s": done - imported,
                "rss_imported_kib": rss_imported,
                "hwm_kib": _status_kib("VmHWM"),
                "rows": rows,
            }
        )
    )
    return 0


# ---------------------------------------------------------------------- parent
def _mode(mode: str, base: Path, desc: Path, count: int, tokens: int) -> dict[str, Any]:
    run = run_child(
        python_child("bench_stream", "child", mode, str(base), str(desc), str(count), str(tokens)),
        check=False,
    )
    if run.returncode != 0:
        tail = run.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        if mode == "streamed" and "reasondiff" in run.stderr:
            raise NotReady(f"reasondiff.streaming failed: {tail[0]}")
        raise RuntimeError(f"bench_stream {mode} exited {run.returncode}:\n{run.stderr[-3000:]}")
    data: dict[str, Any] = run.json()
    data["peak_rss"] = run.peak_rss_bytes
    data["wall_s"] = run.seconds
    return data


def run(*, quick: bool, traces: int | None = None, tokens: int | None = None) -> list[Result]:
    count = traces or (2 if quick else 4)
    n = tokens or (128 if quick else 512)
    base, desc = ensure_pair()
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
    return results


def main(argv: list[str]) -> int:
    if argv[:1] == ["child"]:
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 traces x 128 tokens")
    parser.add_argument("--traces", type=int, help="number of traces (default 4)")
    parser.add_argument("--tokens", type=int, help="tokens per trace (default 512)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the cached pair")
    args = parser.parse_args(argv)
    if args.fresh:
        ensure_pair(fresh=True)
    for result in run(quick=args.quick, traces=args.traces, tokens=args.tokens):
        print(result.line())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
