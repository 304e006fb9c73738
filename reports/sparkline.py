"""Character-level glyphs for the terminal report: sparklines, shade cells, a colour ramp.

Why a module of its own: the mapping from a number to a glyph is the one place where
the report's visual scale is decided (a *fixed* 0..1 axis for CKA, so rows are
comparable; each pair's own maximum for weight-diff heatmaps), and it must work on terminals
that cannot print Unicode. Nothing here computes a metric; it only maps given values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Eight levels, lowest first. The ASCII ramp has the same length so a value maps to
#: the same level index whichever alphabet is in use.
BLOCKS = "▁▂▃▄▅▆▇█"
ASCII_BLOCKS = "_.-:=+*#"
#: Heatmap shades when colour is off (lowest = blank, as a printed heatmap would be).
SHADES = " ░▒▓█"
ASCII_SHADES = " .:*#"

#: Anchor points of the viridis colour map (perceptually uniform, colour-blind safe).
_VIRIDIS = (
    (68, 1, 84),
    (59, 82, 139),
    (33, 145, 140),
    (94, 201, 98),
    (253, 231, 37),
)


@dataclass(frozen=True)
class Glyphs:
    """The characters one report uses; the ASCII set keeps CI logs on odd locales legible."""

    blocks: str
    shades: str
    missing: str  # a value that is NaN / absent
    dash: str  # an empty table cell
    sep: str  # between parts of a heading
    saturated: str = "^"  # a heatmap cell above the scale (an outlier, e.g. a zero base)

    @classmethod
    def for_console(cls, *, ascii_only: bool) -> Glyphs:
        if ascii_only:
            return cls(ASCII_BLOCKS, ASCII_SHADES, "?", "-", "-", "^")
        return cls(BLOCKS, SHADES, "·", "—", "·", "▲")


def level(value: float, levels: int, *, lo: float = 0.0, hi: float = 1.0) -> int | None:
    """Index 0..levels-1 of ``value`` on the fixed axis lo..hi (clamped); None for NaN.

    Clamping, not rescaling: debiased CKA can dip slightly below 0, and a per-row
    rescale would make a flat 0.99 curve look like a bathtub.
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if hi <= lo:
        raise ValueError(f"empty axis: lo={lo} >= hi={hi}")
    if value is None or not math.isfinite(value):
        return None
    frac = (min(max(value, lo), hi) - lo) / (hi - lo)
    return min(levels - 1, round(frac * (levels - 1)))


def sparkline(
    values: Sequence[float],
    *,
    glyphs: Glyphs,
    lo: float = 0.0,
    hi: float = 1.0,
) -> str:
    """One character per value on the fixed axis lo..hi (default 0..1, the CKA range)."""
    out = []
    for value in values:
        idx = level(value, len(glyphs.blocks), lo=lo, hi=hi)
        out.append(glyphs.missing if idx is None else glyphs.blocks[idx])
    return "".join(out)


def shade(value: float, vmax: float, *, glyphs: Glyphs) -> str:
    """A shade character for a heatmap cell on the axis 0..vmax (colour-off rendering).

    Any strictly positive value gets at least the lightest non-blank shade, so a
    small-but-real change never prints as "no change".
    """
    if value is None or not math.isfinite(value):
        return glyphs.missing
    if vmax <= 0 or value <= 0:
        return glyphs.shades[0]
    idx = level(value, len(glyphs.shades), lo=0.0, hi=vmax)
    return glyphs.shades[max(1, idx or 0)]


def ramp_rgb(frac: float) -> tuple[int, int, int]:
    """Colour for ``frac`` in 0..1 on a sequential (viridis) scale, linearly interpolated."""
    if not math.isfinite(frac):
        raise ValueError(f"colour ramp needs a finite fraction, got {frac}")
    frac = min(max(frac, 0.0), 1.0)
    pos = frac * (len(_VIRIDIS) - 1)
    i = min(int(pos), len(_VIRIDIS) - 2)
    t = pos - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    r, g, bl = (round(a[k] + (b[k] - a[k]) * t) for k in range(3))
    return r, g, bl
