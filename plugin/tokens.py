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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .records import DominantRecord, MassiveRecord

__all__ = [
    "TokenFrequency",
    "decode_each",
    "dominant_tokens",
    "format_layers",
    "massive_overlap",
    "quote_token",
    "token_layer_shares",
]


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
