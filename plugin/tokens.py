"""Naming the tokens behind a bathtub: which tokens are dominant, where, and how often.

Why: the study explains linear CKA's middle-layer dip by a few *dominant datapoints*
(tokens with a huge projection on PC1) that overlap with massive activations, probably
attention sinks. Positions alone do not say that position 0 is ``<|begin▁of▁sentence|>``;
these functions turn per-(pair, trace, layer) records into the lines and tables a
researcher reads: ``'<|im_start|>' 16/16 traces, layers 4-7``.

Pure functions on plain records (no torch, no I/O); the engine records the positions,
the reports render what these return.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .records import DominantRecord, MassiveRecord, PairResult, Verdict, trace_set_of

__all__ = [
    "PairTokens",
    "TokenFrequency",
    "TokenNamer",
    "decode_each",
    "dip_layers",
    "dominant_tokens",
    "format_layers",
    "massive_overlap",
    "pair_tokens",
    "quote_token",
    "token_layer_shares",
]

#: Token id and text of a position the namer could not name (no tokenizer, out of range).
UNNAMED: tuple[int, str] = (-1, "")


def quote_token(text: str) -> str:
    """A token's text quoted so that whitespace and special tokens stay visible.

    ``' the'`` keeps its leading space, a newline shows as ``'\\n'``.
    """
    return repr(text)


def decode_each(decode: Callable[[list[int]], str], ids: Iterable[int]) -> list[str]:
    """Each id decoded on its own (``decode([id])``, special tokens kept), memoized."""
    seen: dict[int, str] = {}
    out = []
    for i in ids:
        i = int(i)
        if i not in seen:
            seen[i] = decode([i])
        out.append(seen[i])
    return out


def format_layers(layers: Iterable[int]) -> str:
    """``[4, 5, 6, 7, 12]`` -> ``"4-7, 12"``."""
    vals = sorted(set(layers))
    runs: list[str] = []
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        runs.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ", ".join(runs)


@dataclass(frozen=True)
class TokenFrequency:
    """How often one token is dominant: in ``traces`` of ``total_traces`` traces."""

    token_id: int
    token: str
    traces: int
    total_traces: int
    layers: tuple[int, ...]
    positions: tuple[int, ...]
    mean_projection: float

    def line(self) -> str:
        """``'<|im_start|>' 16/16 traces, layers 4-7 (position 0)``."""
        pos = ", ".join(str(p) for p in self.positions[:3]) + (
            ", ..." if len(self.positions) > 3 else ""
        )
        where = "position" if len(self.positions) == 1 else "positions"
        return (
            f"{quote_token(self.token)} {self.traces}/{self.total_traces} traces, "
            f"layers {format_layers(self.layers)} ({where} {pos})"
        )


def dominant_tokens(
    records: Iterable[DominantRecord],
    *,
    layers: Iterable[int] | None = None,
    model: str | None = None,
    top: int = 3,
) -> list[TokenFrequency]:
    """The ``top`` tokens most often dominant, over the given layers (all if None).

    A token counts once per trace in which it is dominant in any of those layers; ties
    break by the mean |PC1 projection|, then by token id. ``model`` keeps one side.
    """
    wanted = set(layers) if layers is not None else None
    rows = [
        r
        for r in records
        if (wanted is None or r.layer in wanted) and (model is None or r.model == model)
    ]
    total = len({r.trace for r in rows})
    by_token: dict[int, list[DominantRecord]] = {}
    for r in rows:
        by_token.setdefault(r.token_id, []).append(r)
    out = []
    for tid, rs in by_token.items():
        out.append(
            TokenFrequency(
                token_id=tid,
                token=rs[0].token,
                traces=len({r.trace for r in rs}),
                total_traces=total,
                layers=tuple(sorted({r.layer for r in rs})),
                positions=tuple(sorted({r.position for r in rs})),
                mean_projection=sum(r.projection for r in rs) / len(rs),
            )
        )
    out.sort(key=lambda t: (-t.traces, -t.mean_projection, t.token_id))
    return out[:top]


def massive_overlap(
    dominant: Iterable[DominantRecord], massive: Iterable[MassiveRecord]
) -> dict[int, float]:
    """Per layer: the share of dominant tokens that carry a massive activation.

    Pooled over traces and both sides: |dominant positions ∩ massive positions| /
    |dominant positions| of the same (model, trace, layer). The study measured ~0.4.
    """
    carriers = {(m.model, m.trace, m.layer): set(m.positions) for m in massive}
    hits: dict[int, list[int]] = {}
    for r in dominant:
        h = hits.setdefault(r.layer, [0, 0])
        h[1] += 1
        h[0] += r.position in carriers.get((r.model, r.trace, r.layer), set())
    return {lay: n / d for lay, (n, d) in sorted(hits.items()) if d}


def token_layer_shares(
    records: Sequence[DominantRecord], *, top: int = 8, model: str | None = None
) -> tuple[list[str], list[int], list[list[float]]]:
    """For the tokens x layers heatmap: (quoted tokens, layers, shares[token][layer]).

    ``shares`` is the fraction of traces in which the token is dominant at that layer;
    the tokens are the ``top`` most often dominant over all layers.
    """
    rows = [r for r in records if model is None or r.model == model]
    layers = sorted({r.layer for r in rows})
    total = len({r.trace for r in rows}) or 1
    tokens = dominant_tokens(rows, top=top)
    present = {(r.token_id, r.layer, r.trace) for r in rows}
    traces = sorted({r.trace for r in rows})
    matrix = [
        [sum((t.token_id, lay, tr) in present for tr in traces) / total for lay in layers]
        for t in tokens
    ]
    return [quote_token(t.token) for t in tokens], layers, matrix


class TokenNamer:
    """The token id and text at a position of each trace, for one base on one trace set.

    Why here and not in the cache: the metric cache stores positions only (its entries
    and keys stay as they are); ids come from the token ids the pair was scored on, and
    each id is decoded on its own with the base's tokenizer, memoized across traces. So
    a warm run names tokens from a tokenizer alone, without loading a model.
    ``decode(ids) -> str`` keeps special tokens; None leaves every text empty.
    """

    def __init__(
        self,
        ids: Mapping[str, Sequence[int]],
        decode: Callable[[list[int]], str] | None,
    ) -> None:
        self._ids = {str(k): [int(i) for i in v] for k, v in ids.items()}
        self._decode = decode
        self._text: dict[int, str] = {}

    @classmethod
    def unnamed(cls) -> TokenNamer:
        """A namer that names nothing (id -1, text ""): tokens could not be read."""
        return cls({}, None)

    def text(self, token_id: int) -> str:
        """``token_id`` decoded on its own (memoized); "" without a tokenizer."""
        if self._decode is None or token_id < 0:
            return ""
        if token_id not in self._text:
            self._text[token_id] = decode_each(self._decode, [token_id])[0]
        return self._text[token_id]

    def at(self, trace_id: str, position: int) -> tuple[int, str]:
        """(token id, text) at ``position`` of trace ``trace_id`` (its id without the set)."""
        ids = self._ids.get(trace_id)
        if ids is None or not 0 <= position < len(ids):
            return UNNAMED
        tid = ids[position]
        return tid, self.text(tid)

    def for_trace(self, trace_id: str) -> Callable[[int], tuple[int, str]]:
        """``at`` bound to one trace: what :func:`~reasondiff.metric_store.rows_from_entry` takes."""
        return lambda position: self.at(trace_id, position)


def dip_layers(bathtub: Verdict | None) -> tuple[int, ...]:
    """The layers of an *observed* bathtub dip: start .. recover - 1 (else the bottom).

    Empty when there is no verdict or it did not observe a dip (a negative control), so
    nothing downstream can name tokens "in the dip" of a pair that has none.
    """
    if bathtub is None or not bathtub.observed:
        return ()
    d = bathtub.details

    def layer(key: str) -> int | None:
        v = d.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    start, bottom, recover = layer("start"), layer("bottom"), layer("recover")
    if start is not None and recover is not None and recover > start:
        return tuple(range(start, recover))
    if start is not None and bottom is not None and bottom >= start:
        return tuple(range(start, bottom + 1))
    return (bottom,) if bottom is not None else ()


@dataclass
class PairTokens:
    """The tokens behind one pair's dominant datapoints, as the reports show them.

    Over the primary trace set, both sides pooled (the union U that the ablation removes).
    ``dip`` holds the layers of an observed bathtub dip (empty: none), ``in_dip`` the
    tokens most often dominant there, ``overall`` those over all layers; ``overlap`` is
    per layer the share of dominant tokens carrying a massive activation (study ~0.4);
    ``heat_*`` are :func:`token_layer_shares` for the tokens x layers figure.
    """

    trace_set: str
    total_traces: int
    dip: tuple[int, ...] = ()
    in_dip: list[TokenFrequency] = field(default_factory=list)
    overall: list[TokenFrequency] = field(default_factory=list)
    overlap: dict[int, float] = field(default_factory=dict)
    heat_tokens: list[str] = field(default_factory=list)
    heat_layers: list[int] = field(default_factory=list)
    heat_shares: list[list[float]] = field(default_factory=list)

    def dip_line(self) -> str | None:
        """``dominant in dip (layers 4-7): '<|bos|>' 16/16 traces (position 0); ...``;
        None without an observed dip."""
        if not self.dip or not self.in_dip:
            return None
        return f"dominant in dip (layers {format_layers(self.dip)}): " + "; ".join(
            _count_text(t) for t in self.in_dip
        )

    def overall_line(self) -> str | None:
        """``dominant (no dip; all layers): ...``: named without claiming a dip."""
        if not self.overall:
            return None
        head = "dominant (all layers)" if self.dip else "dominant (no dip; all layers)"
        return f"{head}: " + "; ".join(_count_text(t) for t in self.overall)

    def overlap_line(self) -> str | None:
        """``... (study ~0.4): layers 0-3 0.00, 4-7 0.05, 8-10 0.00``: per layer, runs of
        equal shares merged so that a 28-layer model still fits a line or two."""
        if not self.overlap:
            return None
        runs: list[tuple[list[int], str]] = []  # consecutive layers with the same share
        for lay, share in sorted(self.overlap.items()):
            text = f"{share:.2f}"
            if runs and runs[-1][1] == text and runs[-1][0][-1] == lay - 1:
                runs[-1][0].append(lay)
            else:
                runs.append(([lay], text))
        parts = ", ".join(f"{format_layers(lays)} {text}" for lays, text in runs)
        return f"share of dominant tokens with a massive activation (study ~0.4): layers {parts}"


def _count_text(t: TokenFrequency) -> str:
    """``'<|bos|>' 16/16 traces (position 0)``."""
    pos = ", ".join(str(p) for p in t.positions[:3]) + (", ..." if len(t.positions) > 3 else "")
    where = "position" if len(t.positions) == 1 else "positions"
    return f"{quote_token(t.token)} {t.traces}/{t.total_traces} traces ({where} {pos})"


def pair_tokens(
    result: PairResult,
    bathtub: Verdict | None,
    *,
    top: int = 3,
    heat_top: int = 8,
) -> PairTokens | None:
    """What the reports say about one pair's dominant tokens (None if none recorded).

    Only the primary trace set counts: the bathtub verdict is judged on it.
    """
    primary = result.trace_sets[0] if result.trace_sets else None
    dom = [r for r in result.dominant if primary is None or trace_set_of(r.trace) == primary]
    if not dom:
        return None
    traces = {r.trace for r in dom}
    massive = [m for m in result.massive if m.trace in traces]
    dip = dip_layers(bathtub)
    tokens, layers, shares = token_layer_shares(dom, top=heat_top)
    return PairTokens(
        trace_set=primary or "",
        total_traces=len(traces),
        dip=dip,
        in_dip=dominant_tokens(dom, layers=dip, top=top) if dip else [],
        overall=dominant_tokens(dom, top=top),
        overlap=massive_overlap(dom, massive),
        heat_tokens=tokens,
        heat_layers=layers,
        heat_shares=shares,
    )


def massive_tokens(
    positions: Sequence[int], name: Callable[[int], tuple[int, str]] | None
) -> dict[str, Any]:
    """``token_ids`` / ``tokens`` keywords of a :class:`MassiveRecord` for these positions."""
    if name is None:
        return {}
    named = [name(int(p)) for p in positions]
    return {"token_ids": tuple(i for i, _ in named), "tokens": tuple(t for _, t in named)}
