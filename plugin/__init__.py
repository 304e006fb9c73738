"""reasondiff: localize what reasoning training changed in a model, as pytest tests.

Importing this package is cheap on purpose (a pytest plugin is imported on every
run): torch and transformers are imported inside the functions that need them.
``reasondiff.compare(base, descendants, traces=...)`` runs the comparison without
pytest and returns a ``Comparison`` (see :mod:`reasondiff.api`); the findings are
library functions in :mod:`reasondiff.findings`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Comparison", "__version__", "compare"]


def __getattr__(name: str) -> Any:
    # Lazy, so that ``import reasondiff`` (every pytest start) stays cheap.
    if name in ("compare", "Comparison"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'reasondiff' has no attribute {name!r}")
