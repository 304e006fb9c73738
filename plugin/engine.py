"""The comparison engine: models, forwards, metrics and caches, with no pytest inside.

:class:`Engine` turns a base/descendant :class:`~reasondiff.registry.PairSpec` into a
:class:`~reasondiff.records.PairResult` (weight-diff records and per-(trace, layer) CKA
rows). The pytest session asks it for one pair at a time; :func:`compare` is the same
work as a plain function for notebooks and scripts.

How work is shared (METHODS §11):
- A **pass** takes one base and the descendants this process claimed, and per trace
  does one forward of the base and one of each descendant. Per layer, the base's
  statistics (centred Gram, RBF kernel, HSIC(K, K), PC1 projection, massive
  activations) are prepared once and every descendant is scored against them.
- Hidden states stay on the device the forward ran on and are scored there in float64;
  nothing of size N x D is written to disk unless ``keep_activations``.
- Results go to the metric cache per (pair, trace, layer), with a manifest per (pair,
  trace set) written last, so a warm rerun reads only the metric cache and loads no model.
- Under xdist, a process that needs a pair claims (non-blocking file lock per pair and
  trace set) up to ``ceil(k / workers)`` of the base's uncomputed descendants, the
  requested one first, and computes them in one pass; a pair claimed by another process
  is waited for and read. So a base with k descendants costs at most k + workers
  forwards per trace, and every process computes the same values for a pair.

Failures are per pair: a descendant whose checkpoint, tokenizer or activations are bad
is dropped from the pass with its error kept for its own result; an error on the base
side fails the pass (every pair needs the base).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ReasondiffError
from .metric_store import (
    blocking_lock,
    cache_key,
    layer_key,
    peek,
    rbf_median_key,
    release,
    rows_from_entry,
    try_lock,
)
from .records import CacheStats, PairInfo, PairResult, WeightRecord, weight_from_row, weight_to_row
from .registry import ModelSpec, PairSpec, slug

if TYPE_CHECKING:
    from .metrics.layer import Form
    from .traces import Trace, TraceSet

#: Bump when the rows computed per (pair, trace, layer) change meaning: it keys the cache.
METRICS_VERSION = "2"  # 2: stored token ids authoritative (results of re-tokenized sets differ)
#: Bump when the weight-diff records change meaning.
WEIGHTS_VERSION = "2"  # 2: float32 block sums accumulated in float64

Entries = dict[str, dict[int, dict[str, Any]]]  # trace id -> layer -> cache entry


@dataclass(frozen=True)
class EngineConfig:
    """What the engine needs to know; the pytest options map onto it one to one."""

    cache_dir: Path
    device: str = "auto"
    dtype: str = "auto"
    max_tokens: int = 4096
    layers: tuple[int, ...] | None = None
    dominant_k: int = 10
    rbf_median: str = "offdiag"
    keep_activations: bool = False
    diff_cache_cap: int | None = None
    torch_threads: int | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    #: Descendants scored in one pass at most (None: as many as fit in memory, see
    #: :meth:`Engine.memory_budget`); each is resident on the device during the pass.
    pass_size: int | None = None

    @classmethod
    def from_options(cls, options: Any) -> EngineConfig:
        """From :class:`~reasondiff.options.DiffOptions` (duck-typed: no pytest import)."""
        return cls(
            cache_dir=options.cache_dir(),
            device=options.device,
            dtype=options.dtype,
            max_tokens=options.max_tokens,
            layers=options.layers,
            dominant_k=options.dominant_k,
            rbf_median=getattr(options, "rbf_median", "offdiag"),
            keep_activations=options.keep_activations,
            diff_cache_cap=options.diff_cache_cap,
            torch_threads=options.torch_threads,
            trust_remote_code=options.trust_remote_code,
            allow_pickle=options.allow_pickle,
            pass_size=options.pass_size,
        )


@dataclass
class TraceSource:
    """One trace set as the engine uses it: a short name (row prefix) and its traces."""

    name: str
    path: Path
    trace_set: TraceSet


@dataclass
class _Job:
    """One claimed pair inside a pass."""

    pair: PairSpec
    key: str
    desc_dir: Path
    traces: TraceSet | None = None
    notes: list[str] = field(default_factory=list)
    entries: Entries = field(default_factory=dict)
    error: Exception | None = None


class Engine:
    """Computes pair results; owns models, tokenizers, fingerprints and caches.

    ``trace_paths`` are the trace set files (primary first), or a callable giving them
    on first use (so choosing the toy traces does not build anything until needed).
    """

    def __init__(
        self,
        config: EngineConfig,
        *,
        trace_paths: Sequence[Path] | Callable[[], Sequence[Path]],
        worker_count: int | None = None,
    ) -> None:
        self.config = config
        self.worker_count = worker_count
        self.stats = CacheStats()
        self.stage_seconds: dict[str, float] = {}
        self.notes: list[str] = []
        self.forwards = 0
        self._trace_paths = trace_paths
        self._sources: list[TraceSource] | None = None
        self._results: dict[str, PairResult] = {}
        self._failures: dict[str, Exception] = {}
        self._entries: dict[str, tuple[dict[str, Any], Entries]] = {}
        self._pass_errors: dict[str, Exception] = {}
        self._models: dict[str, Any] = {}
        self._paths: dict[str, Path] = {}
        self._fingerprints: dict[Path, str] = {}
        self._tokenizers: dict[Path, Any] = {}
        self._json_caches: dict[str, Any] = {}
        self._act_cache: Any = None
        self._torch_ready = False
        self._device: str | None = None

    # ------------------------------------------------------------------ public
    def pair_result(self, pair: PairSpec, siblings: Sequence[PairSpec] = ()) -> PairResult:
        """All measurements of ``pair`` (memoized; errors too).

        ``siblings``: the other selected pairs; those sharing ``pair``'s base may be
        computed in the same pass (one base forward per trace for all of them).
        """
        pid = pair.pair_id
        if pid in self._results:
            return self._results[pid]
        if pid in self._failures:
            raise self._failures[pid]
        try:
            result = self._compute_pair(pair, siblings)
        except Exception as exc:
            self._failures[pid] = exc
            raise
        self._results[pid] = result
        return result

    def sources(self) -> list[TraceSource]:
        """The trace sets, loaded once, with unique short names (primary first)."""
        if self._sources is None:
            from .traces import load_trace_set

            paths = self._trace_paths() if callable(self._trace_paths) else self._trace_paths
            out: list[TraceSource] = []
            for path in paths:
                ts = load_trace_set(path)
                name = slug(ts.name or Path(path).stem)
                while any(o.name == name for o in out):
                    name = f"{name}-alt"
                out.append(TraceSource(name=name, path=Path(path), trace_set=ts))
            self._sources = out
        return self._sources

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the wall time of the block to ``stage_seconds[name]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + time.perf_counter() - t0

    def release_models(self) -> None:
        """Drop every loaded model (frees host / device memory)."""
        self._models.clear()

    # ------------------------------------------------------------------ one pair
    def _compute_pair(self, pair: PairSpec, siblings: Sequence[PairSpec]) -> PairResult:
        from .models import check_compatible_configs

        self._configure_torch()
        base_dir = self._resolve(pair.base)
        desc_dir = self._resolve(pair.descendant)
        bname, dname = pair.base.key, pair.descendant.key
        check_compatible_configs(base_dir, desc_dir, base_name=bname, desc_name=dname)
        num_layers = _num_layers(read_config(desc_dir, dname))
        layers = self._layers(num_layers, dname)
        result = PairResult(
            info=PairInfo(
                pair_id=pair.pair_id,
                base=bname,
                descendant=dname,
                base_source=pair.base.source,
                descendant_source=pair.descendant.source,
                method=pair.method,
                group=pair.group,
                expect=pair.expect,
                num_layers=num_layers,
            )
        )
        result.notes.append(self._dtype_note(pair, base_dir, desc_dir))
        result.weights = self._weights(pair, base_dir, desc_dir)
        mates = [s for s in siblings if s.base.key == pair.base.key and s.pair_id != pair.pair_id]
        for src in self.sources():
            result.trace_sets.append(src.name)
            manifest, entries = self._pair_entries(pair, mates, src, layers, num_layers)
            for tid in manifest["traces"]:
                for lay in layers:
                    rows_from_entry(entries[tid][lay], pair, f"{src.name}:{tid}", lay, result)
            for note in manifest["notes"]:
                msg = f"{pair.pair_id} [{src.name}]: {note}"
                if msg not in result.notes:
                    result.notes.append(msg)
        self._evict_descendants(pair)
        return result

    def _configure_torch(self) -> None:
        """Set torch's CPU threads once: ``torch_threads``, or cores / workers under xdist.

        xdist workers each running torch's default thread count oversubscribe the CPU,
        and OpenMP threads that spin-wait on a busy machine make small matrices many
        times slower than one thread.
        """
        if self._torch_ready:
            return
        self._torch_ready = True
        threads = self.config.torch_threads
        if threads is None and self.worker_count:
            threads = max(1, _cpu_count() // self.worker_count)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)

    def _layers(self, num_layers: int, model: str) -> list[int]:
        wanted = self.config.layers
        if wanted is None:
            return list(range(num_layers + 1))
        bad = [lay for lay in wanted if lay > num_layers]
        if bad:
            raise ReasondiffError(
                f"--layers {','.join(map(str, bad))} out of range for {model}: "
                f"hidden-state layers are 0..{num_layers}"
            )
        # The final layer is always measured: it has a finding of its own.
        return sorted({*wanted, num_layers})

    # ------------------------------------------------------------------ models and files
    def _resolve(self, spec: ModelSpec) -> Path:
        if spec.key not in self._paths:
            from .models import resolve_source

            with self.stage("resolve"):
                self._paths[spec.key] = Path(resolve_source(spec, toy_root=self.toy_root))
        return self._paths[spec.key]

    @property
    def toy_root(self) -> Path:
        """``cache_dir/toy``, or a temporary dir when the cache cannot hold the toy family."""
        from .diskcheck import toy_root

        return toy_root(self.config.cache_dir)

    def fingerprint(self, path: Path) -> str:
        """Content fingerprint, memoized in-process and on disk (by path, size, mtime)."""
        if path not in self._fingerprints:
            from .fingerprint import fingerprint

            with self.stage("resolve"):
                self._fingerprints[path] = fingerprint(
                    path, memo_dir=self.config.cache_dir / "fingerprints"
                )
        return self._fingerprints[path]

    @property
    def device(self) -> str:
        """The concrete torch device (``auto`` resolved; worker i -> GPU i mod n)."""
        if self._device is None:
            from .models import pick_device

            self._device = pick_device(self.config.device)
        return self._device

    def dtype_for(self, model_dir: Path) -> str:
        """The dtype activations of this checkpoint are computed in: one place for the
        cache key and the loader (``auto``: float32 on CPU, the checkpoint's own on CUDA)."""
        from .dtypes import resolve_dtype

        return resolve_dtype(self.config.dtype, self.device, read_config(model_dir, model_dir.name))

    def _dtype_note(self, pair: PairSpec, base_dir: Path, desc_dir: Path) -> str:
        """The report's word on the dtype this pair's activations were computed in."""
        from .dtypes import dtype_note

        return dtype_note(
            self.dtype_for(base_dir),
            self.dtype_for(desc_dir),
            base=pair.base.key,
            descendant=pair.descendant.key,
            option=self.config.dtype,
            device=self.device,
        )

    def _model(self, spec: ModelSpec, path: Path) -> Any:
        """Load a model at most once (kept until its pair or pass is done)."""
        if spec.key not in self._models:
            from .models import load_model

            with self.stage("load"):
                self._models[spec.key] = load_model(
                    path,
                    device=self.device,
                    dtype=self.dtype_for(path),
                    trust_remote_code=self.config.trust_remote_code,
                    allow_pickle=self.config.allow_pickle,
                    name=spec.key,
                )
        return self._models[spec.key]

    def _evict_descendants(self, pair: PairSpec) -> None:
        """Keep only the current base loaded between pairs (the next pair likely shares it)."""
        for key in [k for k in self._models if k != pair.base.key]:
            del self._models[key]

    def _tokenizer(self, path: Path) -> Any:
        if path not in self._tokenizers:
            from .tokenizer import load_fast_tokenizer

            with self.stage("tokenize"):
                self._tokenizers[path] = load_fast_tokenizer(
                    path, trust_remote_code=self.config.trust_remote_code
                )
        return self._tokenizers[path]

    # ------------------------------------------------------------------ caches
    def _json_cache(self, namespace: str) -> Any:
        if namespace not in self._json_caches:
            from .cache import JsonCache

            self._json_caches[namespace] = JsonCache(self.config.cache_dir, namespace)
        return self._json_caches[namespace]

    def _activation_cache(self) -> Any:
        if self._act_cache is None:
            from .cache import ActivationCache

            self._act_cache = ActivationCache(
                self.config.cache_dir, cap_bytes=self.config.diff_cache_cap
            )
        return self._act_cache

    def _note_cache_state(self, cache: Any) -> None:
        stats = getattr(cache, "stats", None)
        reason = getattr(stats, "disabled_reason", None)
        if reason and not self.stats.caching_disabled_reason:
            self.stats.caching_disabled_reason = str(reason)
        # A damaged entry is recomputed silently otherwise (its log line is captured).
        for entry in getattr(stats, "invalid_entries", None) or ():
            self._note(f"cache entry discarded and recomputed: {entry}")

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # ------------------------------------------------------------------ weights
    def _weights(self, pair: PairSpec, base_dir: Path, desc_dir: Path) -> list[WeightRecord]:
        key = cache_key(
            kind="weights",
            base=self.fingerprint(base_dir),
            desc=self.fingerprint(desc_dir),
            version=WEIGHTS_VERSION,
        )
        computed = False

        def compute() -> list[list[Any]]:
            nonlocal computed
            from .weightdiff import stream_weight_diff

            computed = True
            with self.stage("weight diffs"):
                recs = stream_weight_diff(
                    base_dir, desc_dir, base_name=pair.base.key, desc_name=pair.descendant.key
                )
            return [weight_to_row(r) for r in recs]

        cache = self._json_cache("weightdiff")
        rows = cache.get_or_compute(key, compute)
        self._note_cache_state(cache)
        if computed:
            self.stats.weight_diffs_computed += 1
        else:
            self.stats.weight_diffs_loaded += 1
        # Names in the records follow this pair, whatever pair computed the cached entry.
        return [weight_from_row(r, pair.base.key, pair.descendant.key) for r in rows]

    # ------------------------------------------------------------------ CKA entries
    def pair_key(self, pair: PairSpec, src: TraceSource) -> str:
        """Metric-cache key of one pair on one trace set (everything the rows depend on)."""
        from .dtypes import pair_dtype_key
        from .traces import trace_set_hash

        c = self.config
        base_dir, desc_dir = self._resolve(pair.base), self._resolve(pair.descendant)
        return cache_key(
            kind="pair",
            base=self.fingerprint(base_dir),
            desc=self.fingerprint(desc_dir),
            traces=trace_set_hash(src.trace_set),
            max_tokens=str(c.max_tokens),
            dtype=pair_dtype_key(self.dtype_for(base_dir), self.dtype_for(desc_dir)),
            k=str(c.dominant_k),
            version=METRICS_VERSION,
            **rbf_median_key(c.rbf_median),
        )

    def _pair_entries(
        self,
        pair: PairSpec,
        mates: Sequence[PairSpec],
        src: TraceSource,
        layers: list[int],
        num_layers: int,
    ) -> tuple[dict[str, Any], Entries]:
        """(manifest, entries) of one pair on one trace set: memory, cache, or a pass."""
        key = self.pair_key(pair, src)
        found = self._known_entries(key, layers)
        if found is not None:
            return found
        claimed = self._claim(pair, mates, src, layers)
        try:
            if claimed:
                self._run_pass(pair.base, [job for job, _ in claimed], src, layers, num_layers)
        finally:
            for _, lock in claimed:
                release(lock)
        if key in self._pass_errors:
            raise self._pass_errors.pop(key)
        found = self._known_entries(key, layers)
        if found is not None:
            return found
        # Another process holds this pair: wait for it, then read what it wrote. If it
        # died or failed, compute the pair here, alone.
        with blocking_lock(self.config.cache_dir, key):
            found = self._known_entries(key, layers)
            if found is None:
                job = _Job(pair=pair, key=key, desc_dir=self._resolve(pair.descendant))
                self._run_pass(pair.base, [job], src, layers, num_layers)
                if key in self._pass_errors:
                    raise self._pass_errors.pop(key)
                found = self._known_entries(key, layers)
        if found is None:  # pragma: no cover - a pass always leaves entries or an error
            raise ReasondiffError(f"{pair.pair_id}: no metric entries after computing them")
        return found

    def _claim(
        self, pair: PairSpec, mates: Sequence[PairSpec], src: TraceSource, layers: list[int]
    ) -> list[tuple[_Job, Any]]:
        """Lock the requested pair and up to ceil(k / workers) - 1 uncomputed siblings."""
        share = max(1, math.ceil((len(mates) + 1) / max(1, self.worker_count or 1)))
        if self.config.pass_size is not None:
            share = min(share, self.config.pass_size)
        budget = self.memory_budget()
        resident = (
            0 if pair.base.key in self._models else self.model_bytes(self._resolve(pair.base))
        )
        claimed: list[tuple[_Job, Any]] = []
        for p in [pair, *mates]:
            if len(claimed) >= share:
                break
            if p is not pair and (p.pair_id in self._results or p.pair_id in self._failures):
                continue
            try:
                key = self.pair_key(p, src)
                desc_dir = self._resolve(p.descendant)
            except Exception:
                if p is pair:
                    raise
                continue  # a sibling's problem is reported by its own test
            if self._known_entries(key, layers) is not None:
                continue
            lock = try_lock(self.config.cache_dir, key)
            if lock is None:
                continue  # another process is computing it
            if self._known_entries(key, layers) is not None:
                release(lock)
                continue
            size = self.model_bytes(desc_dir)
            if claimed and budget is not None and resident + size > budget:
                release(lock)  # would not fit beside the others: a later pass takes it
                break
            resident += size
            claimed.append((_Job(pair=p, key=key, desc_dir=desc_dir), lock))
        return claimed

    def model_bytes(self, path: Path) -> int:
        """Memory a checkpoint takes once loaded: its weight files, rescaled from the dtype
        it is stored in to the dtype it runs in (an estimate; buffers are small)."""
        from .dtypes import checkpoint_dtype

        files = [p for p in path.glob("*.safetensors")] or list(path.glob("pytorch_model*.bin"))
        stored = sum(p.stat().st_size for p in files)
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}
        src = checkpoint_dtype(read_config(path, path.name)) or "float32"
        return int(stored * itemsize.get(self.dtype_for(path), 4) / itemsize.get(src, 4))

    def memory_budget(self) -> int | None:
        """Bytes of models a pass may add: 80% of the free device memory (CUDA) or of the
        available host memory (CPU), which loaded models are already out of; the other
        20% is for one trace's hidden states and the metric scratch. None when it cannot
        be read (then no limit)."""
        try:
            if self.device.startswith("cuda"):
                import torch

                free, _ = torch.cuda.mem_get_info(torch.device(self.device))
                return int(0.8 * free)
            pages = os.sysconf("SC_AVPHYS_PAGES")
            return int(0.8 * pages * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, RuntimeError, AttributeError):
            return None

    def _known_entries(self, key: str, layers: list[int]) -> tuple[dict[str, Any], Entries] | None:
        """(manifest, entries[trace][layer]) from this process or the cache, else None."""
        if key in self._entries:
            return self._entries[key]
        cache = self._json_cache("metrics")
        with self.stage("metric cache"):
            manifest = peek(cache, cache_key(kind="manifest", pair=key))
            if manifest is None:
                return None
            entries: Entries = {}
            for tid in manifest["traces"]:
                entries[tid] = {}
                for lay in layers:
                    entry = peek(cache, layer_key(key, tid, lay))
                    if entry is None:
                        return None
                    entries[tid][lay] = entry
        self._note_cache_state(cache)
        self.stats.metrics_loaded += sum(len(e) for e in entries.values())
        self._entries[key] = (manifest, entries)
        return manifest, entries

    # ------------------------------------------------------------------ a pass
    def _run_pass(
        self,
        base: ModelSpec,
        jobs: list[_Job],
        src: TraceSource,
        layers: list[int],
        num_layers: int,
    ) -> None:
        """Score ``jobs`` (descendants of ``base``) on every trace of ``src``.

        Per trace: one base forward, one forward per descendant that still misses
        entries, then layer by layer the base side is prepared once and each descendant
        scored against it. Entries are written as they are made; each manifest last.
        """
        from .progress import progress_for

        base_dir = self._resolve(base)
        traces = self._prepare_jobs(base, base_dir, jobs, src)
        live = [j for j in jobs if j.error is None]
        if not live or traces is None:
            self._finish(jobs)
            return
        cache = self._json_cache("metrics")
        subject = f"{base.key} vs {', '.join(j.pair.descendant.key for j in live)} [{src.name}]"
        with progress_for("compare", len(traces.traces), subject=subject, unit="traces") as step:
            for trace in traces.traces:
                todo = [j for j in live if j.error is None and self._fill_cached(j, trace, layers)]
                if todo:
                    self._score_trace(base, base_dir, todo, trace, layers, num_layers, cache)
                step(trace.id)
        self._note_cache_state(cache)
        self._finish(jobs)

    def _prepare_jobs(
        self, base: ModelSpec, base_dir: Path, jobs: list[_Job], src: TraceSource
    ) -> TraceSet | None:
        """Token ids every model of the pass sees (identical by construction), per job."""
        from .models import check_compatible_configs
        from .traces import token_ids_for_pair, truncate

        chosen: TraceSet | None = None
        for job in jobs:
            dname = job.pair.descendant.key
            try:
                check_compatible_configs(
                    base_dir, job.desc_dir, base_name=base.key, desc_name=dname
                )
                with self.stage("tokenize"):
                    bcfg = read_config(base_dir, base.key)
                    dcfg = read_config(job.desc_dir, dname)
                    ids, retokenized = token_ids_for_pair(
                        src.trace_set,
                        self._tokenizer(base_dir),
                        self._tokenizer(job.desc_dir),
                        base_name=base.key,
                        desc_name=dname,
                        vocab_size_base=int(bcfg.get("vocab_size", 0)) or None,
                        vocab_size_desc=int(dcfg.get("vocab_size", 0)) or None,
                    )
                    truncated, notes = truncate(ids, self.config.max_tokens)
            except Exception as exc:
                job.error = exc
                continue
            if chosen is None:
                chosen = truncated
            elif [t.token_ids for t in truncated.traces] != [t.token_ids for t in chosen.traces]:
                job.error = ReasondiffError(
                    f"{job.pair.pair_id}: token ids differ from those of the other "
                    f"descendants of {base.key} on trace set {src.name}"
                )
                continue
            job.traces = truncated
            job.notes = [*retokenized, *notes]
        return chosen

    def _fill_cached(self, job: _Job, trace: Trace, layers: list[int]) -> bool:
        """Take this trace's entries from the cache when all are there; True if any miss."""
        cache = self._json_cache("metrics")
        have = {lay: peek(cache, layer_key(job.key, trace.id, lay)) for lay in layers}
        if any(e is None for e in have.values()):
            return True
        job.entries[trace.id] = have
        self.stats.metrics_loaded += len(have)
        return False

    def _score_trace(
        self,
        base: ModelSpec,
        base_dir: Path,
        todo: list[_Job],
        trace: Trace,
        layers: list[int],
        num_layers: int,
        cache: Any,
    ) -> None:
        """One base forward, one per descendant, then every layer scored with a shared base."""
        from .metrics.layer import prepare_base_layer, score_layer

        hb = self._hidden(base, base_dir, trace, layers)
        hidden: dict[str, dict[str, Any]] = {}
        for job in todo:
            try:
                hidden[job.key] = self._hidden(job.pair.descendant, job.desc_dir, trace, layers)
            except Exception as exc:
                job.error = exc
        todo = [j for j in todo if j.error is None]
        k, form, med = self.config.dominant_k, self._form(), self.config.rbf_median
        with self.stage("metrics"):
            for lay in layers:
                variants = [("hidden", "")] + (
                    [("prenorm", "prenorm ")] if lay == num_layers else []
                )
                per_job: dict[str, dict[str, Any]] = {}
                for kind, label in variants:
                    where = f"{label}layer {lay}, trace {trace.id}"
                    side = prepare_base_layer(
                        hb[f"{kind}.{lay}"], name=f"{base.key} {where}", k=k, form=form
                    )
                    for job in todo:
                        if job.error is not None:
                            continue
                        try:
                            entry = score_layer(
                                side,
                                hidden[job.key][f"{kind}.{lay}"],
                                k=k,
                                name=f"{job.pair.descendant.key} {where}",
                                rbf_median=med,  # type: ignore[arg-type]
                                form=form,
                            )
                        except Exception as exc:
                            job.error = exc
                            continue
                        if kind == "hidden":
                            per_job[job.key] = entry
                        else:
                            for m in ("linear", "rbf", "linear_without_dominant"):
                                per_job[job.key]["metrics"][f"{m}_prenorm"] = entry["metrics"][m]
                    del side
                for job in todo:
                    if job.error is None:
                        entry = per_job[job.key]
                        key = layer_key(job.key, trace.id, lay)
                        stored = cache.get_or_compute(key, lambda e=entry: e)
                        job.entries.setdefault(trace.id, {})[lay] = stored
                        self.stats.metrics_computed += 1
        del hidden, hb

    def _form(self) -> Form:
        """N x N Gram matrices on a GPU (shared base kernels); today's auto form on CPU."""
        return "gram" if self.device.startswith("cuda") else "auto"

    def _hidden(
        self, spec: ModelSpec, path: Path, trace: Trace, layers: list[int]
    ) -> dict[str, Any]:
        """One model's hidden states for one trace, on the device (model dtype).

        From one forward, or with ``keep_activations`` through the activation cache
        (float32 on disk, moved back to the device).
        """
        from .activations import FORWARD_COUNTER, extract_activations

        def forward(on_device: bool) -> dict[str, Any]:
            model = self._model(spec, path)  # timed as "load"
            before = FORWARD_COUNTER.count
            with self.stage("forwards"):
                out = dict(
                    extract_activations(
                        model, list(trace.token_ids), layers=layers, on_device=on_device
                    )
                )
            self.forwards += FORWARD_COUNTER.count - before
            self.stats.activations_computed += 1
            return out

        if not self.config.keep_activations:
            return forward(on_device=True)
        from .cache import EXTRACTION_VERSION

        ids_hash = hashlib.sha256(json.dumps(list(trace.token_ids)).encode()).hexdigest()
        meta = {
            "model": self.fingerprint(path),
            "trace": ids_hash,
            "dtype": self.dtype_for(path),
            "max_tokens": str(self.config.max_tokens),
            "extraction_version": str(EXTRACTION_VERSION),
            "layers": ",".join(map(str, layers)),
        }
        computed = False

        def compute() -> dict[str, Any]:
            nonlocal computed
            computed = True
            return forward(on_device=False)

        cache = self._activation_cache()
        with self.stage("activation cache"):
            acts = cache.get_or_compute(cache_key(**meta), meta, compute)
        self._note_cache_state(cache)
        if not computed:
            self.stats.activations_loaded += 1
        return {name: t.to(self.device) for name, t in acts.items()}

    def _finish(self, jobs: list[_Job]) -> None:
        """Write each finished job's manifest (last: it marks the pair complete)."""
        cache = self._json_cache("metrics")
        for job in jobs:
            if job.error is not None:
                self._pass_errors[job.key] = job.error
                continue
            assert job.traces is not None
            manifest = {"traces": [t.id for t in job.traces.traces], "notes": job.notes}
            stored = cache.get_or_compute(
                cache_key(kind="manifest", pair=job.key), lambda m=manifest: m
            )
            self._entries[job.key] = (stored, job.entries)
        self._note_cache_state(cache)


# ---------------------------------------------------------------------- helpers
def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _num_layers(cfg: dict[str, Any]) -> int:
    return int(cfg.get("num_hidden_layers", cfg.get("n_layer", 0)))


def read_config(path: Path, name: str) -> dict[str, Any]:
    """A checkpoint's config.json, ``text_config`` merged in (multimodal configs)."""
    from .models import read_config as read

    data = read(path, name=name)
    inner = data.get("text_config")
    return {**data, **inner} if isinstance(inner, dict) else data


def resolve_trace_path(spec: str | Path, toy_root: Path, which: str = "a") -> Path:
    """A trace-set file: ``"toy"`` builds (once) and returns the toy set ``which``."""
    if str(spec) == "toy":
        from reasondiff.fixtures.toy_traces import ensure_toy_traces

        return Path(ensure_toy_traces(toy_root, which))
    return Path(spec).expanduser()
