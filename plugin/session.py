"""DiffSession: the one owner of a pytest process's run state.

It knows which pairs are selected (registry group, ad-hoc pair or results bundle),
records the verdicts the finding tests hand back, merges xdist workers' output and
builds the report data. The work itself - models, forwards, metrics, caches - is the
engine's (:mod:`reasondiff.engine`, no pytest inside); with ``--from-results`` the
session only serves what the bundle holds (no torch import at all).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .engine import Engine, EngineConfig
from .errors import ReasondiffError, RegistryError
from .options import DiffOptions
from .records import CacheStats, Curve, PairResult, ReportData, Verdict
from .registry import ModelSpec, PairSpec, Registry, adhoc_pair, slug

if TYPE_CHECKING:
    from .bundle import Bundle


@dataclass(frozen=True)
class GroupSubject:
    """A base and its selected descendants: the subject of a group-level finding."""

    base: ModelSpec
    pairs: tuple[PairSpec, ...]
    expect: dict[str, bool] = field(default_factory=dict, hash=False, compare=False)

    @property
    def subject(self) -> str:
        """``base:<key>``: the test id and the Verdict subject."""
        return f"base:{slug(self.base.key)}"


class DiffSession:
    """Run state of one pytest process (controller, worker or plain)."""

    def __init__(
        self,
        options: DiffOptions,
        registry: Registry,
        *,
        worker: str | None = None,
        worker_count: int | None = None,
        bundle: Bundle | None = None,
    ) -> None:
        self.options = options
        self.worker_count = worker_count
        self.registry = registry
        self.worker = worker
        self.bundle = bundle
        self.verdicts: dict[tuple[str, str], Verdict] = {}
        self.results: dict[str, PairResult] = {}
        # The engine does the work (lazily: creating it imports nothing heavy); its
        # counters are the session's, so worker merges and the report see one set.
        self.engine = Engine(
            EngineConfig.from_options(options),
            trace_paths=self._trace_paths,
            worker_count=worker_count,
        )
        self.stats = self.engine.stats
        self.stage_seconds = self.engine.stage_seconds
        self.notes = self.engine.notes
        self._curves: dict[tuple[str, str | None], dict[str, Curve]] = {}
        self._bundle_results: dict[str, PairResult] = {}
        #: Every selected pair before ``--shard`` (the other shards judge the rest).
        self.all_pairs: list[PairSpec] = self._select_pairs()
        self.pairs: list[PairSpec] = self.all_pairs
        if options.shard is not None:
            from .sharding import shard_pairs

            self.pairs = shard_pairs(
                self.all_pairs, [p.base.key for p in self.all_pairs], options.shard
            )

    # ------------------------------------------------------------------ set-up
    @classmethod
    def create(
        cls,
        options: DiffOptions,
        *,
        worker: str | None = None,
        worker_count: int | None = None,
        bundle: Bundle | None = None,
    ) -> DiffSession:
        """Load the registry and check the group; raises ``RegistryError`` with choices."""
        registry = Registry.load(list(options.registry))
        known = registry.groups
        if not options.adhoc and not options.from_results and options.model_group not in known:
            raise RegistryError(
                f"--model-group {options.model_group!r} is not a registry group; "
                f"choose one of: {', '.join(sorted(known))}"
            )
        return cls(options, registry, worker=worker, worker_count=worker_count, bundle=bundle)

    def preflight(self) -> list[str]:
        """A live run's up-front checks (:func:`reasondiff.preflight.check_run`), once per
        run before any model is loaded; returns the warnings to show before it starts."""
        from .preflight import check_run

        o = self.options
        return check_run(
            layers=o.layers,
            dominant_k=o.dominant_k,
            max_tokens=o.max_tokens,
            pairs=self.pairs,
            trace_paths=self._trace_paths,
            toy_root=lambda: self.engine.toy_root,
        )

    def _select_pairs(self) -> list[PairSpec]:
        o = self.options
        if self.bundle is not None:
            return self._pairs_from_bundle(self.bundle)
        if o.adhoc:
            assert o.base is not None and o.candidate is not None
            return [adhoc_pair(o.base, o.candidate, label=o.label, method=o.method)]
        return self.registry.pairs(o.model_group)

    def _pairs_from_bundle(self, bundle: Bundle) -> list[PairSpec]:
        """Match bundle pairs to the registry (by key or hub id) to get its expectations.

        A matched pair takes the registry's pair id (so tests and snapshots line up with
        live runs); an unmatched one keeps the bundle's id and has no expectations.
        """
        pairs: list[PairSpec] = []
        for result in bundle.results:
            info = result.info
            base = self._match_model(info.base, info.base_source)
            desc = self._match_model(info.descendant, info.descendant_source)
            if base is not None and desc is not None and desc.base == base.key:
                group = (
                    info.group
                    if info.group in desc.groups
                    else (desc.groups[0] if desc.groups else None)
                )
                spec = PairSpec(base=base, descendant=desc, group=group)
            else:
                b = ModelSpec(key=info.base, source=info.base_source)
                d = ModelSpec(
                    key=info.descendant,
                    source=info.descendant_source,
                    base=b.key,
                    method=info.method,
                )
                spec = PairSpec(base=b, descendant=d, group=info.group)
                if spec.pair_id != info.pair_id:  # e.g. a --label series: keep its id
                    spec = replace(spec, label=info.pair_id)
            new_info = replace(
                info,
                pair_id=spec.pair_id,
                group=spec.group,
                method=spec.method if spec.method is not None else info.method,
                expect=spec.expect,
            )
            self._bundle_results[spec.pair_id] = replace(result, info=new_info)
            pairs.append(spec)
        return pairs

    def _match_model(self, key: str, source: str) -> ModelSpec | None:
        """A bundle's model in the registry: by key first, then by hub id / source."""
        if key in self.registry.models:
            return self.registry.models[key]
        return self.registry.find_by_source(source)

    # ------------------------------------------------------------------ queries
    def group_subjects(self) -> list[GroupSubject]:
        """Each base of the selected pairs with its descendants, in a stable order."""
        by_base: dict[str, list[PairSpec]] = {}
        bases: dict[str, ModelSpec] = {}
        for p in self.pairs:
            by_base.setdefault(p.base.key, []).append(p)
            bases[p.base.key] = p.base
        out = []
        for key in sorted(by_base):
            pairs = tuple(by_base[key])
            expect: dict[str, bool] = {}
            groups = {p.group for p in pairs}
            if len(groups) == 1 and None not in groups:
                (gname,) = groups
                assert gname is not None
                if gname in self.registry.groups:
                    expect = dict(self.registry.groups[gname].expect)
            out.append(GroupSubject(base=bases[key], pairs=pairs, expect=expect))
        return out

    def snapshot_scope(self) -> str:
        """The snapshot scopes this run judges (``reasondiff.snapshots.run_snapshot_scope``)."""
        from .snapshots import run_snapshot_scope

        return run_snapshot_scope(self.options, self.pairs)

    def snapshot_extension(self, pair: PairSpec) -> type | None:
        """``pair``'s curve extension in its scope (``reasondiff.snapshots.curve_extension``)."""
        from .snapshots import curve_extension

        return curve_extension(
            self.options,
            pair,
            selected=self.pairs,
            registry=self.registry,
            other_shards=[p for p in self.all_pairs if p not in self.pairs],
        )

    def shard_note(self) -> str | None:
        """What ``--shard`` selected (None without it); says so when the shard is empty."""
        shard = self.options.shard
        if shard is None:
            return None
        if not self.pairs:
            return (
                f"--shard {shard}: this shard holds none of the {len(self.all_pairs)} selected "
                f"pairs ({shard.count} shards > {len(self.all_pairs)} pairs); nothing to run"
            )
        return f"--shard {shard}: {len(self.pairs)} of {len(self.all_pairs)} selected pairs"

    def record_verdict(self, verdict: Verdict) -> None:
        """Keep the latest verdict per (finding, subject) for the report and bundle."""
        self.verdicts[(verdict.finding, verdict.subject)] = verdict

    # ------------------------------------------------------------------ results
    def stage(self, name: str) -> AbstractContextManager[None]:
        """Add the wall time of the block to ``stage_seconds[name]``."""
        return self.engine.stage(name)

    def pair_result(self, pair: PairSpec) -> PairResult:
        """All measurements of one pair, from the bundle or the engine (memoized there).

        The engine may compute the pair's selected siblings (same base) in the same
        pass: one base forward per trace for all of them.
        """
        pid = pair.pair_id
        if pid in self.results:
            return self.results[pid]
        if self.bundle is not None:
            if pid not in self._bundle_results:
                raise ReasondiffError(
                    f"pair {pid} is not in the results bundle "
                    f"{' '.join(self.options.from_results or ())}"
                )
            self.results[pid] = self._bundle_results[pid]
            return self.results[pid]
        self.results[pid] = self.engine.pair_result(pair, self.pairs)
        return self.results[pid]

    def curves(self, result: PairResult, trace_set: str | None = None) -> dict[str, Curve]:
        """Per-metric curves (mean over traces + bootstrap interval) of one trace set.

        ``trace_set=None`` means the primary set (the first of ``result.trace_sets``).
        """
        name = (
            trace_set
            if trace_set is not None
            else (result.trace_sets[0] if result.trace_sets else None)
        )
        key = (result.info.pair_id, name)
        if key not in self._curves:
            from .metrics.aggregate import curves_from_rows

            self._curves[key] = curves_from_rows(
                result.cka, trace_set=name, n_boot=self.options.bootstrap, seed=0
            )
        return self._curves[key]

    # ------------------------------------------------------------------ traces
    def _trace_paths(self) -> list[Path]:
        """The primary trace set (and the alternative one) for this run."""
        from .diskcheck import toy_root as toy_root_of
        from .engine import resolve_trace_path
        from .trace_choice import trace_specs

        primary_spec, alt_spec = trace_specs(self.options, self.registry, self.pairs)
        toy_root = toy_root_of(self.options.cache_dir())
        paths = [resolve_trace_path(primary_spec, toy_root, "a")]
        if alt_spec is not None:
            paths.append(resolve_trace_path(alt_spec, toy_root, "b"))
        return paths

    # ------------------------------------------------------------------ xdist merge / report
    def merge(
        self,
        results: list[PairResult],
        verdicts: list[Verdict],
        stats: CacheStats,
        stage_seconds: dict[str, float],
        notes: list[str],
    ) -> None:
        """Fold a worker's output into this (controller) session."""
        for r in results:
            self.results.setdefault(r.info.pair_id, r)
        for verdict in verdicts:
            self.record_verdict(verdict)
        self.stats.merge(stats)
        for k, v in stage_seconds.items():
            self.stage_seconds[k] = self.stage_seconds.get(k, 0.0) + v
        for n in notes:
            if n not in self.notes:
                self.notes.append(n)

    def ordered_results(self) -> list[PairResult]:
        """Results in the selected pairs' order (then any extra, by id)."""
        order = {p.pair_id: i for i, p in enumerate(self.pairs)}
        return sorted(
            self.results.values(),
            key=lambda r: (order.get(r.info.pair_id, len(order)), r.info.pair_id),
        )

    def ordered_verdicts(self) -> list[Verdict]:
        return sorted(self.verdicts.values(), key=lambda v: (v.subject, v.finding))

    def report_data(self) -> ReportData:
        """Everything the reports render (:func:`reasondiff.report_data.build_report_data`)."""
        from .options import rbf_median_note
        from .report_data import build_report_data

        rbf_note = rbf_median_note(self.options, self.bundle.config if self.bundle else None)
        return build_report_data(
            self.ordered_results(),
            self.ordered_verdicts(),
            curves=self.curves,
            cache=self.stats,
            stage_seconds=self.stage_seconds,
            notes=[*self.notes, *([rbf_note] if rbf_note is not None else [])],
        )
