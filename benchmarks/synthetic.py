"""Synthetic hidden states with the structure that makes CKA analysis hard (benchmark data).

Real LLM activations are low-rank-ish, a descendant is its base plus a perturbation, and a
few tokens (the attention sink, some delimiters) carry massive activations (|value| ~ 1e4)
in a few fixed dimensions; the descendant sometimes damps or moves them. That is what
makes linear CKA dip and dominant datapoints matter, so the benchmark data has it too.
Seeded and deterministic; not a model of any particular checkpoint.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

#: Token positions and residual dimensions carrying massive activations in the base.
MASSIVE_POSITIONS = (0, 7)
MASSIVE_DIMS = (3, 11)
MASSIVE_VALUE = 1.0e4


def trace_group(
    *, seed: int, n: int, d: int, layers: int, descendants: int, rank: int = 16
) -> tuple[list[Tensor], list[list[Tensor]]]:
    """One trace's activations: ``base[l]`` and ``desc[j][l]``, each N x D float32.

    Layer l of the base is a shared low-rank signal (token factors x a per-layer basis)
    plus isotropic noise, with massive activations from layer 1 on (as in real models,
    where they appear after the first blocks). Descendant j adds a perturbation growing
    with j; in the middle layers odd descendants damp the base's massive values and even
    ones add a massive value at a new position, so the dominant tokens differ by pair.
    """
    if n <= max(MASSIVE_POSITIONS) + 1 or d <= max(MASSIVE_DIMS):
        raise ValueError(
            f"need n > {max(MASSIVE_POSITIONS) + 1} and d > {max(MASSIVE_DIMS)}, got {n} x {d}"
        )
    gen = torch.Generator().manual_seed(seed)
    factors = torch.randn(n, rank, generator=gen)
    base: list[Tensor] = []
    desc: list[list[Tensor]] = [[] for _ in range(descendants)]
    for layer in range(layers):
        basis = torch.randn(rank, d, generator=gen) * (1.0 + 0.1 * layer)
        x = factors @ basis + 0.5 * torch.randn(n, d, generator=gen)
        if layer >= 1:
            for i, pos in enumerate(MASSIVE_POSITIONS):
                x[pos, MASSIVE_DIMS[i]] = MASSIVE_VALUE * (1.0 if i == 0 else -0.3)
        base.append(x)
        middle = layers // 4 <= layer < layers - layers // 4
        for j in range(descendants):
            strength = 0.05 * (j + 1) * (1.0 + layer / layers)
            y = x + strength * (factors @ torch.randn(rank, d, generator=gen)) * 0.3
            y += strength * torch.randn(n, d, generator=gen)
            if middle and layer >= 1:
                if j % 2:
                    y[MASSIVE_POSITIONS[0], MASSIVE_DIMS[0]] *= 0.2
                else:
                    y[n // 2, MASSIVE_DIMS[0]] = 0.5 * MASSIVE_VALUE
            desc[j].append(y)
    return base, desc
