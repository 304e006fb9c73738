"""The comparison engine: config, memo and result assembly, with no pytest inside.

:class:`Engine` turns a base/descendant :class:`~reasondiff.registry.PairSpec` into a
:class:`~reasondiff.records.PairResult` (weight-diff records and per-(trace, layer) CKA
rows). The pytest session asks it for one pair at a time; :func:`compare` is the same
work as a plain function for notebooks and scripts.

Its rooms, one job each: :mod:`~reasondiff.model_pool` (runtime, checkpoints, models,
tokenizers), :mod:`~reasondiff.scheduler` (claims and waits under xdist),
:mod:`~reasondiff.scoring` (the pass, fed by :mod:`~reasondiff.hidden_states`) and
:mod:`~reasondiff.metric_store` (the metric cache). How work is shared (METHODS §11):
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

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any

from .engine_config import EngineConfig, TraceSource
from .errors import ReasondiffError
from .hidden_states import HiddenSource, WholeModelForwards
from .metric_store import Entries, MetricStore, cache_key, rbf_median_key, rows_from_entry
from .model_pool import ModelPool
from .records import PairInfo, PairResult, WeightRecord, weight_from_row, weight_to_row
from .registry import ModelSpec, PairSpec, slug
from .runlog import RunLog
from .scheduler import Scheduler
from .scoring import Job, PassOutcome, ScoringPass
from .tokens import TokenNamer
from .traces import generator_note

#: Builds a pass's hidden-state source from the engine's config, model pool and log
#: (:class:`~reasondiff.hidden_states.WholeModelForwards` by default).
SourceFactory = Callable[[EngineConfig, ModelPool, RunLog], HiddenSource]

__all__ = ["Engine", "EngineConfig", "Entries", "TraceSource", "resolve_trace_path"]

#: Bump when the rows computed per (pair, trace, layer) change meaning: it keys the cache.
METRICS_VERSION = "2"  # 2: stored token ids authoritative (results of re-tokenized sets differ)
#: Bump when the weight-diff records change meaning.
WEIGHTS_VERSION = "2"  # 2: float32 block sums accumulated in float64


class Engine:
    """Turns pairs into :class:`~reasondiff.records.PairResult` s (memoized, errors too).

    The engine keeps the config, the memo and the result assembly; the work is done by
    its rooms: :class:`~reasondiff.model_pool.ModelPool` (runtime, checkpoints, models),
    :class:`~reasondiff.scheduler.Scheduler` (claims and waits under xdist),
    :class:`~reasondiff.scoring.ScoringPass` (forwards and per-layer scores, fed by a
    :mod:`hidden-state source <reasondiff.hidden_states>`) and
    :class:`~reasondiff.metric_store.MetricStore` (the metric cache). ``trace_paths`` are
    the trace set files (primary first), or a callable giving them on first use (so
    choosing the toy traces does not build anything until needed). ``hidden_source``
    builds the source of hidden states (e.g. a block-streamed one) from the config, the
    model pool and the run log.
    """

    def __init__(
        self,
        config: EngineConfig,
        *,
        trace_paths: Sequence[Path] | Callable[[], Sequence[Path]],
        worker_count: int | None = None,
        hidden_source: SourceFactory = WholeModelForwards,
    ) -> None:
        self.config = config
        self.worker_count = worker_count
        self.log = RunLog()
        self.stats = self.log.stats
        self.stage_seconds = self.log.stage_seconds
        self.notes = self.log.notes
        self.pool = ModelPool(config, self.log, worker_count=worker_count)
        self.store = MetricStore(config.cache_dir, self.log)
        self.scheduler = Scheduler(
            config, self.pool, self.store, worker_count=worker_count, settled=self._settled
        )
        source = hidden_source(config, self.pool, self.log)
        self.scoring = ScoringPass(config, self.pool, self.store, self.log, source)
        self._trace_paths = trace_paths
        self._sources: list[TraceSource] | None = None
        self._results: dict[str, PairResult] = {}
        self._failures: dict[str, Exception] = {}
        self._weights_cache: Any = None
        self._namers: dict[tuple[str, str], tuple[TokenNamer, str | None]] = {}

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

    def trace_hashes(self) -> dict[str, str]:
        """``{trace set name: content hash}`` (ids and token ids, as the cache keys use):
        the bundle records it so a merge refuses shards that measured different traces
        under one name. Empty when the trace sets cannot be read."""
        from .traces import trace_set_hash

        try:
            return {src.name: trace_set_hash(src.trace_set) for src in self.sources()}
        except (ReasondiffError, OSError, ValueError):  # the pairs' own errors say why
            return {}

    @property
    def forwards(self) -> int:
        """Model forwards run by this engine (all passes)."""
        return self.log.forwards

    def stage(self, name: str) -> AbstractContextManager[None]:
        """Add the wall time of the block to ``stage_seconds[name]``."""
        return self.log.stage(name)

    def release_models(self) -> None:
        """Drop every loaded model (frees host / device memory)."""
        self.pool.release()

    # The pool's facts, under the names callers and tests have used.
    @property
    def device(self) -> str:
        return self.pool.device

    @property
    def toy_root(self) -> Path:
        return self.pool.toy_root

    def fingerprint(self, path: Path) -> str:
        return self.pool.fingerprint(path)

    def dtype_for(self, model_dir: Path) -> str:
        return self.pool.dtype_for(model_dir)

    def model_bytes(self, path: Path) -> int:
        return self.pool.model_bytes(path)

    def _resolve(self, spec: ModelSpec) -> Path:
        return self.pool.resolve(spec)

    # ------------------------------------------------------------------ one pair
    def _settled(self, pair_id: str) -> bool:
        return pair_id in self._results or pair_id in self._failures

    def _compute_pair(self, pair: PairSpec, siblings: Sequence[PairSpec]) -> PairResult:
        self.pool.configure_torch()
        base_dir = self._resolve(pair.base)
        desc_dir = self._resolve(pair.descendant)
        bname, dname = pair.base.key, pair.descendant.key
        self.pool.check_pair(base_dir, desc_dir, base=bname, desc=dname)
        num_layers = self.pool.num_layers(desc_dir, dname)
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
            result.notes.append(generator_note(src.name, src.trace_set))

            manifest, entries = self.scheduler.entries(
                pair,
                mates,
                partial(self._key_on, src),
                layers,
                partial(self._run_pass, pair, src, layers, num_layers),
                self._token_counts(src),
            )
            namer = self._token_namer(pair, src, result.notes)
            for tid in manifest["traces"]:
                name = namer.for_trace(tid)
                for lay in layers:
                    rows_from_entry(entries[tid][lay], pair, f"{src.name}:{tid}", lay, result, name)
            for note in manifest["notes"]:
                msg = f"{pair.pair_id} [{src.name}]: {note}"
                if msg not in result.notes:
                    result.notes.append(msg)
        self.pool.keep_only(pair.base.key)
        return result

    def _token_namer(self, pair: PairSpec, src: TraceSource, notes: list[str]) -> TokenNamer:
        """Names the tokens at the positions the cache entries give (issue 18.3).

        The ids are those the pair was scored on: the set's stored ids, checked against
        the base's tokenizer (re-tokenized only where the pass re-tokenized them), cut at
        ``max_tokens``; the descendant only ever sees the same ids. Each id is decoded on
        its own with the base's tokenizer. One namer per (base, trace set): a warm run
        loads a tokenizer and no model. If the tokens cannot be read, the rows are kept
        unnamed (id -1) with a note.
        """
        key = (pair.base.key, src.name)
        if key not in self._namers:
            self._namers[key] = self._read_tokens(pair, src)
        namer, problem = self._namers[key]
        if problem is not None:
            notes.append(
                f"{pair.pair_id} [{src.name}]: dominant and massive tokens not named: {problem}"
            )
        return namer

    def _read_tokens(self, pair: PairSpec, src: TraceSource) -> tuple[TokenNamer, str | None]:
        """The namer of :meth:`_token_namer`, or an unnamed one and the reason."""
        from .traces import token_ids_for_pair, truncate

        try:
            with self.stage("tokenize"):
                tok = self.pool.tokenizer(self._resolve(pair.base))
                if tok is None:
                    raise ReasondiffError(f"{pair.base.key} ships no tokenizer")
                ids, _ = token_ids_for_pair(
                    src.trace_set,
                    tok,
                    None,  # the descendant sees the same ids; its check was the pass's
                    base_name=pair.base.key,
                    desc_name=pair.descendant.key,
                    vocab_size_base=None,
                    vocab_size_desc=None,
                )
                ids, _ = truncate(ids, self.config.max_tokens)
        except Exception as exc:  # rows stay usable; the notes say why tokens are unnamed
            return TokenNamer.unnamed(), str(exc)

        def decode(token_ids: list[int]) -> str:
            return str(tok.decode(token_ids, skip_special_tokens=False))

        return TokenNamer({t.id: t.token_ids for t in ids.traces}, decode), None

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

        if self._weights_cache is None:
            from .cache import JsonCache

            self._weights_cache = JsonCache(self.config.cache_dir, "weightdiff")
        rows = self._weights_cache.get_or_compute(key, compute)
        self.log.cache_state(self._weights_cache)
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

    def _token_counts(self, src: TraceSource) -> list[int]:
        """Tokens per trace after ``--max-tokens``: the estimate a streamed pass's memory
        bound is claimed by (re-tokenization for another tokenizer may shift it a little)."""
        cap = self.config.max_tokens
        return [min(len(t), cap) if cap else len(t) for t in src.trace_set.traces]

    def _key_on(self, src: TraceSource, pair: PairSpec) -> str:
        return self.pair_key(pair, src)

    def _run_pass(
        self, pair: PairSpec, src: TraceSource, layers: list[int], num_layers: int, jobs: list[Job]
    ) -> PassOutcome:
        """One scoring pass over ``jobs`` (claimed for ``pair``'s base) on ``src``."""
        return self.scoring.run(pair.base, self._compatible(pair, jobs), src, layers, num_layers)

    def _compatible(self, pair: PairSpec, jobs: list[Job]) -> list[Job]:
        """Jobs whose configs match the base: the requested pair was checked in
        :meth:`_compute_pair`; a sibling is checked here, and one that fails is dropped
        (its own test reports the mismatch)."""
        out = []
        base_dir = self._resolve(pair.base)
        for job in jobs:
            if job.pair.pair_id != pair.pair_id:
                try:
                    self.pool.check_pair(
                        base_dir,
                        job.desc_dir,
                        base=pair.base.key,
                        desc=job.pair.descendant.key,
                    )
                except Exception:
                    continue
            out.append(job)
        return out


# ---------------------------------------------------------------------- helpers
def resolve_trace_path(spec: str | Path, toy_root: Path, which: str = "a") -> Path:
    """A trace-set file: ``"toy"`` builds (once) and returns the toy set ``which``."""
    if str(spec) == "toy":
        from reasondiff.fixtures.toy_traces import ensure_toy_traces

        return Path(ensure_toy_traces(toy_root, which))
    return Path(spec).expanduser()
