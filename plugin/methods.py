"""The one validation of a training method (SFT, RL, SFT+RL) for every entry point.

The registry file, ``--method`` and ``reasondiff.compare(method=...)`` all call
:func:`check_method`, so a bad method gets the same message wherever it is given.
"""

from __future__ import annotations

from .errors import RegistryError

#: The training methods a descendant may declare.
METHODS = ("SFT", "RL", "SFT+RL")

__all__ = ["METHODS", "check_method"]


def check_method(method: str | None, *, what: str = "method") -> str | None:
    """``method`` unchanged when it is None or one of :data:`METHODS`; else a
    ``RegistryError`` naming ``what`` (``--method``, ``file: [models.x] method``)."""
    if method is not None and method not in METHODS:
        raise RegistryError(f"{what} {method!r} is not one of {', '.join(METHODS)}")
    return method
