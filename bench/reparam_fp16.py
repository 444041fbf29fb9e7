"""How much precision merging branches costs in float16.

    python bench/reparam_fp16.py [--blocks 20]

A merged kernel holds the identity's 1 and the conv's small weights in one float16 number, so
its rounding is relative to the larger of them. For random RepVGG blocks (3×3 + 1×1 + identity
BN, 16 channels, 16×16), in float16, the relative RMS deviation from the same block in float32
(on the same float16-representable inputs) of: the unfolded model, the BN fold alone
(`reparam=False`) and the merged model, with and without bias correction. Twice: blocks reading
the graph input (nothing known about it: sum-preserving rounding), and blocks after a BN → ReLU,
as inside a network, fed inputs that match that BN's running statistics (its output's mean and
variance are known: the merged weights' rounding uses them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from onnx import helper, numpy_helper

import bnfold

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the builders tests share
from builders import BranchGraph, random_inputs, run  # noqa: E402


def repvgg_block(dtype, seed: int, inside: bool = False):
    g = BranchGraph(channels=16, spatial=(16, 16), dtype=dtype, seed=seed)
    x = "x"
    if inside:  # x → BN → ReLU → the block
        x = g._name("relu")
        g.nodes.append(helper.make_node("Relu", [g.bn("x")], [x], name=x))
    return g.model(g.sum(g.conv(x, k=3), g.conv(x, k=1), g.bn(x)))


def block_inputs(model, seed: int, inside: bool) -> dict:
    """Float16-representable inputs; inside a network, distributed as the first BN expects."""
    feeds = random_inputs(model, seed)
    if inside:
        values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
        bn = model.graph.node[0]
        mean, var = values[bn.input[3]], values[bn.input[4]]
        z = np.random.default_rng(seed).standard_normal(feeds["x"].shape)
        feeds["x"] = mean[None, :, None, None] + np.sqrt(var)[None, :, None, None] * z
    return {k: v.astype(np.float16) for k, v in feeds.items()}


def _deviation(got: np.ndarray, want: np.ndarray) -> float:
    """Root-mean-square deviation relative to the reference's root mean square."""
    got = got.astype(np.float64)
    return float(np.sqrt(((got - want) ** 2).mean() / (want**2).mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=20)
    args = parser.parse_args()
    for inside in (False, True):
        rows = []
        for seed in range(args.blocks):
            reference, half = repvgg_block(np.float32, seed, inside), repvgg_block(np.float16, seed, inside)
            feeds = block_inputs(reference, seed, inside)
            want = run(reference, {k: v.astype(np.float32) for k, v in feeds.items()})[0].astype(np.float64)
            models = (
                half,
                bnfold.fold(half, reparam=False, bias_correction=True).model,
                bnfold.fold(half, bias_correction=False).model,
                bnfold.fold(half, bias_correction=True).model,
            )
            rows.append([_deviation(run(m, feeds)[0], want) for m in models])
        r = np.array(rows)
        where = "after BN → ReLU" if inside else "reading the graph input"
        print(f"{args.blocks} float16 RepVGG blocks {where}, relative RMS deviation from float32 (mean):")
        print(
            f"  unfolded {r[:, 0].mean():.2e}   BN fold only {r[:, 1].mean():.2e}   "
            f"merged {r[:, 2].mean():.2e}   merged, bias correction {r[:, 3].mean():.2e}"
        )
        for column, name in ((2, "merged"), (3, "merged, bias correction")):
            ratio = r[:, column] / r[:, 0]
            print(f"  {name} / unfolded: median {np.median(ratio):.2f}, max {ratio.max():.2f}")


if __name__ == "__main__":
    main()
