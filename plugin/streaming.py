"""Block-major hidden states of several models at once, one decoder block in memory.

The metrics are per layer, so a pass need not hold whole models: every trace's hidden
state of every model goes through block l, the caller scores layer l, block l is freed
and block l + 1 is read. Each checkpoint is read once per pass (as LLM Compressor's
"sequential onloading" does), never once per prompt (as AirLLM does), and memory holds
one block plus one layer's hidden states of every (model, trace):

    bound = max block bytes + (k + 1) x sum_t N_t x D x bytes(dtype)   (:func:`memory_bound`)

How a block-major pass reproduces the whole forward exactly: the model is built on the
meta device (no weights), and its own ``forward`` is run once per trace with the blocks
replaced by recorders. That pass runs the model's own causal-mask and rotary code and
records, for every block, the arguments the real forward would give it (mask, position
embeddings, position ids); the real blocks are then called with those arguments. The
embedding output is ``embedding(ids, rows)`` with only the rows the traces use read from
the checkpoint; the final norm is the model's own module. Keys match
:func:`reasondiff.activations.extract_activations`: ``hidden.{l}`` (l = 0..L, ``hidden.L``
after the final norm) and ``prenorm.{L}`` (the last block's output before it).

Hidden states between blocks stay on the device while the pass's states fit its budget,
otherwise in host memory, moved to the device trace by trace for each block.

Supported: decoder-only transformers models whose blocks are ``model.layers`` (Qwen2,
Qwen3, Llama, Mistral). :func:`supports_streaming` says why anything else falls back to
whole-model passes. No pytest, no caching, no metric math.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .activations import FORWARD_COUNTER
from .block_reader import SafetensorsReader
from .dtypes import resolve_dtype
from .errors import ModelLoadError, NonFiniteError, TraceError
from .models import check_compatible, checkpoint_files, read_config, torch_dtype

__all__ = [
    "STREAMABLE_MODEL_TYPES",
    "MemoryBound",
    "StreamModel",
    "StreamedLayer",
    "StreamingUnsupported",
    "memory_bound",
    "stream_layers",
    "supports_streaming",
]

#: config ``model_type`` values whose models are embeddings -> rotary -> ``model.layers``
#: -> final norm, with the mask and position code the recorder pass reuses.
STREAMABLE_MODEL_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral"})
_FALLBACK = "falls back to whole-model passes"


class StreamingUnsupported(ModelLoadError):
    """A model block streaming cannot run (the pass must load it whole)."""


@dataclass(frozen=True)
class StreamModel:
    """One model of a streamed pass: a key for the results and a checkpoint directory."""

    key: str
    path: Path


class StreamedLayer(NamedTuple):
    """One yielded layer: ``kind`` is "hidden" or "prenorm"; ``states[key][t]`` is trace
    t's [N_t, D] hidden state of model ``key``, in the pass's dtype."""

    kind: str
    layer: int
    states: dict[str, list[torch.Tensor]]


@dataclass(frozen=True)
class MemoryBound:
    """What a streamed pass holds at most, in bytes (the README's bound)."""

    block_bytes: int  # the largest block of any model, in the pass's dtype
    states_bytes: int  # (k + 1) x sum_t N_t x D x bytes: one layer of every (model, trace)
    rows_bytes: int  # the embedding rows the traces use, per model

    @property
    def total(self) -> int:
        return self.block_bytes + self.states_bytes + self.rows_bytes


# ---------------------------------------------------------------------- decisions
def supports_streaming(config: Any) -> tuple[bool, str]:
    """Whether a model (config dict or transformers config) can be block-streamed, and
    why not: the reason names the architecture and says the pass loads it whole."""
    model_type = _get(config, "model_type")
    archs = list(_get(config, "architectures") or [])
    arch = archs[0] if archs else f"model_type {model_type!r}"
    if model_type not in STREAMABLE_MODEL_TYPES:
        known = ", ".join(sorted(STREAMABLE_MODEL_TYPES))
        return False, (
            f"{arch} (model_type {model_type!r}) is not block-streamable (supported: "
            f"decoder-only {known} models with model.layers); {_FALLBACK}"
        )
    if _get(config, "auto_map"):
        return False, f"{arch} ships its own modelling code (auto_map); {_FALLBACK}"
    return True, f"{arch} streams block by block ({_get(config, 'num_hidden_layers')} blocks)"


def memory_bound(
    configs: Sequence[Any], token_counts: Sequence[int], *, dtype: torch.dtype
) -> MemoryBound:
    """The bound for streaming ``configs`` (base + k descendants) over traces of
    ``token_counts`` tokens: one block + (k + 1) x T x N x D of one layer + used rows."""
    size = torch.empty((), dtype=dtype).element_size()
    block = max(_block_params(c) for c in configs) * size
    hidden = max(int(_get(c, "hidden_size")) for c in configs)
    tokens = sum(int(n) for n in token_counts)
    return MemoryBound(
        block_bytes=block,
        states_bytes=len(configs) * tokens * hidden * size,
        rows_bytes=tokens * hidden * size,
    )


def _block_params(config: Any) -> int:
    """Parameters of one decoder block of a streamable config (attention, MLP, 2 norms)."""
    d = int(_get(config, "hidden_size"))
    heads = int(_get(config, "num_attention_heads"))
    kv = int(_get(config, "num_key_value_heads") or heads)
    head_dim = int(_get(config, "head_dim") or d // heads)
    inter = int(_get(config, "intermediate_size"))
    q, k = heads * head_dim, kv * head_dim
    bias = q + 2 * k if _get(config, "model_type") == "qwen2" else 0
    qk_norm = 2 * head_dim if _get(config, "model_type") == "qwen3" else 0
    return 2 * q * d + 2 * k * d + bias + 3 * d * inter + 2 * d + qk_norm


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


# ---------------------------------------------------------------------- the pass
def stream_layers(
    models: Sequence[StreamModel],
    traces: Sequence[Sequence[int]],
    *,
    layers: Sequence[int] | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    prenorm: bool = True,
    budget_bytes: int | None = None,
) -> Generator[StreamedLayer, None, None]:
    """Yield layer after layer, block-major, the hidden states of every (model, trace).

    ``layers`` selects the ``hidden`` layers yielded (default 0..L); ``prenorm.L`` comes
    just before ``hidden.L`` when ``prenorm``. ``dtype`` is ``--dtype`` (``auto``: float32
    on CPU, the checkpoint's dtype on CUDA, as whole loads do). ``device`` is a concrete
    torch device. States stay on ``device`` when ``(k + 1) x T x N x D`` fits
    ``budget_bytes`` (default: anything on CPU, half the free memory on CUDA), otherwise
    on the host. Score a yielded layer and drop it before resuming: states still referenced
    are kept alive and count against the memory bound.

    Raises ``StreamingUnsupported`` (the reason of :func:`supports_streaming`) for a model
    that cannot stream, ``ArchitectureMismatch`` when block counts or widths differ, and
    ``TraceError`` / ``NonFiniteError`` like ``extract_activations``.
    """
    if not models:
        raise ValueError("stream_layers: no models")
    if not traces:
        raise TraceError("stream_layers: no traces")
    ids = [[int(t) for t in trace] for trace in traces]
    for i, trace in enumerate(ids):
        if not trace:
            raise TraceError(f"stream_layers: trace {i} is an empty token sequence")
    runs = [_ModelRun.open(m, device=device, dtype=dtype) for m in models]
    for run in runs[1:]:
        check_compatible(runs[0].config, run.config, base_name=runs[0].key, desc_name=run.key)
    num_layers = int(runs[0].config.num_hidden_layers)
    wanted = _wanted(layers, num_layers)
    for run in runs:
        run.check_ids(ids)
    state_bytes = sum(len(t) * int(r.config.hidden_size) * r.elem_size for r in runs for t in ids)
    store = _state_device(device, state_bytes, budget_bytes)

    # no_grad inside each step (the _ModelRun methods), not around the yields: grad
    # mode is thread-global and would leak into the caller's code between layers.
    states = {r.key: [r.embed(t, store) for t in ids] for r in runs}
    FORWARD_COUNTER.count += len(runs) * len(ids)  # one (streamed) forward per trace
    if 0 in wanted:
        yield StreamedLayer("hidden", 0, _checked(states, "hidden.0"))
    for index in range(num_layers):
        for run in runs:
            states[run.key] = run.block(index, states[run.key], ids, store)
        layer = index + 1
        if layer < num_layers and layer in wanted:
            yield StreamedLayer("hidden", layer, _checked(states, f"hidden.{layer}"))
    if prenorm:
        yield StreamedLayer("prenorm", num_layers, _checked(states, f"prenorm.{num_layers}"))
    if num_layers in wanted:
        final = {r.key: r.final_norm(states[r.key], store) for r in runs}
        del states
        yield StreamedLayer("hidden", num_layers, _checked(final, f"hidden.{num_layers}"))


def _wanted(layers: Sequence[int] | None, num_layers: int) -> set[int]:
    if layers is None:
        return set(range(num_layers + 1))
    bad = [x for x in layers if not 0 <= int(x) <= num_layers]
    if bad:
        raise TraceError(f"layers {bad} out of range; hidden states exist for 0..{num_layers}")
    return {int(x) for x in layers}


def _state_device(device: str, state_bytes: int, budget_bytes: int | None) -> str:
    """Where hidden states wait between blocks: ``device`` if they fit, else the host."""
    if not device.startswith("cuda"):
        return device if budget_bytes is None or state_bytes <= budget_bytes else "cpu"
    if budget_bytes is None:
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        budget_bytes = free // 2
    return device if state_bytes <= budget_bytes else "cpu"


def _checked(states: dict[str, list[torch.Tensor]], key: str) -> dict[str, list[torch.Tensor]]:
    """The states as [N, D] views; NaN/Inf is a ``NonFiniteError`` naming model and layer."""
    out = {}
    for model, per_trace in states.items():
        views = [h[0] for h in per_trace]
        for t, x in enumerate(views):
            if not bool(torch.isfinite(x).all()):
                rows = (~torch.isfinite(x)).any(dim=1).nonzero().flatten().tolist()
                raise NonFiniteError(
                    f"model {model}: NaN/Inf activations in {key} (layer "
                    f"{key.split('.', 1)[1]}) of trace {t} at token positions {rows[:10]}"
                )
        out[model] = views
    return out


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another libc, another OS)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_TRIM = _malloc_trim()


def _return_freed_memory() -> None:
    """Give the freed block's pages back to the OS. Why: glibc serves tensors under its
    mmap threshold (up to 32 MiB) from heap arenas and keeps them after ``free``; with
    several intra-op threads the arenas fragment and a streamed pass's RSS grew by about
    1.5 blocks per block (measured: 8 threads, 8 blocks of 11.5 MiB, +144 MiB), so the
    bound would not hold. ``malloc_trim(0)`` releases free pages of every arena."""
    if _TRIM is not None:
        _TRIM(0)


class _Stop(Exception):
    """Raised by the last recorder: the recorder pass needs nothing after the blocks."""


class _Recorder(torch.nn.Module):
    """Stands in for block i in the recorder pass: keeps the arguments, returns its input."""

    def __init__(self, slot: list[dict[str, Any]], last: bool):
        super().__init__()
        self.slot, self.last = slot, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise TraceError(f"block called with {len(args)} positional arguments; expected 1")
        self.slot.append(kwargs)
        if self.last:
            raise _Stop
        return hidden_states


@dataclass
class _ModelRun:
    """One model of the pass: meta skeleton, checkpoint reader, per-length block args."""

    key: str
    config: Any
    inner: Any  # the decoder (e.g. Qwen2Model) on the meta device
    reader: SafetensorsReader
    prefix: str  # "model." for *ForCausalLM checkpoints, "" for bare decoders
    device: str
    dtype: torch.dtype
    block_args: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def elem_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def open(cls, model: StreamModel, *, device: str, dtype: str) -> _ModelRun:
        path = Path(model.path)
        cfg = read_config(path, name=model.key)
        ok, reason = supports_streaming(cfg)
        if not ok:
            raise StreamingUnsupported(f"model {model.key!r}: {reason}")
        if checkpoint_files(path, allow_pickle=True, name=model.key).format != "safetensors":
            raise StreamingUnsupported(
                f"model {model.key!r}: pickle weights cannot be read block by block; {_FALLBACK}"
            )
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path)
        dt = torch_dtype(resolve_dtype(dtype, device, cfg))
        with torch.device("meta"):
            inner: Any = AutoModel.from_config(config, dtype=dt)  # type: ignore[no-untyped-call]
        for part in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(inner, part):
                raise StreamingUnsupported(
                    f"model {model.key!r}: {type(inner).__name__} has no {part}; {_FALLBACK}"
                )
        if type(inner.embed_tokens) is not torch.nn.Embedding:
            raise StreamingUnsupported(
                f"model {model.key!r}: {type(inner).__name__}'s embedding is "
                f"{type(inner.embed_tokens).__name__}, not a plain lookup; {_FALLBACK}"
            )
        # inv_freq is computed at construction: build the rotary module for real, once.
        inner.rotary_emb = type(inner.rotary_emb)(config=inner.config).to(device)
        reader = SafetensorsReader(path, name=model.key)
        prefix = next(
            (p for p in ("model.", "") if f"{p}embed_tokens.weight" in reader.entries), None
        )
        if prefix is None:
            raise ModelLoadError(
                f"model {model.key!r} at {path}: no embed_tokens.weight (looked for "
                "model.embed_tokens.weight and embed_tokens.weight)"
            )
        return cls(model.key, config, inner, reader, prefix, device, dt)

    def check_ids(self, ids: list[list[int]]) -> None:
        vocab = int(self.reader.entry(f"{self.prefix}embed_tokens.weight").shape[0])
        for t, trace in enumerate(ids):
            bad = [(i, x) for i, x in enumerate(trace) if not 0 <= x < vocab]
            if bad:
                raise TraceError(
                    f"model {self.key}: trace {t} has token ids outside its vocabulary (size "
                    f"{vocab}) at (position, id) {bad[:10]}"
                )

    @torch.no_grad()
    def embed(self, trace: list[int], store: str) -> torch.Tensor:
        """[1, N, D] embedding output from the rows this trace uses."""
        rows = sorted(set(trace))
        weight = self.reader.read_rows(
            f"{self.prefix}embed_tokens.weight", rows, dtype=self.dtype, device=self.device
        )
        where = {r: i for i, r in enumerate(rows)}
        local = torch.tensor([[where[x] for x in trace]], dtype=torch.long, device=self.device)
        return torch.nn.functional.embedding(local, weight).to(store)

    @torch.no_grad()
    def args_for(self, n: int) -> list[dict[str, Any]]:
        """Every block's keyword arguments for a trace of n tokens, from the model's own
        forward (mask, rotary position embeddings, position ids), run without blocks."""
        if n not in self.block_args:
            slots: list[dict[str, Any]] = []
            count = int(self.config.num_hidden_layers)
            recorders = torch.nn.ModuleList(
                [_Recorder(slots, last=i == count - 1) for i in range(count)]
            )
            blocks, self.inner.layers = self.inner.layers, recorders
            try:
                probe = torch.zeros((1, n, int(self.config.hidden_size)), dtype=self.dtype)
                probe = probe.to(self.device)
                mask = torch.ones((1, n), dtype=torch.long, device=self.device)
                with contextlib.suppress(_Stop):
                    self.inner(inputs_embeds=probe, attention_mask=mask, use_cache=False)
            finally:
                self.inner.layers = blocks
            if len(slots) != count:
                raise TraceError(
                    f"model {self.key}: the recorder pass saw {len(slots)} of {count} blocks"
                )
            self.block_args[n] = slots
        return self.block_args[n]

    @torch.no_grad()
    def block(
        self, index: int, states: list[torch.Tensor], ids: list[list[int]], store: str
    ) -> list[torch.Tensor]:
        """Block ``index`` read from the checkpoint, run on every trace, then freed."""
        module = self.inner.layers[index]
        self._materialize(module, f"{self.prefix}layers.{index}.", f"block {index}")
        try:
            for t, h in enumerate(states):
                kwargs = self.args_for(len(ids[t]))[index]
                y = module(h.to(self.device), **kwargs)
                del h
                states[t] = (y[0] if isinstance(y, tuple) else y).to(store)
            return states
        finally:
            module.to("meta")
            _return_freed_memory()

    @torch.no_grad()
    def final_norm(self, states: list[torch.Tensor], store: str) -> list[torch.Tensor]:
        norm = self.inner.norm
        self._materialize(norm, f"{self.prefix}norm.", "the final norm")
        try:
            return [norm(h.to(self.device)).to(store) for h in states]
        finally:
            norm.to("meta")

    def _materialize(self, module: torch.nn.Module, prefix: str, what: str) -> None:
        """Read the module's parameters by name from the checkpoint onto the device."""
        state = {}
        for name, param in module.named_parameters():
            tensor = prefix + name
            entry = self.reader.entry(tensor)
            if tuple(entry.shape) != tuple(param.shape):
                raise ModelLoadError(
                    f"model {self.key!r}: {what}: tensor {tensor} has shape {list(entry.shape)}, "
                    f"the config expects {list(param.shape)}"
                )
            state[name] = self.reader.read(tensor, dtype=param.dtype, device=self.device)
        persistent = {n for n, _ in module.named_buffers() if n in module.state_dict()}
        for name in persistent:
            state[name] = self.reader.read(prefix + name, device=self.device)
        module.load_state_dict(state, strict=True, assign=True)
