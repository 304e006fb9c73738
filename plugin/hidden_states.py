"""Where a scoring pass gets its hidden states: one pluggable source per pass.

A source is called with one trace and the models of a pass (base first) and yields
``(layer, {model_key: {"hidden": tensor, "prenorm": tensor}})`` in layer order
(``prenorm`` only for the final layer L). :class:`WholeModelForwards` runs one whole
forward per model and hands the layers out of its output. Block streaming is not a
per-trace source (it goes block-major over every trace of a pass at once, so each
checkpoint is read once): the pass runs it itself (``ScoringPass._score_streamed``).

A descendant whose forward fails is left out of every layer, with its error in
``errors[model_key]``; a failure of the base raises (every pair needs the base).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .registry import ModelSpec
from .runlog import RunLog

if TYPE_CHECKING:
    from .engine_config import EngineConfig
    from .model_pool import ModelPool
    from .traces import Trace

#: One layer of one trace: model key -> {"hidden": N x D, "prenorm": N x D (layer L only)}.
LayerStates = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class ModelRef:
    """A model of a pass: its key in the yielded dicts, its spec and checkpoint dir."""

    key: str
    spec: ModelSpec
    path: Path


class HiddenSource(Protocol):
    """What a scoring pass calls per trace (see the module docstring)."""

    def __call__(
        self,
        trace: Trace,
        models: Sequence[ModelRef],
        layers: list[int],
        num_layers: int,
        errors: dict[str, Exception],
    ) -> Iterator[tuple[int, LayerStates]]: ...


class WholeModelForwards:
    """One forward per model and trace, all layers at once, kept on the device.

    With ``keep_activations`` the hidden states go through the activation cache (float32
    on disk, moved back to the device).
    """

    def __init__(self, config: EngineConfig, pool: ModelPool, log: RunLog) -> None:
        self.config = config
        self.pool = pool
        self.log = log
        self._act_cache: Any = None

    def __call__(
        self,
        trace: Trace,
        models: Sequence[ModelRef],
        layers: list[int],
        num_layers: int,
        errors: dict[str, Exception],
    ) -> Iterator[tuple[int, LayerStates]]:
        base, *descendants = models
        out = {base.key: self._hidden(base, trace, layers)}
        for ref in descendants:
            try:
                out[ref.key] = self._hidden(ref, trace, layers)
            except Exception as exc:
                errors[ref.key] = exc
        for lay in layers:
            kinds = ("hidden", "prenorm") if lay == num_layers else ("hidden",)
            yield lay, {k: {kind: h[f"{kind}.{lay}"] for kind in kinds} for k, h in out.items()}
        del out

    def _forward(self, ref: ModelRef, trace: Trace, layers: list[int], on_device: bool) -> Any:
        from .activations import FORWARD_COUNTER, extract_activations

        model = self.pool.model(ref.spec, ref.path)  # timed as "load"
        before = FORWARD_COUNTER.count
        with self.log.stage("forwards"):
            out = dict(
                extract_activations(
                    model, list(trace.token_ids), layers=layers, on_device=on_device
                )
            )
        self.log.forwards += FORWARD_COUNTER.count - before
        self.log.stats.activations_computed += 1
        return out

    def _hidden(self, ref: ModelRef, trace: Trace, layers: list[int]) -> dict[str, Any]:
        """One model's hidden states for one trace, on the device (model dtype)."""
        if not self.config.keep_activations:
            return dict(self._forward(ref, trace, layers, on_device=True))
        from .cache import EXTRACTION_VERSION, ActivationCache
        from .metric_store import cache_key

        ids_hash = hashlib.sha256(json.dumps(list(trace.token_ids)).encode()).hexdigest()
        meta = {
            "model": self.pool.fingerprint(ref.path),
            "trace": ids_hash,
            "dtype": self.pool.dtype_for(ref.path),
            "max_tokens": str(self.config.max_tokens),
            "extraction_version": str(EXTRACTION_VERSION),
            "layers": ",".join(map(str, layers)),
        }
        computed = False

        def compute() -> dict[str, Any]:
            nonlocal computed
            computed = True
            return dict(self._forward(ref, trace, layers, on_device=False))

        if self._act_cache is None:
            self._act_cache = ActivationCache(
                self.config.cache_dir, cap_bytes=self.config.diff_cache_cap
            )
        with self.log.stage("activation cache"):
            acts = self._act_cache.get_or_compute(cache_key(**meta), meta, compute)
        self.log.cache_state(self._act_cache)
        if not computed:
            self.log.stats.activations_loaded += 1
        return {name: t.to(self.pool.device) for name, t in acts.items()}
