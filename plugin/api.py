"""``reasondiff.compare``: the suite's comparison as one function call (notebooks, scripts).

The same engine the pytest session uses (:class:`~reasondiff.engine.Engine`), the same
metric cache, no pytest; the same finding functions (:mod:`reasondiff.findings`), so the
verdicts equal a pytest run's for the same pair and options. :func:`compare` returns a
:class:`Comparison`: a sequence of :class:`~reasondiff.records.PairResult` with verdicts
and curves, the group finding, pandas frames, the terminal report and the bundle writer.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, overload

from .engine import Engine, EngineConfig, resolve_trace_path
from .errors import RbfBudgetWarning, ReasondiffError, RegistryError
from .findings import (
    FindingOptions,
    GroupMember,
    pair_verdicts,
    sft_more_than_rl,
)
from .methods import METHODS
from .options import DEVICES, DTYPES, OPTIONS, DiffOptions, parse_bytes
from .records import (
    CacheStats,
    Curve,
    PairInfo,
    PairResult,
    ReportData,
    Verdict,
    dominant_row,
    massive_row,
)
from .registry import ModelSpec, PairSpec, Registry, key_from_source, slug

#: The documented default of every option (the one table: ``reasondiff.options.OPTIONS``).
_DEFAULT: dict[str, Any] = {o.dest: o.default for o in OPTIONS}

#: compare()'s keywords that are engine options (every EngineConfig field but cache_dir).
ENGINE_KEYWORDS = tuple(f.name for f in fields(EngineConfig) if f.name != "cache_dir")
#: compare()'s keywords that are finding thresholds (FindingOptions' fields).
FINDING_KEYWORDS = tuple(f.name for f in fields(FindingOptions))

_DIFF_OPTION_FIELDS = {f.name for f in fields(DiffOptions)}

FRAMES_EXTRA = "frames"
#: Columns of the frames: those of the bundle's files (``reasondiff.bundle``).
WEIGHT_COLUMNS = (
    "base",
    "descendant",
    "tensor",
    "block",
    "component",
    "shape",
    "normalized_diff",
    "relative_diff",
    "mean_abs_diff",
    "note",
)
CKA_COLUMNS = ("base", "descendant", "trace", "layer", "metric", "value")
MASSIVE_COLUMNS = ("model", "trace", "layer", "positions", "max_abs", "token_ids", "tokens")
DOMINANT_COLUMNS = (
    "base",
    "descendant",
    "trace",
    "layer",
    "model",
    "position",
    "token_id",
    "token",
    "projection",
)
VERDICT_COLUMNS = ("finding", "subject", "status", "observed", "expected", "summary", "details")


def compare(
    base: str,
    descendants: Sequence[str],
    *,
    traces: str | Path | Sequence[str | Path] = "toy",
    cache_dir: str | Path | None = None,
    registry: Sequence[str | Path] = (),
    method: str | None = None,
    raise_on_error: bool = False,
    # engine options: name and default of the pytest option (reasondiff.options.OPTIONS)
    device: str = _DEFAULT["device"],
    dtype: str = _DEFAULT["dtype"],
    max_tokens: int = _DEFAULT["max_tokens"],
    layers: Sequence[int] | None = _DEFAULT["layers"],
    dominant_k: int = _DEFAULT["dominant_k"],
    rbf_median: str = _DEFAULT["rbf_median"],
    keep_activations: bool = False,
    diff_cache_cap: int | str | None = _DEFAULT["diff_cache_cap"],
    torch_threads: int | None = _DEFAULT["torch_threads"],
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    pass_size: int | None = _DEFAULT["pass_size"],
    stream_blocks: bool = False,
    # finding thresholds: likewise
    bathtub_delta: float = _DEFAULT["bathtub_delta"],
    bathtub_band: tuple[float, float] = _DEFAULT["bathtub_band"],
    final_layer_margin: float = _DEFAULT["final_layer_margin"],
    localization_max_gini: float = _DEFAULT["localization_max_gini"],
    localization_max_share: float = _DEFAULT["localization_max_share"],
    sft_rl_ratio: float = _DEFAULT["sft_rl_ratio"],
    invariance_atol: float = _DEFAULT["invariance_atol"],
    bootstrap: int = _DEFAULT["bootstrap"],
) -> Comparison:
    """Compare a base with its descendants; the pytest suite's work as one function call.

    ``base`` and ``descendants`` are registry keys (``r1-distill-qwen-7b``), hub ids
    (``org/name[@rev]``), local checkpoint folders or ``toy:<recipe>``. ``traces`` is a
    trace-set JSONL file, ``"toy"`` (the toy family's set ``a``) or a list of those (the
    first is primary, the second is the one trace invariance compares with). ``method``
    (SFT, RL, SFT+RL) is the training method of ad-hoc descendants; a registry model
    keeps its registered one. Every other keyword is the pytest option of the same name,
    with its default. Per trace there is one base forward and one per descendant; results
    land in the same metric cache the pytest suite uses (``cache_dir``, default
    ``$REASONDIFF_CACHE`` or ``~/.cache/reasondiff``).

    A descendant that fails is kept as a failed result (``.error`` says why) and the
    others are returned; ``raise_on_error=True`` raises the first failure instead.
    Arguments are checked before any model is loaded. When RBF CKA over the longest
    trace needs more than the budget (N^2 pairs), a
    :class:`~reasondiff.errors.RbfBudgetWarning` says so, with the estimate and the
    ``max_tokens`` that fits, before the work starts (also kept in ``.notes``, as are the
    notes of toy checkpoints rebuilt on the way).
    """
    comparison, _ = compare_with_engine(
        base,
        descendants,
        traces=traces,
        cache_dir=cache_dir,
        registry=registry,
        method=method,
        raise_on_error=raise_on_error,
        device=device,
        dtype=dtype,
        max_tokens=max_tokens,
        layers=layers,
        dominant_k=dominant_k,
        rbf_median=rbf_median,
        keep_activations=keep_activations,
        diff_cache_cap=diff_cache_cap,
        torch_threads=torch_threads,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        pass_size=pass_size,
        stream_blocks=stream_blocks,
        bathtub_delta=bathtub_delta,
        bathtub_band=bathtub_band,
        final_layer_margin=final_layer_margin,
        localization_max_gini=localization_max_gini,
        localization_max_share=localization_max_share,
        sft_rl_ratio=sft_rl_ratio,
        invariance_atol=invariance_atol,
        bootstrap=bootstrap,
    )
    return comparison


def compare_with_engine(
    base: str,
    descendants: Sequence[str],
    *,
    traces: str | Path | Sequence[str | Path] = "toy",
    cache_dir: str | Path | None = None,
    registry: Sequence[str | Path] = (),
    method: str | None = None,
    raise_on_error: bool = False,
    **options: Any,
) -> tuple[Comparison, Engine]:
    """:func:`compare`, also returning the engine (stage times, forwards, cache counts).

    ``options`` are compare()'s option keywords (any left out take their defaults).
    """
    from .cache import default_cache_dir
    from .diskcheck import toy_root
    from .preflight import check_run

    unknown = sorted(set(options) - {*ENGINE_KEYWORDS, *FINDING_KEYWORDS})
    if unknown:
        raise TypeError(f"compare() got unknown option(s) {', '.join(unknown)}")
    values = {k: _DEFAULT.get(k, False) for k in (*ENGINE_KEYWORDS, *FINDING_KEYWORDS)}
    values.update(options)
    _check_arguments(base, descendants, method, values)
    if isinstance(values["diff_cache_cap"], str):
        values["diff_cache_cap"] = parse_bytes(values["diff_cache_cap"])
    if values["layers"] is not None:
        values["layers"] = tuple(values["layers"])
    values["bathtub_band"] = tuple(values["bathtub_band"])

    reg = Registry.load([str(p) for p in registry])
    base_spec = _spec(reg, base)
    pairs: list[PairSpec] = []
    for d in descendants:
        spec = _spec(reg, d, base=base_spec.key, method=method)
        if spec.key in {base_spec.key, *(p.descendant.key for p in pairs)}:
            spec = replace(spec, key=f"{spec.key}-{len(pairs) + 1}")  # two ".../model" dirs
        group = spec.groups[0] if spec.base == base_spec.key and spec.groups else None
        pairs.append(PairSpec(base=base_spec, descendant=spec, group=group))
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    engine_config = EngineConfig(cache_dir=root, **{k: values[k] for k in ENGINE_KEYWORDS})
    specs = [traces] if isinstance(traces, str | Path) else list(traces)

    def paths() -> list[Path]:
        return [
            resolve_trace_path(s, toy_root(root), which)
            for s, which in zip(specs, "abcdefgh", strict=False)
        ]

    finding_options = FindingOptions(**{k: values[k] for k in FINDING_KEYWORDS})
    notes = check_run(  # before any model is loaded: layers, dominant_k, max_tokens, RBF budget
        layers=engine_config.layers,
        dominant_k=engine_config.dominant_k,
        max_tokens=engine_config.max_tokens,
        pairs=pairs,
        trace_paths=paths,
        toy_root=lambda: toy_root(root),
        names=("layers", "dominant_k", "max_tokens"),
    )
    for note in notes:  # said before the work starts, not only in the returned notes
        warnings.warn(note, RbfBudgetWarning, stacklevel=3)
    engine = Engine(engine_config, trace_paths=paths)
    engine.notes.extend(notes)
    results: list[PairResult] = []
    try:
        for p in pairs:
            try:
                results.append(engine.pair_result(p, pairs))
            except Exception as exc:  # kept per pair; the others are still returned
                if raise_on_error:
                    raise
                results.append(_failed(p, exc))
    finally:
        engine.release_models()  # a notebook keeps the engine; not the GPU memory
    from reasondiff.fixtures.toy import drain_notes

    engine.notes.extend(n for n in drain_notes() if n not in engine.notes)  # toys rebuilt

    config = DiffOptions(
        registry=tuple(str(r) for r in registry),
        base=base,
        traces=str(specs[0]) if specs else None,
        traces_alt=str(specs[1]) if len(specs) > 1 else None,
        diff_cache=str(root),
        method=method,
        **{k: v for k, v in values.items() if k in _DIFF_OPTION_FIELDS},
    ).to_dict()
    comparison = Comparison(
        results,
        pairs,
        finding_options=finding_options,
        group_expect=_group_expect(reg, pairs),
        config=config,
        cache=engine.stats,
        stage_seconds=engine.stage_seconds,
        notes=engine.notes,
        trace_hashes=engine.trace_hashes() if any(r.error is None for r in results) else None,
    )
    return comparison, engine


def _check_arguments(
    base: str, descendants: Sequence[str], method: str | None, values: Mapping[str, Any]
) -> None:
    """Refuse what cannot work, before any model is loaded (each error names the argument)."""
    from .preflight import check_compare_arguments, check_threads

    if not isinstance(base, str) or not base:
        raise RegistryError(f"compare(): base must be a model name, got {base!r}")
    check_compare_arguments(descendants, method)  # the one place (preflight.py)
    if values["device"] not in DEVICES:
        raise ReasondiffError(
            f"compare(): device {values['device']!r} is not one of {', '.join(DEVICES)}"
        )
    if values["dtype"] not in DTYPES:
        raise ReasondiffError(
            f"compare(): dtype {values['dtype']!r} is not one of {', '.join(DTYPES)}"
        )
    for name in ("max_tokens", "dominant_k", "bootstrap", "pass_size", "torch_threads"):
        v = values[name]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ReasondiffError(f"compare(): {name} must be an integer >= 1, got {v!r}")
    if values["torch_threads"] is not None:  # the bound of --torch-threads (one place)
        check_threads(values["torch_threads"], where="compare(): torch_threads", auto="None")
    from .metrics.defaults import RBF_MEDIANS

    if values["rbf_median"] not in RBF_MEDIANS:
        raise ReasondiffError(
            f"compare(): rbf_median {values['rbf_median']!r} is not one of {', '.join(RBF_MEDIANS)}"
        )
    lo_hi = tuple(values["bathtub_band"])
    if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] < lo_hi[1] <= 1.0:
        raise ReasondiffError(
            f"compare(): bathtub_band {values['bathtub_band']!r} is not (lo, hi) with 0 <= lo < hi <= 1"
        )


def _spec(
    reg: Registry, ref: str, *, base: str | None = None, method: str | None = None
) -> ModelSpec:
    """A registry model by key or source, else an ad-hoc one keyed as --base/--candidate are."""
    found = reg.models.get(ref) or reg.find_by_source(ref)
    if found is not None:
        if method is not None and base is not None and found.method != method:
            raise RegistryError(
                f"compare(): {ref!r} is the registry model {found.key!r} with method "
                f"{found.method or 'none'}; method={method!r} applies to ad-hoc descendants only"
            )
        return found
    return ModelSpec(key=key_from_source(ref), source=ref, base=base, method=method)


def _failed(pair: PairSpec, exc: BaseException) -> PairResult:
    """A descendant that could not be compared: no rows, the reason in ``error``."""
    info = PairInfo(
        pair_id=pair.pair_id,
        base=pair.base.key,
        descendant=pair.descendant.key,
        base_source=pair.base.source,
        descendant_source=pair.descendant.source,
        method=pair.method,
        group=pair.group,
        expect=pair.expect,
    )
    reason = " ".join(f"{type(exc).__name__}: {exc}".split())
    return PairResult(info=info, error=reason, notes=[f"{pair.pair_id}: failed: {reason}"])


def _group_expect(reg: Registry, pairs: Sequence[PairSpec]) -> dict[str, bool]:
    """The group's expectations when every pair belongs to one registry group (as pytest)."""
    groups = {p.group for p in pairs}
    if len(groups) == 1 and None not in groups:
        (name,) = groups
        if name is not None and name in reg.groups:
            return dict(reg.groups[name].expect)
    return {}


class _Curves:
    """Curves per (pair, trace set), memoized: the pytest session's ``curves``, no session."""

    def __init__(self, n_boot: int) -> None:
        self.n_boot = n_boot
        self._memo: dict[tuple[str, str | None], dict[str, Curve]] = {}

    def __call__(self, result: PairResult, trace_set: str | None) -> dict[str, Curve]:
        from .metrics.aggregate import curves_from_rows

        primary = result.trace_sets[0] if result.trace_sets else None
        name = trace_set if trace_set is not None else primary
        key = (result.info.pair_id, name)
        if key not in self._memo:
            self._memo[key] = curves_from_rows(
                result.cka, trace_set=name, n_boot=self.n_boot, seed=0
            )
        return self._memo[key]


class Comparison(Sequence[PairResult]):
    """What :func:`compare` returns: one :class:`PairResult` per descendant, in order.

    Each result carries ``verdicts`` (finding -> Verdict), ``curves`` (metric -> Curve of
    the primary trace set) and ``error`` (None unless it failed). ``group_verdicts`` holds
    the group finding (SFT vs RL for the base). ``frames()``, ``write(dir)`` and
    ``report()`` give pandas frames, the ``--report-dir`` bundle and the terminal report.
    """

    def __init__(
        self,
        results: Sequence[PairResult],
        pairs: Sequence[PairSpec],
        *,
        finding_options: FindingOptions,
        group_expect: Mapping[str, bool],
        config: dict[str, Any],
        cache: CacheStats,
        stage_seconds: Mapping[str, float],
        notes: Sequence[str],
        trace_hashes: Mapping[str, str] | None = None,
    ) -> None:
        self._results = list(results)
        self._trace_hashes = dict(trace_hashes or {})  # for the bundle (merge checks)
        self.options = finding_options
        self.config = config
        self.cache = cache
        self.stage_seconds = dict(stage_seconds)
        self.notes = list(notes)
        self._curves = _Curves(finding_options.bootstrap)
        for r, p in zip(self._results, pairs, strict=True):
            if r.error is None:
                try:
                    r.curves = dict(self._curves(r, None)) if r.cka else {}
                except ReasondiffError as exc:  # NaN rows, holes: the verdicts say so too
                    r.notes.append(f"{r.info.pair_id}: no curves: {exc}")
                r.verdicts = pair_verdicts(
                    r, finding_options, study_dip=p.descendant.study_dip, curves=self._curves
                )
        self.group_verdicts: list[Verdict] = self._group_verdicts(pairs, group_expect)

    def _group_verdicts(
        self, pairs: Sequence[PairSpec], expect: Mapping[str, bool]
    ) -> list[Verdict]:
        if not pairs:
            return []
        subject = f"base:{slug(pairs[0].base.key)}"
        expected = expect.get("sft_more_than_rl")
        sides = [(r, p) for r, p in zip(self._results, pairs, strict=True) if p.method in METHODS]
        failed = [r for r, p in sides if r.error is not None and p.method in ("SFT", "RL")]
        if failed:
            names = ", ".join(r.info.descendant for r in failed)
            return [
                Verdict(
                    finding="sft_more_than_rl",
                    subject=subject,
                    observed=None,
                    expected=expected,
                    summary=f"undecided: descendant(s) {names} failed",
                )
            ]
        members = [GroupMember(p.descendant.key, p.method, r) for r, p in sides]
        try:
            verdict = sft_more_than_rl(
                subject, members, self.options, expected=expected, curves=self._curves
            )
        except ReasondiffError as exc:  # the pytest test fails here with this reason
            verdict = Verdict(
                finding="sft_more_than_rl",
                subject=subject,
                observed=None,
                expected=expected,
                summary=f"cannot judge: {exc}",
            )
        return [verdict]

    # ------------------------------------------------------------------ sequence
    @overload
    def __getitem__(self, index: int) -> PairResult: ...
    @overload
    def __getitem__(self, index: slice) -> list[PairResult]: ...
    def __getitem__(self, index: int | slice) -> PairResult | list[PairResult]:
        return self._results[index]

    def __len__(self) -> int:
        return len(self._results)

    def __iter__(self) -> Iterator[PairResult]:
        return iter(self._results)

    def __repr__(self) -> str:
        failed = sum(r.error is not None for r in self._results)
        return (
            f"<Comparison of {len(self)} pair(s)"
            + (f", {failed} failed" if failed else "")
            + f": {', '.join(r.info.pair_id for r in self._results)}>"
        )

    @property
    def ok(self) -> list[PairResult]:
        """The results that did not fail."""
        return [r for r in self._results if r.error is None]

    @property
    def failed(self) -> list[PairResult]:
        """The descendants that failed (``.error`` says why)."""
        return [r for r in self._results if r.error is not None]

    def verdicts(self) -> list[Verdict]:
        """Every verdict, pair findings then group ones, ordered as the bundle's."""
        pair_level = [v for r in self.ok for v in r.verdicts.values()]
        return sorted([*pair_level, *self.group_verdicts], key=lambda v: (v.subject, v.finding))

    # ------------------------------------------------------------------ outputs
    def report_data(self, *, extra_notes: Sequence[str] = ()) -> ReportData:
        """What the reports render (the same builder as the pytest session's)."""
        from .report_data import build_report_data

        return build_report_data(
            self._results,
            self.verdicts(),
            curves=self._curves,
            cache=self.cache,
            stage_seconds=self.stage_seconds,
            notes=[*self.notes, *extra_notes],
        )

    def frames(self) -> dict[str, Any]:
        """pandas DataFrames ``weights``, ``cka``, ``massive``, ``dominant``, ``verdicts``.

        Columns are the bundle's (``weights.csv`` ...), one row per row it writes:
        ``dominant`` holds each side's top-k dominant datapoints per (pair, trace, layer)
        with token id, text and |PC1 projection| (``dominant.csv``); ``massive``'s list
        cells are written as in massive.csv (``positions`` and ``token_ids`` as
        ``"0;17"``, ``tokens`` as a JSON list). Needs the optional extra ``frames``
        (``pip install 'reasondiff[frames]'``).
        """
        import importlib

        try:
            pd: Any = importlib.import_module("pandas")
        except ImportError:
            raise ImportError(
                "Comparison.frames() needs pandas: pip install 'reasondiff[frames]' "
                f"(the optional extra {FRAMES_EXTRA!r})"
            ) from None
        ok = self.ok
        weights = [
            (
                w.base,
                w.descendant,
                w.tensor,
                w.block,
                w.component,
                "x".join(str(s) for s in w.shape),
                w.normalized_diff,
                w.relative_diff,
                w.mean_abs_diff,
                w.note,
            )
            for r in ok
            for w in r.weights
        ]
        cka = [
            (c.base, c.descendant, c.trace, c.layer, c.metric, c.value) for r in ok for c in r.cka
        ]
        massive: dict[tuple[Any, ...], None] = {}
        for r in ok:
            for m in r.massive:  # per model: a shared base is one row, as in massive.csv
                massive.setdefault(massive_row(m), None)
        dominant = [dominant_row(d) for r in ok for d in r.dominant]
        verdicts = [
            (v.finding, v.subject, v.status, v.observed, v.expected, v.summary, v.details)
            for v in self.verdicts()
        ]
        return {
            "weights": pd.DataFrame(weights, columns=list(WEIGHT_COLUMNS)),
            "cka": pd.DataFrame(cka, columns=list(CKA_COLUMNS)),
            "massive": pd.DataFrame(list(massive), columns=list(MASSIVE_COLUMNS)),
            "dominant": pd.DataFrame(dominant, columns=list(DOMINANT_COLUMNS)),
            "verdicts": pd.DataFrame(verdicts, columns=list(VERDICT_COLUMNS)),
        }

    def write(self, out_dir: str | Path) -> Path:
        """Write the results bundle, the figures and index.md, as ``--report-dir`` does.

        Failed descendants are not in the bundle (they have no rows); a note in index.md
        names them. Returns the folder.
        """
        from .bundle import write_bundle
        from .diskcheck import check_report_dir
        from .dtypes import dtypes_from_notes
        from .traces import generators_from_notes

        out = Path(out_dir)
        check_report_dir(out)
        ok = self.ok
        config = dict(self.config)
        config["dtype_resolved"] = dtypes_from_notes(n for r in ok for n in r.notes)
        config["trace_generators"] = generators_from_notes(n for r in ok for n in r.notes)
        if self._trace_hashes:
            config["trace_hashes"] = dict(self._trace_hashes)
        verdicts = [v for v in self.verdicts() if not _is_failed_subject(v, self.failed)]
        write_bundle(out, ok, verdicts, config=config)
        try:
            from reasondiff.reports import write_figures, write_index
        except ImportError:  # pragma: no cover - reports ship with the package
            return out
        data = self.report_data(extra_notes=[f"results bundle written to {out}"])
        figures = write_figures(data, out)
        write_index(data, out, figures)
        return out

    def report(self, *, console: Any = None, width: int | None = None) -> None:
        """Print the rich terminal report (a notebook cell or a terminal)."""
        from reasondiff.reports import make_console, render_terminal

        if console is None:
            import sys

            console = make_console(sys.stdout, width=width) if width else make_console(sys.stdout)
        render_terminal(self.report_data(), console=console)


def _is_failed_subject(v: Verdict, failed: Sequence[PairResult]) -> bool:
    return any(v.subject == r.info.pair_id for r in failed)
