"""Hidden states of one token sequence, from exactly one forward pass (METHODS §1).

Returns ``hidden.{l}`` for l in 0..L as transformers' ``hidden_states`` gives them
(l = 0 the embedding output, l = L after the final norm in Qwen2/Llama) plus
``prenorm.{L}``: the last block's output *before* the final norm, captured with a
forward hook, so a report can tell a real final-layer change from a norm effect.
Models without a final norm (BERT-style encoders) give ``prenorm.L == hidden.L``.

Everything comes back as float32, on CPU, contiguous, shape [N, D], or (``on_device``)
where the forward made it, in the model's dtype. This module does no caching and no
metric math.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from .errors import NonFiniteError, TraceError
from .models import LoadedModel

__all__ = ["FORWARD_COUNTER", "ForwardCounter", "extract_activations", "find_block_list"]

_MAX_POSITIONS_SHOWN = 10


class ForwardCounter:
    """Counts model forwards, so tests and benchmarks can assert "one forward per trace"."""

    def __init__(self) -> None:
        self.count = 0

    def reset(self) -> None:
        self.count = 0


FORWARD_COUNTER = ForwardCounter()


def find_block_list(model: torch.nn.Module, num_layers: int) -> torch.nn.ModuleList:
    """The decoder/encoder block list: the largest ``ModuleList`` of ``num_layers`` modules.

    Generic on purpose (Qwen2/Llama ``model.layers``, BERT ``encoder.layer``, GPT-2
    ``transformer.h``); the largest by parameter count wins over e.g. per-layer norms.
    """
    best: torch.nn.ModuleList | None = None
    best_size = -1
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    if best is None:
        raise TraceError(
            f"{type(model).__name__}: found no ModuleList of {num_layers} blocks "
            "(config.num_hidden_layers); cannot hook the last block"
        )
    return best


def extract_activations(
    model: LoadedModel | torch.nn.Module,
    token_ids: Sequence[int],
    *,
    layers: Sequence[int] | None = None,
    name: str | None = None,
    on_device: bool = False,
) -> dict[str, torch.Tensor]:
    """One forward; ``hidden.{l}`` for ``layers`` (default 0..L) and ``prenorm.{L}``.

    ``on_device=True`` keeps every tensor where the forward made it, in the model's
    dtype ([N, D] views, no copy): the engine scores them there (a GPU box never moves
    hidden states to the host). Otherwise float32, CPU, contiguous (the activation cache).

    ``model`` is a ``LoadedModel`` (its name is used in errors) or a bare transformers
    module with a ``config``. Raises ``NonFiniteError`` naming the model, layer and token
    positions when a NaN/Inf appears, and ``TraceError`` for empty or out-of-vocabulary
    input.
    """
    module, label = (model.model, model.name) if isinstance(model, LoadedModel) else (model, "")
    label = name or label or type(module).__name__
    config: Any = module.config
    num_layers = int(config.num_hidden_layers)
    wanted = _check_layers(layers, num_layers, label)
    ids = _check_ids(token_ids, config, label)

    device = next(module.parameters()).device
    block = find_block_list(module, num_layers)[-1]
    captured: list[torch.Tensor] = []

    def hook(_mod: torch.nn.Module, _inp: Any, out: Any) -> None:
        captured.append(out[0] if isinstance(out, tuple) else out)

    handle = block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            input_ids = torch.tensor([ids], dtype=torch.long, device=device)
            kwargs: dict[str, Any] = {"output_hidden_states": True}
            if _accepts(module, "use_cache"):
                kwargs["use_cache"] = False  # no KV cache: one pass, nothing to keep
            out = module(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
            FORWARD_COUNTER.count += 1
    finally:
        handle.remove()
    hidden = out.hidden_states
    if hidden is None or len(hidden) != num_layers + 1:
        got = "none" if hidden is None else len(hidden)
        raise TraceError(f"model {label}: expected {num_layers + 1} hidden states (L+1), got {got}")
    if len(captured) != 1:
        raise TraceError(
            f"model {label}: the last-block hook fired {len(captured)} times in one forward"
        )
    move = _squeeze if on_device else _to_cpu
    result = {f"hidden.{layer}": move(hidden[layer]) for layer in wanted}
    # clone: without a final norm the hook output *is* hidden.L, and tensors sharing
    # storage cannot be written to one safetensors file.
    result[f"prenorm.{num_layers}"] = move(captured[0]).clone()
    for key, tensor in result.items():
        _check_finite(tensor, label, key)
    return result


def _accepts(module: torch.nn.Module, arg: str) -> bool:
    """Whether ``module.forward`` takes ``arg`` (by name or through ``**kwargs``)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return True
    return arg in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _squeeze(t: torch.Tensor) -> torch.Tensor:
    """[1, N, D] -> [N, D], same device and dtype (a view)."""
    x = t.detach()
    return x[0] if x.dim() == 3 else x


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    """[1, N, D] (any dtype, any device) -> [N, D] float32 CPU contiguous."""
    x = t.detach()
    if x.dim() == 3:
        x = x[0]
    return x.to(device="cpu", dtype=torch.float32).contiguous()


def _check_layers(layers: Sequence[int] | None, num_layers: int, label: str) -> list[int]:
    if layers is None:
        return list(range(num_layers + 1))
    bad = [layer for layer in layers if not 0 <= int(layer) <= num_layers]
    if bad:
        raise TraceError(
            f"model {label}: layers {bad} out of range; hidden states exist for 0..{num_layers}"
        )
    return sorted({int(layer) for layer in layers})


def _check_ids(token_ids: Sequence[int], config: Any, label: str) -> list[int]:
    ids = [int(t) for t in token_ids]
    if not ids:
        raise TraceError(f"model {label}: empty token sequence")
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int):
        bad = [(i, t) for i, t in enumerate(ids) if not 0 <= t < vocab]
        if bad:
            raise TraceError(
                f"model {label}: token ids outside its vocabulary (size {vocab}) at "
                f"(position, id) {bad[:_MAX_POSITIONS_SHOWN]}"
            )
    return ids


def _check_finite(x: torch.Tensor, label: str, key: str) -> None:
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    rows = (~finite).reshape(x.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
    shown = rows[:_MAX_POSITIONS_SHOWN]
    more = f" (+{len(rows) - len(shown)} more)" if len(rows) > len(shown) else ""
    layer = key.split(".", 1)[1]
    raise NonFiniteError(
        f"model {label}: NaN/Inf activations in {key} (layer {layer}) at token positions "
        f"{shown}{more}"
    )
