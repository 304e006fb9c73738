"""What an engine is told: :class:`EngineConfig` and the trace sets it runs on.

Its own module so that the engine's rooms (model pool, scheduler, scoring pass, hidden
states) read the config without importing the engine that assembles them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .metrics.defaults import DOMINANT_K, MAX_TOKENS, RBF_MEDIAN

if TYPE_CHECKING:
    from .traces import TraceSet


@dataclass(frozen=True)
class EngineConfig:
    """What the engine needs to know; the pytest options map onto it one to one."""

    cache_dir: Path
    device: str = "auto"
    dtype: str = "auto"
    max_tokens: int = MAX_TOKENS
    layers: tuple[int, ...] | None = None
    dominant_k: int = DOMINANT_K
    rbf_median: str = RBF_MEDIAN
    keep_activations: bool = False
    diff_cache_cap: int | None = None
    torch_threads: int | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    #: Descendants scored in one pass at most (None: as many as fit in memory, see
    #: :meth:`ModelPool.memory_budget <reasondiff.model_pool.ModelPool.memory_budget>`); each is resident on the device during the pass.
    pass_size: int | None = None
    #: Block-streamed passes (:mod:`reasondiff.streaming`) for every pass; when False a
    #: pass streams only if its models do not fit the memory budget.
    stream_blocks: bool = False

    @classmethod
    def from_options(cls, options: Any) -> EngineConfig:
        """From :class:`~reasondiff.options.DiffOptions` (duck-typed: no pytest import)."""
        return cls(
            cache_dir=options.cache_dir(),
            device=options.device,
            dtype=options.dtype,
            max_tokens=options.max_tokens,
            layers=options.layers,
            dominant_k=options.dominant_k,
            rbf_median=options.rbf_median,
            keep_activations=options.keep_activations,
            diff_cache_cap=options.diff_cache_cap,
            torch_threads=options.torch_threads,
            trust_remote_code=options.trust_remote_code,
            allow_pickle=options.allow_pickle,
            pass_size=options.pass_size,
            stream_blocks=options.stream_blocks,
        )


@dataclass
class TraceSource:
    """One trace set as the engine uses it: a short name (row prefix) and its traces."""

    name: str
    path: Path
    trace_set: TraceSet
