"""Plain records that flow between the core, the plugin, the bundle and the reports.

Reports and the results bundle only ever see these; they never see tensors or models.
Everything here is JSON/CSV friendly (ints, floats, strings, tuples of ints).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, astuple, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a runtime import would cycle: tokens builds on these records
    from .tokens import PairTokens

#: CKA-like per-layer metrics written to cka.csv. Layer l in 0..L indexes
#: ``hidden_states`` (l = L is after the final norm); ``*_prenorm`` metrics exist only
#: at layer L and score the last block's output before the final norm.
CKA_METRICS = (
    "linear",
    "rbf",
    "linear_without_dominant",
    "linear_prenorm",
    "rbf_prenorm",
    "linear_without_dominant_prenorm",
)
#: Diagnostics per (pair, trace, layer), also rows of cka.csv.
DIAGNOSTIC_METRICS = (
    "pc1_share_base",
    "pc1_share_descendant",
    "pc1_carried",  # share of biased linear CKA carried by the PC1 x PC1 term
    "dominant_count",  # |U|
    "top_norm_overlap_base",
    "top_norm_overlap_descendant",
    "proj_norm_corr_base",
    "proj_norm_corr_descendant",
    "massive_count_base",
    "massive_count_descendant",
)


def trace_set_of(trace: str) -> str:
    """The trace-set part of a ``"<set>:<id>"`` trace id (``""`` when there is no ``:``).

    The one parser of trace ids: the bundle, the aggregation and the pytest layer all
    call it, so an id without ``:`` means the same everywhere.
    """
    head, sep, _ = trace.partition(":")
    return head if sep else ""


def trace_sets_of(traces: Iterable[str]) -> list[str]:
    """Names of the trace sets of these trace ids, in first-seen order."""
    return list(dict.fromkeys(trace_set_of(t) for t in traces))


#: Config keys of the decoder layer count across architectures (first present wins).
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def config_num_layers(config: Mapping[str, Any]) -> int:
    """L, the number of decoder blocks, from a checkpoint config (0 when it names none)."""
    for key in LAYER_KEYS:
        if config.get(key) is not None:
            return int(config[key])
    return 0


def num_blocks(weights: Iterable[WeightRecord]) -> int:
    """Decoder blocks seen in weight records (blocks 0..L-1; tensors outside are -1)."""
    return max((w.layer for w in weights if w.layer >= 0), default=-1) + 1


def infer_num_layers(result: PairResult) -> int:
    """L from a pair's rows when no config says it: the largest hidden-state layer of its
    CKA rows (which always hold L), else the decoder blocks of its weight rows; 0 if neither.

    The one inference of L from rows (the bundle reader's, for bundles without it).
    """
    if result.cka:
        return max(c.layer for c in result.cka)
    return num_blocks(result.weights)


@dataclass(frozen=True)
class WeightRecord:
    """One weight tensor compared between base and descendant (METHODS §7).

    ``layer`` is the 0-based decoder *block* index, -1 for tensors outside the blocks
    (``block`` is the same number under its user-facing name: weights.csv, the heatmap
    and the figures say "block", because CKA's ``layer`` is a hidden-state index, one
    higher: block b writes hidden state b + 1). The field keeps its old name so that
    code and caches written against it keep working.
    ``component`` is the name inside the block (``self_attn.q_proj.weight``) or the
    full name for tensors outside blocks (``model.embed_tokens.weight``).
    ``note`` is empty for an ordinary comparison, else one of ``missing_in_base``,
    ``missing_in_descendant``, ``tied``, ``resized:<rows>`` (compared on shared rows),
    ``renamed:<other name>``, ``shape_mismatch``; metrics are NaN where not comparable.
    """

    base: str
    descendant: str
    tensor: str
    layer: int
    component: str
    shape: tuple[int, ...]
    normalized_diff: float
    relative_diff: float
    mean_abs_diff: float
    note: str = ""

    @property
    def block(self) -> int:
        """The decoder block index (-1 outside the blocks): the column ``block`` of weights.csv."""
        return self.layer

    @property
    def base_near_zero(self) -> bool:
        """The base tensor is (near) zero and the descendant is not (METHODS §7).

        Then ``normalized_diff`` is 2 (its maximum) for any change, whatever its size, so
        the number says nothing about how much training moved the tensor. Read from the
        record's own numbers: ``relative_diff`` is inf for an exactly zero base, and
        ``normalized_diff`` >= 2 (1 - 1e-3) means ||W_base|| <= ~5e-4 ||W_new|| (it also
        catches an imported row without ``relative_diff``).
        """
        if self.note:
            return False
        if self.relative_diff == math.inf:
            return True
        return math.isfinite(self.normalized_diff) and self.normalized_diff >= ZERO_BASE_DIFF


#: A normalized diff at or above this marks a (near-)zero base tensor (its maximum is 2).
ZERO_BASE_DIFF = 2.0 * (1.0 - 1e-3)


def _json_float(v: float) -> float | str:
    """Strict JSON has no NaN: NaN/Inf go as strings (weight records use NaN on purpose)."""
    return v if math.isfinite(v) else repr(float(v))


def weight_to_row(r: WeightRecord) -> list[Any]:
    """The one compact encoding of a weight record (metric cache, xdist channel).

    Base and descendant are left out: the container (a pair's cache entry or result)
    names them. NaN/Inf become strings so that the row is strict JSON.
    """
    return [
        r.tensor,
        r.layer,
        r.component,
        list(r.shape),
        _json_float(r.normalized_diff),
        _json_float(r.relative_diff),
        _json_float(r.mean_abs_diff),
        r.note,
    ]


def weight_from_row(row: list[Any], base: str, desc: str) -> WeightRecord:
    """Inverse of :func:`weight_to_row`."""
    return WeightRecord(
        base=base,
        descendant=desc,
        tensor=str(row[0]),
        layer=int(row[1]),
        component=str(row[2]),
        shape=tuple(int(s) for s in row[3]),
        normalized_diff=float(row[4]),
        relative_diff=float(row[5]),
        mean_abs_diff=float(row[6]),
        note=str(row[7]),
    )


@dataclass(frozen=True)
class CkaRecord:
    """One per-layer value for one trace: a row of cka.csv.

    ``layer`` is the hidden-state index: 0 = embeddings, l >= 1 = output of decoder
    block l - 1, L = after the final norm (``*_prenorm`` metrics: before it).
    """

    base: str
    descendant: str
    trace: str
    layer: int
    metric: str
    value: float


@dataclass(frozen=True)
class MassiveRecord:
    """Positions carrying massive activations (Sun et al.) in one model, trace, layer.

    ``token_ids`` / ``tokens`` name the token at each position (same order; the text is
    the id decoded on its own with the pair's base tokenizer). They default to empty so
    that rows made without them (older bundles, imports, older code) still build: empty
    means "not named", never "no tokens".
    """

    model: str
    trace: str
    layer: int
    positions: tuple[int, ...]
    max_abs: float
    token_ids: tuple[int, ...] = ()
    tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class DominantRecord:
    """One dominant datapoint (METHODS §5) of one side of a pair, in one trace and layer.

    ``model`` is the side's key (the pair's base or descendant); ``token`` is the id
    decoded on its own with the base's tokenizer; ``projection`` is |PC1 projection|.
    A row of dominant.csv.
    """

    base: str
    descendant: str
    trace: str
    layer: int
    model: str
    position: int
    token_id: int
    token: str
    projection: float


@dataclass
class Verdict:
    """The outcome of one finding test for one pair (or one base, for group findings).

    ``observed`` is what was measured (True = the finding holds), ``expected`` what the
    registry says (None = no expectation: reported, never failed). ``summary`` is the
    one-line explanation with numbers; ``details`` holds the numbers for the report.
    """

    finding: str
    subject: str  # pair id, or "base:<key>" for group-level findings
    observed: bool | None
    expected: bool | None
    summary: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """'pass', 'fail', 'observed' (no expectation), 'n/a' (undecidable, nothing
        expected: e.g. no weight change at all) or 'error' (undecidable but expected)."""
        if self.observed is None:
            return "n/a" if self.expected is None else "error"
        if self.expected is None:
            return "observed"
        return "pass" if self.observed == self.expected else "fail"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PairInfo:
    """Identity of a compared pair, enough for reports and bundles.

    ``num_layers`` is L, the number of decoder blocks (hidden states 0..L); 0 = unknown
    (a bundle reader infers it from the rows).
    """

    pair_id: str
    base: str  # registry key or label
    descendant: str
    base_source: str
    descendant_source: str
    method: str | None = None  # optional in a bundle's results.json
    group: str | None = None
    expect: dict[str, bool] = field(default_factory=dict)
    num_layers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Curve:
    """A per-layer curve averaged over traces, with a bootstrap interval over traces."""

    metric: str
    layers: list[int]
    mean: list[float]
    lo: list[float]
    hi: list[float]
    n_traces: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CacheStats:
    """Counts for the one grep-able cache line of the terminal report."""

    activations_computed: int = 0
    activations_loaded: int = 0
    weight_diffs_computed: int = 0
    weight_diffs_loaded: int = 0
    metrics_computed: int = 0
    metrics_loaded: int = 0
    caching_disabled_reason: str | None = None

    def merge(self, other: CacheStats) -> None:
        for name in (
            "activations_computed",
            "activations_loaded",
            "weight_diffs_computed",
            "weight_diffs_loaded",
            "metrics_computed",
            "metrics_loaded",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.caching_disabled_reason = self.caching_disabled_reason or other.caching_disabled_reason


@dataclass
class ReportData:
    """Everything the reports render. Built by the plugin (live run or bundle replay).

    ``weight_layers[pair_id][component]`` is the mean normalized diff per decoder block
    (index = 0-based block, not the hidden-state layer of ``curves``);
    ``weight_other[pair_id][tensor]`` covers tensors outside blocks.
    """

    pairs: list[PairInfo] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    curves: dict[str, dict[str, Curve]] = field(default_factory=dict)
    weight_layers: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    weight_other: dict[str, dict[str, float]] = field(default_factory=dict)
    weight_summary: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # mean_diff, localization
    #: pair id -> the tokens behind its dominant datapoints (``reasondiff.tokens.PairTokens``),
    #: for pairs that recorded them; the terminal line and the tokens x layers figure.
    tokens: dict[str, PairTokens] = field(default_factory=dict)
    cache: CacheStats = field(default_factory=CacheStats)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class PairResult:
    """All measurements of one pair: what the finding tests, the bundle and reports use.

    ``cka`` rows name their trace as ``"<trace set>:<trace id>"`` so that trace
    invariance can split them by set; the first set in ``trace_sets`` is the primary one
    that every other finding uses.
    """

    info: PairInfo
    weights: list[WeightRecord] = field(default_factory=list)
    cka: list[CkaRecord] = field(default_factory=list)
    massive: list[MassiveRecord] = field(default_factory=list)
    trace_sets: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Per (trace, layer) the top-k dominant datapoints of each side with their tokens
    #: (dominant.csv); empty for bundles and caches that did not record them.
    dominant: list[DominantRecord] = field(default_factory=list)
    #: Filled by :func:`reasondiff.compare` (not by the pytest session, not in bundles):
    #: finding name -> Verdict, metric -> Curve of the primary trace set, and the reason
    #: when this descendant failed (then the rows are empty).
    verdicts: dict[str, Verdict] = field(default_factory=dict, compare=False, repr=False)
    curves: dict[str, Curve] = field(default_factory=dict, compare=False, repr=False)
    error: str | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        """False for a descendant that failed (``error`` says why)."""
        return self.error is None


def massive_row(m: MassiveRecord, fmt: Callable[[float], Any] = float) -> tuple[Any, ...]:
    """One massive.csv row (and frame row): lists joined by ``;``, token texts as JSON
    (they may hold ``;``, quotes or newlines); ``fmt`` formats ``max_abs``."""
    return (
        m.model,
        m.trace,
        m.layer,
        ";".join(str(p) for p in m.positions),
        fmt(m.max_abs),
        ";".join(str(i) for i in m.token_ids),
        json.dumps(list(m.tokens), ensure_ascii=False) if m.tokens else "",
    )


def dominant_row(d: DominantRecord, fmt: Callable[[float], Any] = float) -> tuple[Any, ...]:
    """One dominant.csv row (and frame row), in the record's field order; ``fmt`` formats
    the projection."""
    return (*astuple(d)[:-1], fmt(d.projection))
