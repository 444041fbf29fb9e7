"""How much precision merging branches costs in float16.

    python bench/reparam_fp16.py [--blocks 20]

A merged kernel holds the identity's 1 and the conv's small weights in one float16 number, so
its rounding is relative to the larger of them. For random RepVGG blocks (3×3 + 1×1 + identity
BN, 16 channels, 16×16), in float16, the relative RMS deviation from the same block in float32
(on the same float16-representable inputs) of: the unfolded model, the BN fold alone
(`reparam=False`) and the merged model.
"""

from __future__ import annotations

import argparse

import numpy as np

import bnfold
from bnfold.testing import BranchGraph, random_inputs, run


def repvgg_block(dtype, seed: int):
    g = BranchGraph(channels=16, spatial=(16, 16), dtype=dtype, seed=seed)
    return g.model(g.sum(g.conv(k=3), g.conv(k=1), g.bn()))


def _deviation(got: np.ndarray, want: np.ndarray) -> float:
    """Root-mean-square deviation relative to the reference's root mean square."""
    got = got.astype(np.float64)
    return float(np.sqrt(((got - want) ** 2).mean() / (want**2).mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=20)
    args = parser.parse_args()
    rows = []
    for seed in range(args.blocks):
        reference, half = repvgg_block(np.float32, seed), repvgg_block(np.float16, seed)
        feeds = {k: v.astype(np.float16) for k, v in random_inputs(reference, seed).items()}
        want = run(reference, {k: v.astype(np.float32) for k, v in feeds.items()})[0].astype(np.float64)

        models = (half, bnfold.fold(half, reparam=False).model, bnfold.fold(half).model)
        rows.append([_deviation(run(m, feeds)[0], want) for m in models])
    r = np.array(rows)
    print(f"{args.blocks} float16 RepVGG blocks, relative RMS deviation from float32 (mean):")
    print(f"  unfolded {r[:, 0].mean():.2e}   BN fold only {r[:, 1].mean():.2e}   merged {r[:, 2].mean():.2e}")
    print(f"  merged / unfolded: median {np.median(r[:, 2] / r[:, 0]):.2f}, max {(r[:, 2] / r[:, 0]).max():.2f}")


if __name__ == "__main__":
    main()
