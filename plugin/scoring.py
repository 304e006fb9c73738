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
            with progress_for(
                "compare", len(traces.traces), subject=subject, unit="traces"
            ) as step:
                for trace in traces.traces:
                    todo = [w for w in live if w.error is None and self._missing(w, trace, layers)]
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

    def _score_trace(
        self,
        base: ModelSpec,
        base_dir: Path,
        todo: list[_Work],
        trace: Trace,
        layers: list[int],
        L: int,
    ) -> None:
        """Every layer of one trace: the base side prepared once, each descendant scored."""
        from .metrics.layer import prepare_base_layer, score_layer

        refs = [ModelRef("base", base, base_dir)]
        refs += [ModelRef(w.job.key, w.job.pair.descendant, w.job.desc_dir) for w in todo]
        errors: dict[str, Exception] = {}
        k, form, med = self.config.dominant_k, self._form(), self.config.rbf_median
        for lay, states in self.source(trace, refs, layers, L, errors):
            for w in todo:
                if w.error is None and w.job.key in errors:
                    w.error = errors[w.job.key]
            with self.log.stage("metrics"):
                per_job: dict[str, dict[str, Any]] = {}
                for kind in states["base"]:
                    label = "" if kind == "hidden" else f"{kind} "
                    where = f"{label}layer {lay}, trace {trace.id}"
                    side = prepare_base_layer(
                        states["base"][kind], name=f"{base.key} {where}", k=k, form=form
                    )
                    for w in todo:
                        if w.error is not None:
                            continue
                        try:
                            entry = score_layer(
                                side,
                                states[w.job.key][kind],
                                k=k,
                                name=f"{w.job.pair.descendant.key} {where}",
                                rbf_median=med,  # type: ignore[arg-type]
                                form=form,
                            )
                        except Exception as exc:
                            w.error = exc
                            continue
                        if kind == "hidden":
                            per_job[w.job.key] = entry
                        else:
                            for m in ("linear", "rbf", "linear_without_dominant"):
                                per_job[w.job.key]["metrics"][f"{m}_{kind}"] = entry["metrics"][m]
                    del side
                for w in todo:
                    if w.error is None:
                        stored = self.store.put(w.job.key, trace.id, lay, per_job[w.job.key])
                        w.entries.setdefault(trace.id, {})[lay] = stored
            del states
        for w in todo:  # a forward that failed after the last layer was handed out
            if w.error is None and w.job.key in errors:
                w.error = errors[w.job.key]

    def _form(self) -> Form:
        """N x N Gram matrices on a GPU (shared base kernels); today's auto form on CPU."""
        return "gram" if self.pool.device.startswith("cuda") else "auto"
