"""One layer at a study shape: the engine's shared base in both forms vs nothing shared.

``python benchmarks/layer_forms.py [--n 4096] [--d 1536] [--descendants 2]`` prints, for
the CPU's automatic form and the GPU's Gram form, the time to prepare the base once and
to score each descendant against it, next to today's pairwise path (both sides prepared
per pair), and how far the forms' values are apart. Runs on whatever device the data is
put on (``--device``).
"""

from __future__ import annotations

import argparse
import time

import torch

from reasondiff.metrics.layer import prepare_base_layer, score_layer, score_pair_layer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=1536)
    parser.add_argument("--descendants", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.d, generator=g)
    x[0, 7] = 3e4  # a sink token's massive activation in a shared carrier dimension
    x[:, 7] += torch.randn(args.n, generator=g)
    ys = [x + 0.3 * torch.randn(args.n, args.d, generator=g) for _ in range(args.descendants)]
    x, ys = x.to(args.device), [y.to(args.device) for y in ys]
    got = {}
    for form in ("auto", "gram"):
        t0 = time.perf_counter()
        base = prepare_base_layer(x, name="base", k=10, form=form)  # type: ignore[arg-type]
        once = time.perf_counter() - t0
        each = []
        for y in ys:
            t0 = time.perf_counter()
            got[form] = score_layer(base, y, k=10, form=form)["metrics"]  # type: ignore[arg-type]
            each.append(time.perf_counter() - t0)
        print(
            f"form={form}: base once {once:.2f} s; per descendant "
            + ", ".join(f"{t:.2f} s" for t in each)
        )
    t0 = time.perf_counter()
    score_pair_layer(x, ys[-1], k=10)
    print(f"today's pairwise path (nothing shared): {time.perf_counter() - t0:.2f} s")
    for m in ("linear", "rbf", "linear_without_dominant"):
        print(f"|auto - gram| {m}: {abs(got['auto'][m] - got['gram'][m]):.1e}")


if __name__ == "__main__":
    main()
