"""Which dtype a model's activations are computed in: ``--dtype`` resolved in one place.

``--dtype auto`` means what it means in transformers: the checkpoint's own dtype (its
config's ``dtype`` / ``torch_dtype``) on CUDA, and float32 on the CPU (bf16 matmuls are
~40x slower there). The loader (``models.load_model``) and the activation cache key
(``session``) both call :func:`resolve_dtype`, so a cache key can never name another
dtype than the one the activations were computed in. The resolved dtypes of a pair are
recorded as a note (:func:`dtype_note`), which the report shows and the results bundle
keeps; :func:`dtypes_from_notes` reads them back for the bundle's config.

This module imports no torch: ``--from-results`` replays use it too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import ModelLoadError

__all__ = [
    "DTYPE_NAMES",
    "checkpoint_dtype",
    "dtype_note",
    "dtypes_from_notes",
    "pair_dtype_key",
    "resolve_dtype",
]

#: The dtypes a model can be run in (``--dtype`` accepts these and ``auto``).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
_NOTE = re.compile(
    r"^activations computed in (?P<base>\w+) \(base (?P<bkey>.+?)\) and (?P<desc>\w+) "
    r"\(descendant (?P<dkey>.+?)\); --dtype (?P<option>\w+) on (?P<device>\w+)$"
    r"|^activations computed in (?P<both>\w+); --dtype (?P<option2>\w+) on (?P<device2>\w+)$"
)


def checkpoint_dtype(config: Mapping[str, Any] | None) -> str | None:
    """The dtype a checkpoint's config declares (``dtype``, else ``torch_dtype``), or None.

    Looks into ``text_config`` too (multimodal wrappers keep the language model there).
    Values like ``"torch.bfloat16"`` or ``"bf16"`` are normalized; anything else
    (``"auto"``, float64, float8, missing) gives None.
    """
    if not config:
        return None
    for holder in (config, config.get("text_config")):
        if not isinstance(holder, Mapping):
            continue
        for key in ("dtype", "torch_dtype"):
            value = holder.get(key)
            if isinstance(value, str):
                name = value.strip().removeprefix("torch.")
                name = _ALIASES.get(name, name)
                if name in DTYPE_NAMES:
                    return name
    return None


def resolve_dtype(option: str, device: str, config: Mapping[str, Any] | None) -> str:
    """The dtype name a model is loaded and run in.

    ``option`` is ``--dtype``: an explicit dtype wins everywhere; ``auto`` is the
    checkpoint's config dtype on CUDA (float32 when the config declares none or one this
    suite cannot run) and float32 on every other device. ``device`` is a concrete or
    ``auto``-free torch device string (``cpu``, ``cuda:0``).
    """
    if option in DTYPE_NAMES:
        return option
    if option != "auto":
        raise ModelLoadError(f"unknown dtype {option!r} (expected auto, {', '.join(DTYPE_NAMES)})")
    if device.startswith("cuda"):
        return checkpoint_dtype(config) or "float32"
    return "float32"


def pair_dtype_key(base_dtype: str, desc_dtype: str) -> str:
    """One string for a pair's cache key: the dtype, or ``base,descendant`` when they differ."""
    return base_dtype if base_dtype == desc_dtype else f"{base_dtype},{desc_dtype}"


def dtype_note(
    base_dtype: str,
    desc_dtype: str,
    *,
    base: str,
    descendant: str,
    option: str,
    device: str,
) -> str:
    """The pair note that records the dtypes (identical for every pair of a uniform run,
    so the report shows it once)."""
    kind = device.split(":", 1)[0]
    if base_dtype == desc_dtype:
        return f"activations computed in {base_dtype}; --dtype {option} on {kind}"
    return (
        f"activations computed in {base_dtype} (base {base}) and {desc_dtype} "
        f"(descendant {descendant}); --dtype {option} on {kind}"
    )


def pair_dtypes_from_notes(notes: Iterable[str], *, base: str, descendant: str) -> dict[str, str]:
    """``{model key: dtype}`` of one pair from its :func:`dtype_note`: what a merge of
    bundles compares per model (one model measured in two dtypes was not measured alike)."""
    for note in notes:
        m = _NOTE.match(note)
        if m is None:
            continue
        if m.group("both"):
            return {base: m.group("both"), descendant: m.group("both")}
        return {base: m.group("base"), descendant: m.group("desc")}
    return {}


def dtypes_from_notes(notes: Iterable[str]) -> dict[str, Any]:
    """The dtypes recorded by :func:`dtype_note` in ``notes``: for the bundle's config.

    Returns ``{"activations": [dtype, ...], "device": kind}`` (sorted, distinct), or an
    empty dict when no note records one (a bundle written before dtypes were recorded).
    """
    found: set[str] = set()
    devices: set[str] = set()
    for note in notes:
        m = _NOTE.match(note)
        if m is None:
            continue
        if m.group("both"):
            found.add(m.group("both"))
            devices.add(m.group("device2"))
        else:
            found.update((m.group("base"), m.group("desc")))
            devices.add(m.group("device"))
    if not found:
        return {}
    return {"activations": sorted(found), "device": ",".join(sorted(devices))}
