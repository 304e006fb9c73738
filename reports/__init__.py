"""reasondiff.reports: render a ``ReportData`` as a terminal report, PNG figures and
``index.md``. Render only: every number arrives computed by the plugin.

The figure functions are imported lazily so that printing the terminal report at the
end of a pytest run does not pay for importing matplotlib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .terminal import make_console, render_plain_summary, render_terminal

if TYPE_CHECKING:
    from .figures import FigureInfo, write_figures
    from .index import write_index

__all__ = [
    "FigureInfo",
    "make_console",
    "render_plain_summary",
    "render_terminal",
    "write_figures",
    "write_index",
]

_LAZY = {"FigureInfo": "figures", "write_figures": "figures", "write_index": "index"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
