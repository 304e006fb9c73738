"""DiffSession: the one owner of a pytest process's run state.

It knows which pairs are selected, owns the caches and the loaded models, and turns a
``PairSpec`` into a ``PairResult`` (lazily, memoized). It never decides a verdict: the
finding tests in ``diffs/`` do, and hand their ``Verdict``s back to be recorded here for
the report and the bundle.

The order of work for one pair is chosen so that a warm rerun touches neither models
nor activations: the per-(trace, layer) metric entries of the ``JsonCache`` are checked
first; only the traces that miss are tokenized, and a model is loaded only when an
activation is not in the ``ActivationCache``. Each (model, trace) gets one forward, shared
by every pair that uses that model. With ``--from-results`` the session only serves what
the bundle holds (no torch import at all).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ReasondiffError, RegistryError
from .options import DiffOptions
from .records import (
    CacheStats,
    CkaRecord,
    Curve,
    MassiveRecord,
    PairInfo,
    PairResult,
    ReportData,
    Verdict,
    WeightRecord,
)
from .registry import ModelSpec, PairSpec, Registry, adhoc_pair, slug

if TYPE_CHECKING:
    from .bundle import Bundle
    from .traces import Trace, TraceSet

#: Bump when the rows computed per (pair, trace, layer) change meaning: it keys the cache.
METRICS_VERSION = "1"
#: Bump when the weight-diff records change meaning.
WEIGHTS_VERSION = "2"  # 2: float32 block sums accumulated in float64


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


@dataclass
class _TraceSource:
    name: str
    path: Path
    trace_set: TraceSet


class _Miss(Exception):
    """Raised inside a cache compute callback to peek without computing."""


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
        self.stats = CacheStats()
        self.stage_seconds: dict[str, float] = {}
        self.notes: list[str] = []
        self._failures: dict[str, Exception] = {}
        self._curves: dict[tuple[str, str | None], dict[str, Curve]] = {}
        self._models: dict[str, Any] = {}
        self._paths: dict[str, Path] = {}
        self._fingerprints: dict[Path, str] = {}
        self._trace_sources: list[_TraceSource] | None = None
        self._tokenizers: dict[Path, Any] = {}
        self._act_cache: Any = None
        self._json_caches: dict[str, Any] = {}
        self._bundle_results: dict[str, PairResult] = {}
        self._snapshot_ext: type | None = None
        self._torch_ready = False
        self.pairs: list[PairSpec] = self._select_pairs()

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
        """Folder under the snapshot dir: the model group, or ``labels`` for ad-hoc series."""
        if self.options.adhoc:
            return "labels"
        groups = {p.group for p in self.pairs}
        if len(groups) == 1:
            (g,) = groups
            return slug(g) if g else "labels"
        return "mixed"

    def snapshot_extension(self) -> type:
        """The tolerant curve extension, storing under ``__snapshots__/<scope>/``."""
        if self._snapshot_ext is None:
            from .snapshots import make_curve_extension

            base: Any = make_curve_extension(
                atol=self.options.curve_atol, rtol=self.options.curve_rtol
            )
            scope = self.snapshot_scope()

            class ScopedCurveExtension(base):  # type: ignore[misc,valid-type]
                @classmethod
                def dirname(cls, *, test_location: Any) -> str:
                    # <tests>/__snapshots__/<scope>/<test file>/: syrupy relates a file to
                    # its test by the parent folder's name, and discovers per scope.
                    default = Path(super().dirname(test_location=test_location))
                    return str(default.parent / scope / default.name)

            self._snapshot_ext = ScopedCurveExtension
        return self._snapshot_ext

    def record_verdict(self, verdict: Verdict) -> None:
        """Keep the latest verdict per (finding, subject) for the report and bundle."""
        self.verdicts[(verdict.finding, verdict.subject)] = verdict

    # ------------------------------------------------------------------ timing
    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the wall time of the block to ``stage_seconds[name]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------ results
    def pair_result(self, pair: PairSpec) -> PairResult:
        """All measurements of one pair, computed once per process (errors too)."""
        pid = pair.pair_id
        if pid in self.results:
            return self.results[pid]
        if pid in self._failures:
            raise self._failures[pid]
        if self.bundle is not None:
            if pid not in self._bundle_results:
                raise ReasondiffError(
                    f"pair {pid} is not in the results bundle {self.options.from_results}"
                )
            self.results[pid] = self._bundle_results[pid]
            return self.results[pid]
        try:
            result = self._compute_pair(pair)
        except Exception as exc:
            self._failures[pid] = exc
            raise
        self.results[pid] = result
        return result

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

    # ------------------------------------------------------------------ pair computation
    def _compute_pair(self, pair: PairSpec) -> PairResult:
        from .models import check_compatible_configs

        self._configure_torch()
        base_dir = self._resolve(pair.base)
        desc_dir = self._resolve(pair.descendant)
        bname, dname = pair.base.key, pair.descendant.key
        check_compatible_configs(base_dir, desc_dir, base_name=bname, desc_name=dname)
        cfg = _read_config(desc_dir, dname)
        num_layers = int(cfg.get("num_hidden_layers", cfg.get("n_layer", 0)))
        layers = self._layers(num_layers, dname)
        info = PairInfo(
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
        result = PairResult(info=info)
        result.notes.append(self._dtype_note(pair, base_dir, desc_dir))
        result.weights = self._weights(pair, base_dir, desc_dir)
        for src in self._sources():
            result.trace_sets.append(src.name)
            self._pair_traces(pair, src, base_dir, desc_dir, layers, num_layers, result)
        self._evict_after(pair)
        return result

    def _configure_torch(self) -> None:
        """Set torch's CPU threads once: ``--torch-threads``, or cores / workers under xdist.

        xdist workers each running torch's default thread count oversubscribe the CPU,
        and OpenMP threads that spin-wait on a busy machine make small matrices many
        times slower than one thread.
        """
        if self._torch_ready:
            return
        self._torch_ready = True
        threads = self.options.torch_threads
        if threads is None and self.worker_count:
            threads = max(1, _cpu_count() // self.worker_count)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)

    def _layers(self, num_layers: int, model: str) -> list[int]:
        wanted = self.options.layers
        if wanted is None:
            return list(range(num_layers + 1))
        # The final layer is always measured: it has a finding of its own.
        bad = [lay for lay in wanted if lay > num_layers]
        if bad:
            raise ReasondiffError(
                f"--layers {','.join(map(str, bad))} out of range for {model}: "
                f"hidden-state layers are 0..{num_layers}"
            )
        return sorted({*wanted, num_layers})

    def _resolve(self, spec: ModelSpec) -> Path:
        if spec.key not in self._paths:
            from .models import resolve_source

            with self.stage("resolve"):
                self._paths[spec.key] = Path(resolve_source(spec, toy_root=self.toy_root))
        return self._paths[spec.key]

    @property
    def toy_root(self) -> Path:
        from .diskcheck import toy_root

        return toy_root(self.options.cache_dir())

    def _fingerprint(self, path: Path) -> str:
        if path not in self._fingerprints:
            from .models import fingerprint

            with self.stage("resolve"):
                self._fingerprints[path] = fingerprint(path)
        return self._fingerprints[path]

    def _json_cache(self, namespace: str) -> Any:
        if namespace not in self._json_caches:
            from .cache import JsonCache

            self._json_caches[namespace] = JsonCache(self.options.cache_dir(), namespace)
        return self._json_caches[namespace]

    def _activation_cache(self) -> Any:
        if self._act_cache is None:
            from .cache import ActivationCache

            self._act_cache = ActivationCache(
                self.options.cache_dir(), cap_bytes=self.options.diff_cache_cap
            )
        return self._act_cache

    def _note_cache_state(self, cache: Any) -> None:
        stats = getattr(cache, "stats", None)
        reason = getattr(stats, "disabled_reason", None)
        if reason and not self.stats.caching_disabled_reason:
            self.stats.caching_disabled_reason = str(reason)
        # A damaged entry is recomputed silently otherwise (its log line is captured).
        for entry in getattr(stats, "invalid_entries", None) or ():
            note = f"cache entry discarded and recomputed: {entry}"
            if note not in self.notes:
                self.notes.append(note)

    # -- traces
    def _sources(self) -> list[_TraceSource]:
        if self._trace_sources is None:
            from .traces import load_trace_set

            out: list[_TraceSource] = []
            for path in self._trace_paths():
                ts = load_trace_set(path)
                name = slug(ts.name or path.stem)
                while any(o.name == name for o in out):
                    name = f"{name}-alt"
                out.append(_TraceSource(name=name, path=path, trace_set=ts))
            self._trace_sources = out
        return self._trace_sources

    def _trace_paths(self) -> list[Path]:
        from .trace_choice import trace_specs

        primary_spec, alt_spec = trace_specs(self.options, self.registry, self.pairs)
        paths = [self._trace_path(primary_spec, "a")]
        if alt_spec is not None:
            paths.append(self._trace_path(alt_spec, "b"))
        return paths

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def _trace_path(self, spec: str, which: str) -> Path:
        if spec == "toy":
            from reasondiff.fixtures.toy_traces import ensure_toy_traces

            return Path(ensure_toy_traces(self.toy_root, which))
        return Path(spec).expanduser()

    # -- weights
    def _weights(self, pair: PairSpec, base_dir: Path, desc_dir: Path) -> list[WeightRecord]:
        key = _key(
            kind="weights",
            base=self._fingerprint(base_dir),
            desc=self._fingerprint(desc_dir),
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
            return [_weight_to_row(r) for r in recs]

        cache = self._json_cache("weightdiff")
        rows = cache.get_or_compute(key, compute)
        self._note_cache_state(cache)
        if computed:
            self.stats.weight_diffs_computed += 1
        else:
            self.stats.weight_diffs_loaded += 1
        # Names in the records follow this pair, whatever pair computed the cached entry.
        return [_weight_from_row(r, pair.base.key, pair.descendant.key) for r in rows]

    # -- CKA rows
    def _pair_traces(
        self,
        pair: PairSpec,
        src: _TraceSource,
        base_dir: Path,
        desc_dir: Path,
        layers: list[int],
        num_layers: int,
        result: PairResult,
    ) -> None:
        """CKA rows of one pair on one trace set: from the metric cache, else computed.

        Computing takes a per-(pair, trace set) file lock, so an xdist worker that needs
        a pair another worker is computing (a group-level test) waits and then reads the
        finished entries instead of computing them a second time.
        """
        from .dtypes import pair_dtype_key
        from .traces import trace_set_hash

        o = self.options
        pair_key = _key(
            kind="pair",
            base=self._fingerprint(base_dir),
            desc=self._fingerprint(desc_dir),
            traces=trace_set_hash(src.trace_set),
            max_tokens=str(o.max_tokens),
            dtype=pair_dtype_key(self._dtype_name(base_dir), self._dtype_name(desc_dir)),
            k=str(o.dominant_k),
            version=METRICS_VERSION,
        )
        cache = self._json_cache("metrics")
        found = self._cached_entries(cache, pair_key, layers)
        if found is None:
            with _pair_lock(self.options.cache_dir(), pair_key):
                found = self._cached_entries(cache, pair_key, layers)
                if found is None:
                    found = self._compute_entries(
                        cache, pair_key, pair, src, base_dir, desc_dir, layers, num_layers
                    )
        manifest, entries = found
        for tid in manifest["traces"]:
            trace_name = f"{src.name}:{tid}"
            for lay in layers:
                _rows_from_entry(entries[tid][lay], pair, trace_name, lay, result)
        self._note_cache_state(cache)
        for note in manifest["notes"]:
            msg = f"{pair.pair_id} [{src.name}]: {note}"
            if msg not in result.notes:
                result.notes.append(msg)

    def _cached_entries(
        self, cache: Any, pair_key: str, layers: list[int]
    ) -> tuple[dict[str, Any], dict[str, dict[int, Any]]] | None:
        """(manifest, entries[trace][layer]) if every one is cached, else None."""
        with self.stage("metric cache"):
            manifest = _peek(cache, _key(kind="manifest", pair=pair_key))
            if manifest is None:
                return None
            entries: dict[str, dict[int, Any]] = {}
            for tid in manifest["traces"]:
                entries[tid] = {}
                for lay in layers:
                    entry = _peek(
                        cache, _key(kind="layer", pair=pair_key, trace=tid, layer=str(lay))
                    )
                    if entry is None:
                        return None
                    entries[tid][lay] = entry
        self.stats.metrics_loaded += sum(len(e) for e in entries.values())
        return manifest, entries

    def _compute_entries(
        self,
        cache: Any,
        pair_key: str,
        pair: PairSpec,
        src: _TraceSource,
        base_dir: Path,
        desc_dir: Path,
        layers: list[int],
        num_layers: int,
    ) -> tuple[dict[str, Any], dict[str, dict[int, Any]]]:
        """Score the traces whose entries are missing; the manifest is written last."""
        prepared, notes = self._prepare_traces(pair, src, base_dir, desc_dir)
        manifest = {"traces": [t.id for t in prepared.traces], "notes": notes}
        entries: dict[str, dict[int, Any]] = {}
        for trace in prepared.traces:
            keys = {
                lay: _key(kind="layer", pair=pair_key, trace=trace.id, layer=str(lay))
                for lay in layers
            }
            have = {lay: _peek(cache, key) for lay, key in keys.items()}
            if any(e is None for e in have.values()):
                fresh = self._score_trace(pair, base_dir, desc_dir, trace, layers, num_layers)
                for lay, entry in fresh.items():
                    if have[lay] is None:
                        have[lay] = cache.get_or_compute(keys[lay], lambda e=entry: e)
                        self.stats.metrics_computed += 1
            else:
                self.stats.metrics_loaded += len(have)
            entries[trace.id] = have
        cache.get_or_compute(_key(kind="manifest", pair=pair_key), lambda: manifest)
        return manifest, entries

    def _prepare_traces(
        self, pair: PairSpec, src: _TraceSource, base_dir: Path, desc_dir: Path
    ) -> tuple[TraceSet, list[str]]:
        """Token ids both models see (identical by construction), truncated with notes."""
        from .traces import token_ids_for_pair, truncate

        with self.stage("tokenize"):
            bcfg = _read_config(base_dir, pair.base.key)
            dcfg = _read_config(desc_dir, pair.descendant.key)
            ids = token_ids_for_pair(
                src.trace_set,
                self._tokenizer(base_dir),
                self._tokenizer(desc_dir),
                base_name=pair.base.key,
                desc_name=pair.descendant.key,
                vocab_size_base=int(bcfg.get("vocab_size", 0)) or None,
                vocab_size_desc=int(dcfg.get("vocab_size", 0)) or None,
            )
            truncated, notes = truncate(ids, self.options.max_tokens)
        return truncated, list(notes)

    def _tokenizer(self, path: Path) -> Any:
        if path not in self._tokenizers:
            from .models import load_tokenizer

            self._tokenizers[path] = load_tokenizer(path)
        return self._tokenizers[path]

    def _score_trace(
        self,
        pair: PairSpec,
        base_dir: Path,
        desc_dir: Path,
        trace: Trace,
        layers: list[int],
        num_layers: int,
    ) -> dict[int, dict[str, Any]]:
        """Metric entries for every layer of one trace (activations via the cache)."""
        xb = self._activations(pair.base, base_dir, trace, layers)
        xd = self._activations(pair.descendant, desc_dir, trace, layers)
        out: dict[int, dict[str, Any]] = {}
        k = self.options.dominant_k
        b, d = pair.base.key, pair.descendant.key
        with self.stage("metrics"):
            for lay in layers:
                where = f"layer {lay}, trace {trace.id}"
                entry = _score_layer(
                    xb[f"hidden.{lay}"],
                    xd[f"hidden.{lay}"],
                    k=k,
                    names=(f"{b} {where}", f"{d} {where}"),
                )
                if lay == num_layers:
                    pre = f"prenorm layer {lay}, trace {trace.id}"
                    pre_entry = _score_layer(
                        xb[f"prenorm.{lay}"],
                        xd[f"prenorm.{lay}"],
                        k=k,
                        names=(f"{b} {pre}", f"{d} {pre}"),
                    )
                    for m in ("linear", "rbf", "linear_without_dominant"):
                        entry["metrics"][f"{m}_prenorm"] = pre_entry["metrics"][m]
                out[lay] = entry
        return out

    def _activations(
        self, spec: ModelSpec, path: Path, trace: Trace, layers: list[int]
    ) -> dict[str, Any]:
        from .cache import EXTRACTION_VERSION

        ids_hash = hashlib.sha256(json.dumps(list(trace.token_ids)).encode()).hexdigest()
        layer_part = ",".join(map(str, layers))
        meta = {
            "model": self._fingerprint(path),
            "trace": ids_hash,
            "dtype": self._dtype_name(path),
            "max_tokens": str(self.options.max_tokens),
            "extraction_version": str(EXTRACTION_VERSION),
            "layers": layer_part,
        }
        key = _key(**meta)
        forward_seconds = compute_seconds = 0.0

        def compute() -> dict[str, Any]:
            nonlocal forward_seconds, compute_seconds
            from .activations import extract_activations

            t_start = time.perf_counter()
            model = self._model(spec, path)  # timed as "load"
            t0 = time.perf_counter()
            try:
                return dict(extract_activations(model, list(trace.token_ids), layers=layers))
            finally:
                forward_seconds = time.perf_counter() - t0
                compute_seconds = time.perf_counter() - t_start
                self.stage_seconds["activations"] = (
                    self.stage_seconds.get("activations", 0.0) + forward_seconds
                )

        cache = self._activation_cache()
        t0 = time.perf_counter()
        acts = cache.get_or_compute(key, meta, compute)
        io = time.perf_counter() - t0 - compute_seconds
        self.stage_seconds["activation cache"] = (
            self.stage_seconds.get("activation cache", 0.0) + io
        )
        computed = compute_seconds > 0.0
        self._note_cache_state(cache)
        if computed:
            self.stats.activations_computed += 1
        else:
            self.stats.activations_loaded += 1
        return dict(acts)

    # -- models
    def _model(self, spec: ModelSpec, path: Path) -> Any:
        """Load a model at most once; keep bases, drop a descendant once its pair is done."""
        if spec.key in self._models:
            return self._models[spec.key]
        from .models import load_model, pick_device

        bases = {p.base.key for p in self.pairs}
        if spec.key in bases:  # keep one base at a time
            for k in [k for k in self._models if k in bases]:
                del self._models[k]
        with self.stage("load"):
            self._models[spec.key] = load_model(
                path,
                device=pick_device(self.options.device),
                dtype=self.options.dtype,
                trust_remote_code=self.options.trust_remote_code,
                allow_pickle=self.options.allow_pickle,
                name=spec.key,
            )
        return self._models[spec.key]

    def _evict_after(self, pair: PairSpec) -> None:
        bases = {p.base.key for p in self.pairs}
        if pair.descendant.key not in bases:
            self._models.pop(pair.descendant.key, None)

    def _dtype_note(self, pair: PairSpec, base_dir: Path, desc_dir: Path) -> str:
        from .dtypes import dtype_note
        from .models import pick_device

        return dtype_note(
            self._dtype_name(base_dir),
            self._dtype_name(desc_dir),
            base=pair.base.key,
            descendant=pair.descendant.key,
            option=self.options.dtype,
            device=pick_device(self.options.device),
        )

    def _dtype_name(self, path: Path) -> str:
        """The dtype the checkpoint at ``path`` runs in: the loader's own resolution."""
        from .models import pick_device, read_config, resolve_dtype

        return resolve_dtype(
            self.options.dtype, pick_device(self.options.device), read_config(path)
        )

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
        """Everything the reports render, from the results and verdicts gathered so far."""
        from .metrics.aggregate import weight_layer_table, weight_outside_layers, weight_summary

        data = ReportData(
            verdicts=self.ordered_verdicts(),
            cache=self.stats,
            stage_seconds=dict(self.stage_seconds),
            notes=list(self.notes),
        )
        for r in self.ordered_results():
            pid = r.info.pair_id
            data.pairs.append(r.info)
            # A pair whose rows cannot be aggregated (NaN, holes) has failed its tests
            # with the reason already; the report shows what it can and says why not.
            try:
                curves = dict(self.curves(r))
                for ts in r.trace_sets:
                    for metric, c in self.curves(r, ts).items():
                        if metric in ("linear", "rbf"):
                            curves[f"{metric}@{ts}"] = c
                data.curves[pid] = curves
            except ReasondiffError as exc:
                data.notes.append(f"{pid}: no curves in the report: {exc}")
            try:
                data.weight_layers[pid] = weight_layer_table(r.weights)
                data.weight_other[pid] = weight_outside_layers(r.weights)
                summary = dict(weight_summary(r.weights))
            except ReasondiffError as exc:
                data.notes.append(f"{pid}: no weight table in the report: {exc}")
                summary = {}
            loc = self.verdicts.get(("weight_distributed", pid))
            if loc is not None and "gini" in loc.details:
                summary["localization"] = float(loc.details["gini"])
            data.weight_summary[pid] = summary
            for n in r.notes:
                if n not in data.notes:
                    data.notes.append(n)
        return data


# ---------------------------------------------------------------------- helpers (pure)
def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _key(**parts: str) -> str:
    from .cache import cache_key

    return str(cache_key(**parts))


@contextmanager
def _pair_lock(root: Path, pair_key: str) -> Iterator[None]:
    """An inter-process lock per (pair, trace set); no lock if the dir is unwritable."""
    from filelock import FileLock

    lock_dir = root / "locks"
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_dir / f"pair-{pair_key}.lock"))
        lock.acquire()
    except OSError:  # read-only / full disk: the caches compute in memory anyway
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _peek(cache: Any, key: str) -> Any:
    """The cached value for ``key`` or None, never computing (works with any JsonCache)."""
    path_of = getattr(cache, "entry_path", None)
    if callable(path_of) and not Path(path_of(key)).is_file():
        return None
    getter = getattr(cache, "get", None)
    if callable(getter):
        return getter(key)

    def miss() -> Any:
        raise _Miss

    try:
        return cache.get_or_compute(key, miss)
    except _Miss:
        return None


def _read_config(path: Path, name: str) -> dict[str, Any]:
    cfg_path = path / "config.json"
    try:
        data = json.loads(cfg_path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        from .errors import ModelLoadError

        raise ModelLoadError(f"{name}: cannot read {cfg_path}: {exc}") from exc
    if not isinstance(data, dict):
        from .errors import ModelLoadError

        raise ModelLoadError(f"{name}: {cfg_path} is not a JSON object")
    # Multimodal / nested configs keep the language model under text_config.
    inner = data.get("text_config")
    return {**data, **inner} if isinstance(inner, dict) else data


def _score_layer(x: Any, y: Any, *, k: int, names: tuple[str, str]) -> dict[str, Any]:
    """All CKA metrics and diagnostics of one layer of one trace (METHODS §2-§6).

    Each side's statistics are prepared once (``CkaStats``) and shared by every metric;
    the ablation downdates them instead of recomputing on the reduced matrices.
    """
    from .metrics import (
        CkaStats,
        dominant_datapoints,
        linear_cka_and_ablated,
        massive_activations,
        pc1_carried_share,
        pc1_share,
        projection_norm_correlation,
        rbf_cka_prepared,
        top_norm_overlap,
    )

    sx = CkaStats.from_matrix(x, name=names[0])
    sy = CkaStats.from_matrix(y, name=names[1])
    u = dominant_datapoints(sx, sy, k=k)
    linear, without = linear_cka_and_ablated(sx, sy, u)
    mx = massive_activations(x)
    my = massive_activations(y)
    values = {
        "linear": linear,
        "rbf": rbf_cka_prepared(sx, sy),
        "linear_without_dominant": without,
        "pc1_share_base": pc1_share(sx),
        "pc1_share_descendant": pc1_share(sy),
        "pc1_carried": pc1_carried_share(sx, sy),
        "dominant_count": int(u.numel()),
        "top_norm_overlap_base": top_norm_overlap(sx, k=k),
        "top_norm_overlap_descendant": top_norm_overlap(sy, k=k),
        "proj_norm_corr_base": projection_norm_correlation(sx),
        "proj_norm_corr_descendant": projection_norm_correlation(sy),
        "massive_count_base": len(mx.positions),
        "massive_count_descendant": len(my.positions),
    }
    return {
        "metrics": {name: float(v) for name, v in values.items()},
        "massive": {
            "base": [[int(p) for p in mx.positions], float(mx.max_abs)],
            "descendant": [[int(p) for p in my.positions], float(my.max_abs)],
        },
    }


def _rows_from_entry(
    entry: dict[str, Any], pair: PairSpec, trace: str, layer: int, result: PairResult
) -> None:
    b, d = pair.base.key, pair.descendant.key
    for metric, value in entry["metrics"].items():
        result.cka.append(CkaRecord(b, d, trace, layer, metric, float(value)))
    for side, model in (("base", b), ("descendant", d)):
        positions, max_abs = entry["massive"][side]
        result.massive.append(
            MassiveRecord(model, trace, layer, tuple(int(p) for p in positions), float(max_abs))
        )


def _weight_to_row(r: WeightRecord) -> list[Any]:
    d = asdict(r)
    return [
        d["tensor"],
        d["layer"],
        d["component"],
        list(d["shape"]),
        _json_float(d["normalized_diff"]),
        _json_float(d["relative_diff"]),
        _json_float(d["mean_abs_diff"]),
        d["note"],
    ]


def _weight_from_row(row: list[Any], base: str, desc: str) -> WeightRecord:
    return WeightRecord(
        base=base,
        descendant=desc,
        tensor=row[0],
        layer=int(row[1]),
        component=row[2],
        shape=tuple(int(s) for s in row[3]),
        normalized_diff=_float_from_json(row[4]),
        relative_diff=_float_from_json(row[5]),
        mean_abs_diff=_float_from_json(row[6]),
        note=row[7],
    )


def _json_float(v: float) -> float | str:
    """Strict JSON has no NaN: NaN/Inf go as strings (weight records use NaN on purpose)."""
    return v if math.isfinite(v) else repr(float(v))


def _float_from_json(v: float | str) -> float:
    return float(v)
