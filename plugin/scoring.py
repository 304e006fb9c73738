"""The scoring pass: one base and the descendants a process claimed, on one trace set.

Per trace the pass asks its hidden-state source (:mod:`reasondiff.hidden_states`) for
each layer of every model, prepares the base's side of the layer once
(:func:`reasondiff.metrics.layer.prepare_base_layer`) and scores each descendant against
it (:func:`~reasondiff.metrics.layer.score_layer`). Entries go to the metric store as they
are made, each pair's manifest last. The pass returns what it finished and the error of
every pair it could not: no state is left behind for the caller to read back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ReasondiffError
from .hidden_states import HiddenSource, ModelRef
from .metric_store import Entries, Found, MetricStore
from .registry import ModelSpec, PairSpec
from .runlog import RunLog

if TYPE_CHECKING:
    from .engine_config import EngineConfig, TraceSource
    from .metrics.layer import Form
    from .model_pool import ModelPool
    from .traces import Trace, TraceSet


@dataclass(frozen=True)
class Job:
    """One claimed pair of a pass: its metric-cache key and its descendant's dir."""

    pair: PairSpec
    key: str
    desc_dir: Path


@dataclass
class PassOutcome:
    """What a pass made: (manifest, entries) per finished pair key, the error per failed one."""

    found: dict[str, Found] = field(default_factory=dict)
    errors: dict[str, Exception] = field(default_factory=dict)


@dataclass
class _Work:
    """A job's progress inside the pass."""

    job: Job
    traces: TraceSet | None = None
    notes: list[str] = field(default_factory=list)
    entries: Entries = field(default_factory=dict)
    error: Exception | None = None


class ScoringPass:
    """Scores descendants of one base against it; see the module docstring."""

    def __init__(
        self,
        config: EngineConfig,
        pool: ModelPool,
        store: MetricStore,
        log: RunLog,
        source: HiddenSource,
    ) -> None:
        self.config = config
        self.pool = pool
        self.store = store
        self.log = log
        self.source = source

    def run(
        self, base: ModelSpec, jobs: Sequence[Job], src: TraceSource, layers: list[int], L: int
    ) -> PassOutcome:
        """Score ``jobs`` on every trace of ``src``; manifests written for the finished."""
        from .progress import progress_for

        base_dir = self.pool.resolve(base)
        work = [_Work(job) for job in jobs]
        traces = self._token_ids(base, base_dir, work, src)
        live = [w for w in work if w.error is None]
        if live and traces is not None:
            names = ", ".join(w.job.pair.descendant.key for w in live)
            subject = f"{base.key} vs {names} [{src.name}]"
            if self._streaming(base, base_dir, live):
                with progress_for("compare", len(layers), subject=subject, unit="layers") as step:
                    self._score_streamed(base, base_dir, live, traces, layers, step)
            else:
                with progress_for(
                    "compare", len(traces.traces), subject=subject, unit="traces"
                ) as step:
                    for trace in traces.traces:
                        todo = [
                            w for w in live if w.error is None and self._missing(w, trace, layers)
                        ]
                        if todo:
                            self._score_trace(base, base_dir, todo, trace, layers, L)
                        step(trace.id)
        outcome = PassOutcome()
        for w in work:
            if w.error is not None:
                outcome.errors[w.job.key] = w.error
                continue
            assert w.traces is not None
            manifest = {"traces": [t.id for t in w.traces.traces], "notes": w.notes}
            outcome.found[w.job.key] = self.store.complete(w.job.key, manifest, w.entries)
        self.store.note_state()
        return outcome

    def _token_ids(
        self, base: ModelSpec, base_dir: Path, work: list[_Work], src: TraceSource
    ) -> TraceSet | None:
        """Token ids every model of the pass sees (identical by construction), per job."""
        from .traces import token_ids_for_pair, truncate

        chosen: TraceSet | None = None
        for w in work:
            dname = w.job.pair.descendant.key
            try:
                with self.log.stage("tokenize"):
                    bcfg = self.pool.read_config(base_dir, base.key)
                    dcfg = self.pool.read_config(w.job.desc_dir, dname)
                    ids, retokenized = token_ids_for_pair(
                        src.trace_set,
                        self.pool.tokenizer(base_dir),
                        self.pool.tokenizer(w.job.desc_dir),
                        base_name=base.key,
                        desc_name=dname,
                        vocab_size_base=int(bcfg.get("vocab_size", 0)) or None,
                        vocab_size_desc=int(dcfg.get("vocab_size", 0)) or None,
                    )
                    truncated, notes = truncate(ids, self.config.max_tokens)
            except Exception as exc:
                w.error = exc
                continue
            if chosen is None:
                chosen = truncated
            elif [t.token_ids for t in truncated.traces] != [t.token_ids for t in chosen.traces]:
                w.error = ReasondiffError(
                    f"{w.job.pair.pair_id}: token ids differ from those of the other "
                    f"descendants of {base.key} on trace set {src.name}"
                )
                continue
            w.traces = truncated
            w.notes = [*retokenized, *notes]
        return chosen

    def _missing(self, w: _Work, trace: Trace, layers: list[int]) -> bool:
        """Take this trace's entries from the cache when all are there; True if any miss."""
        have = self.store.trace_entries(w.job.key, trace.id, layers)
        if have is None:
            return True
        w.entries[trace.id] = have
        return False

    # ------------------------------------------------------------------ block-streamed
    def _streaming(self, base: ModelSpec, base_dir: Path, live: Sequence[_Work]) -> bool:
        """Whether this pass streams blocks: ``stream_blocks``, or its models (those not
        loaded yet) do not fit the memory budget. A model that cannot stream (architecture,
        pickle weights) keeps the pass whole; each decision is a run note."""
        dirs = [(base.key, base_dir)]
        dirs += [(w.job.pair.descendant.key, w.job.desc_dir) for w in live]
        if self.config.stream_blocks:
            why = "--stream-blocks"
        else:
            budget = self.pool.memory_budget()
            need = sum(self.pool.model_bytes(d) for k, d in dirs if not self.pool.is_loaded(k))
            if budget is None or need <= budget:
                return False
            why = (
                f"the models of the pass over {base.key} ({_gib(need)}) do not fit the "
                f"memory budget ({_gib(budget)})"
            )
        blocker = stream_blocker(self.pool, dirs)
        if blocker is not None:
            key, reason = blocker
            self.log.note(f"not streaming blocks ({why}): model {key}: {reason}")
            return False
        self.log.note(f"streaming blocks: {why}")
        if self.config.keep_activations:
            self.log.note("--keep-activations: streamed passes do not store hidden states")
        return True

    def _score_streamed(
        self,
        base: ModelSpec,
        base_dir: Path,
        live: Sequence[_Work],
        traces: TraceSet,
        layers: list[int],
        step: Any,
    ) -> None:
        """Block-major over every trace of the pass (:func:`reasondiff.streaming.stream_layers`):
        each checkpoint read once, each yielded layer scored for every (descendant, trace)
        by :meth:`_score_layer` as the whole pass does, into the same entries. A failure of
        the stream itself (a checkpoint, a forward) fails every pair of the pass."""
        from .activations import FORWARD_COUNTER
        from .streaming import StreamModel, stream_layers

        need: list[tuple[Trace, list[_Work]]] = []
        for trace in traces.traces:
            todo = [w for w in live if w.error is None and self._missing(w, trace, layers)]
            if todo:
                need.append((trace, todo))
        works = [w for w in live if any(w is x for _, todo in need for x in todo)]
        if not works:
            return
        self.pool.release()  # whole models of earlier passes: what streaming saves
        models = [StreamModel("base", base_dir)]
        models += [StreamModel(w.job.key, w.job.desc_dir) for w in works]
        before = FORWARD_COUNTER.count
        layer_iter = stream_layers(
            models,
            [list(trace.token_ids) for trace, _ in need],
            layers=layers,
            device=self.pool.device,
            dtype=self.config.dtype,
        )
        prenorm: dict[int, dict[str, dict[str, Any]]] = {}  # trace index -> scores of prenorm.L
        try:
            while True:
                with self.log.stage("forwards"):
                    got = next(layer_iter, None)
                if got is None:
                    break
                with self.log.stage("metrics"):
                    for t, (trace, todo) in enumerate(need):
                        scored = self._score_layer(
                            base,
                            todo,
                            trace.id,
                            got.layer,
                            got.kind,
                            got.states["base"][t],
                            {w.job.key: got.states[w.job.key][t] for w in todo},
                        )
                        if got.kind == "prenorm":
                            prenorm[t] = scored
                        else:
                            self._store_layer(
                                todo, trace.id, got.layer, scored, prenorm.pop(t, None)
                            )
                if got.kind == "hidden":
                    step(f"layer {got.layer}")
                del got
        except Exception as exc:
            for w in works:
                if w.error is None:
                    w.error = exc
        finally:
            layer_iter.close()
            done = FORWARD_COUNTER.count - before
            self.log.forwards += done
            self.log.stats.activations_computed += done

    # ------------------------------------------------------------------ whole models
    def _score_trace(
        self,
        base: ModelSpec,
        base_dir: Path,
        todo: list[_Work],
        trace: Trace,
        layers: list[int],
        L: int,
    ) -> None:
        """Every layer of one trace from the source, each scored by :meth:`_score_layer`."""
        refs = [ModelRef("base", base, base_dir)]
        refs += [ModelRef(w.job.key, w.job.pair.descendant, w.job.desc_dir) for w in todo]
        errors: dict[str, Exception] = {}
        for lay, states in self.source(trace, refs, layers, L, errors):
            for w in todo:
                if w.error is None and w.job.key in errors:
                    w.error = errors[w.job.key]
            with self.log.stage("metrics"):
                scored = {
                    kind: self._score_layer(
                        base,
                        todo,
                        trace.id,
                        lay,
                        kind,
                        states["base"][kind],
                        {k: h[kind] for k, h in states.items() if kind in h},
                    )
                    for kind in states["base"]
                }
                self._store_layer(todo, trace.id, lay, scored["hidden"], scored.get("prenorm"))
            del states
        for w in todo:  # a forward that failed after the last layer was handed out
            if w.error is None and w.job.key in errors:
                w.error = errors[w.job.key]

    def _score_layer(
        self,
        base: ModelSpec,
        todo: Sequence[_Work],
        trace_id: str,
        lay: int,
        kind: str,
        base_state: Any,
        states: dict[str, Any],
    ) -> dict[str, dict[str, Any]]:
        """One layer of one trace for every live descendant, the base side prepared once:
        job key -> entry. A descendant whose scoring fails gets the error and no entry.
        Both passes (whole and streamed) call this: one place for the per-layer scores."""
        from .metrics.layer import prepare_base_layer, score_layer

        k, form, med = self.config.dominant_k, self._form(), self.config.rbf_median
        label = "" if kind == "hidden" else f"{kind} "
        where = f"{label}layer {lay}, trace {trace_id}"
        side = prepare_base_layer(base_state, name=f"{base.key} {where}", k=k, form=form)
        out: dict[str, dict[str, Any]] = {}
        for w in todo:
            if w.error is not None:
                continue
            try:
                out[w.job.key] = score_layer(
                    side,
                    states[w.job.key],
                    k=k,
                    name=f"{w.job.pair.descendant.key} {where}",
                    rbf_median=med,  # type: ignore[arg-type]
                    form=form,
                )
            except Exception as exc:
                w.error = exc
        del side
        return out

    def _store_layer(
        self,
        todo: Sequence[_Work],
        trace_id: str,
        lay: int,
        hidden: dict[str, dict[str, Any]],
        prenorm: dict[str, dict[str, Any]] | None,
    ) -> None:
        """Put each live descendant's entry of (trace, layer), the prenorm metrics (layer L)
        merged into the hidden entry, in the metric store."""
        for w in todo:
            if w.error is not None:
                continue
            entry = hidden[w.job.key]
            if prenorm is not None:
                for m in ("linear", "rbf", "linear_without_dominant"):
                    entry["metrics"][f"{m}_prenorm"] = prenorm[w.job.key]["metrics"][m]
            stored = self.store.put(w.job.key, trace_id, lay, entry)
            w.entries.setdefault(trace_id, {})[lay] = stored

    def _form(self) -> Form:
        """N x N Gram matrices on a GPU (shared base kernels); today's auto form on CPU."""
        return "gram" if self.pool.device.startswith("cuda") else "auto"


def stream_blocker(pool: ModelPool, dirs: Sequence[tuple[str, Path]]) -> tuple[str, str] | None:
    """The first model of ``dirs`` (``(key, dir)``) that cannot be block-streamed and why,
    or None when all can. One rule for the pass's decision and the scheduler's claim, so
    a claim sized for a streamed pass is never run whole."""
    from .models import checkpoint_files
    from .streaming import supports_streaming

    for key, path in dirs:
        ok, reason = supports_streaming(pool.read_config(path, key))
        if ok and checkpoint_files(path, allow_pickle=True, name=key).format != "safetensors":
            ok, reason = False, "pickle weights cannot be read block by block"
        if not ok:
            return key, reason
    return None


def streamed_pass_bytes(
    pool: ModelPool, dirs: Sequence[tuple[str, Path]], token_counts: Sequence[int]
) -> int:
    """What a streamed pass over ``dirs`` holds at most (:func:`reasondiff.streaming.memory_bound`
    at the pass's widest dtype): the scheduler claims descendants by this, not by whole
    model sizes, when the pass will stream."""
    from .models import torch_dtype
    from .streaming import memory_bound

    configs = [pool.read_config(path, key) for key, path in dirs]
    dtypes = [torch_dtype(pool.dtype_for(path)) for _, path in dirs]
    widest = max(dtypes, key=lambda d: d.itemsize)
    return memory_bound(configs, token_counts, dtype=widest).total


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
