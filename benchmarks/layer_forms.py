"""One descendant-layer's full analysis vs one float64 Gram X X^T, side by side.

``python benchmarks/layer_forms.py [--n 4096] [--d 1536] [--descendants 2] [--repeats 3]
[--threads 1]``
builds a base with a massive activation and descendants near it, prepares the base once
(:func:`~reasondiff.metrics.layer.prepare_base_layer`) and times, in the same process
and interleaved, (a) one float64 Gram ``Yc @ Yc.T`` of a descendant and (b) the full
:func:`~reasondiff.metrics.layer.score_layer` of that descendant (linear, RBF,
ablation, PC1, massive activations, diagnostics). It prints the min over repeats of
each and their ratio (goal <= 2), per form, and how far the forms' values are apart.
Runs on whatever device the data is put on (``--device``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from reasondiff.metrics.layer import PreparedSide, prepare_base_layer, score_layer


def _seconds(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def gram_seconds(y: torch.Tensor, device: str) -> float:
    """One float64 Gram Yc Yc^T of the centred descendant: the unit of the ratio."""
    yc = y.double() - y.double().mean(0)
    return _seconds(lambda: yc @ yc.T, device)


def layer_seconds(
    base: PreparedSide, y: torch.Tensor, form: str, device: str
) -> tuple[float, dict[str, float]]:
    """The full analysis of one descendant-layer against the prepared base."""
    out: dict[str, float] = {}

    def score() -> None:
        out.update(score_layer(base, y, k=10, form=form)["metrics"])  # type: ignore[arg-type]

    return _seconds(score, device), out


def data(n: int, d: int, descendants: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base with a sink token's 3e4 in a shared carrier dimension, and descendants."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    x[0, 7] = 3e4
    x[:, 7] += torch.randn(n, generator=g)
    ys = [x + 0.3 * torch.randn(n, d, generator=g) for _ in range(descendants)]
    return x, ys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=1536)
    parser.add_argument("--descendants", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forms", default="auto,gram")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default); 1 keeps the ratio steady on a shared machine",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    x, ys = data(args.n, args.d, args.descendants)
    x, ys = x.to(args.device), [y.to(args.device) for y in ys]
    got: dict[str, dict[str, float]] = {}
    for form in args.forms.split(","):
        t0 = time.perf_counter()
        base = prepare_base_layer(x, name="base", k=10, form=form)  # type: ignore[arg-type]
        score_layer(base, ys[0], k=10, form=form)  # type: ignore[arg-type]  # base's kernel
        once = time.perf_counter() - t0  # the base once (+ one descendant, not counted)
        gram_s, layer_s = [], []
        for _ in range(args.repeats):
            for y in ys:
                gram_s.append(gram_seconds(y, args.device))
                seconds, got[form] = layer_seconds(base, y, form, args.device)
                layer_s.append(seconds)
        g, lay = min(gram_s), min(layer_s)
        print(
            f"form={form}: N {args.n}, D {args.d}, base once (with a first descendant) {once:.2f} s; "
            f"{torch.get_num_threads()} threads; float64 Gram {g:.3f} s, descendant-layer {lay:.3f} s (min of "
            f"{len(layer_s)}); layer_ratio={lay / g:.2f} goal=<= 2"
        )
    if len(got) > 1:
        a, b = list(got.values())[:2]
        worst = max(abs(a[m] - b[m]) for m in a)
        print(f"largest |difference| between the forms' values: {worst:.1e}")


if __name__ == "__main__":
    main()
