"""The algebra of branch merging: a term affine in a tensor x, held as the conv that computes
it, and the sum of two terms as one conv (reparam.py finds the terms in a graph).

Every term is a conv of x: Conv(x; W, b) itself; BN(x) = s·x + t the 1×1 depthwise conv with
weights s and bias t; x the one with weights 1; a constant the conv with weights 0. Convs that
share stride add up into one conv, exactly:

    Conv(x; W₁, b₁) + Conv(x; W₂, b₂) = Conv(x; W₁ ⊕ W₂, b₁ + b₂)

when the kernels line up in the larger one (a k-wide kernel with begin pad p sits at offset
j₀ = (P − p)/d in a K-wide kernel with begin pad P, and the end pads agree likewise), and a
group-g kernel is a special case of a group-g' kernel when g' divides g (block-diagonal).
Kernels and biases are summed in float64 and rounded once to the weight's dtype. Terms that do
not line up are a Skip the report shows; a sum of terms in different tensors (a ResNet shortcut)
is no branch sum at all (NOT_MINE).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import gcd

import numpy as np
import onnx

from bnfold.folding.plan import NotMine, Skip
from bnfold.graph.protos import node_label


@dataclass
class Term:
    """A tensor affine in x, as Conv(x; kernel, bias) with this geometry (float64 once merged)."""

    kernel: np.ndarray  # [C_out, C_in / group, k…]; a Conv's own until it meets another term
    bias: np.ndarray  # [C_out]
    group: int
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # ONNX order: begins, then ends
    nodes: list  # the nodes this term replaces
    branches: list[str]  # what was merged, for the report
    convs: int  # how many Conv nodes it replaces
    x: str = ""  # the tensor every branch reads
    dtype: np.dtype | None = None  # the Conv weights' dtype (None: no conv among the branches yet)

    @property
    def in_channels(self) -> int:
        return self.kernel.shape[1] * self.group


def add_all(node: onnx.NodeProto, terms: list[Term]) -> Term | Skip | NotMine:
    """The sum `node` of its inputs' terms, left to right."""
    merged = terms[0]
    for term in terms[1:]:
        if merged.x and term.x and merged.x != term.x:
            return NotMine(f"{node_label(node)} sums terms of different tensors ('{merged.x}', '{term.x}')")
        x = merged.x or term.x  # a constant term is affine in any x
        merged = add(merged, term)
        if isinstance(merged, Skip):
            return merged
        merged.x = x
    merged.nodes.append(node)
    return merged


def identity(x: str, channels: int | None = None) -> Term:
    """x itself: a per-channel term with weight 1 (kernel [C, 1], group C, no spatial axes yet).
    Until its channel count is known it holds one coefficient for every channel (group 0);
    `with_channels` spreads it when it meets a BN, a conv or a layer scale."""
    count = channels or 1
    return Term(
        kernel=np.ones((count, 1)),
        bias=np.zeros(count),
        group=channels or 0,
        strides=(),
        dilations=(),
        pads=(),
        nodes=[],
        branches=["identity"],
        convs=0,
        x=x,
    )


def with_channels(term: Term, channels: int) -> Term:
    """A one-coefficient term (group 0, see identity) as `channels` equal per-channel ones."""
    if term.group != 0:
        return term
    return replace(
        term, kernel=np.repeat(term.kernel, channels, axis=0), bias=np.repeat(term.bias, channels), group=channels
    )


def bias_term(vector: np.ndarray) -> Term:
    """A constant, one value per channel: affine in any x, with weight 0."""
    channels = vector.shape[0]
    return Term(
        kernel=np.zeros((channels, 1)), bias=vector, group=channels, strides=(), dilations=(), pads=(),
        nodes=[], branches=["a constant"], convs=0, x="",
    )  # fmt: skip


def add(a: Term, b: Term) -> Term | Skip:
    """a + b as one Term, if their geometries line up (module docstring)."""
    a, b = _shaped_alike(a, b), _shaped_alike(b, a)
    for term in (a, b):
        if isinstance(term, Skip):
            return term
    if a.kernel.shape[0] != b.kernel.shape[0] or a.in_channels != b.in_channels:
        return Skip(
            f"branches map {a.in_channels}→{a.kernel.shape[0]} and {b.in_channels}→{b.kernel.shape[0]} channels"
        )
    if a.strides != b.strides:
        return Skip(f"branches have different strides ({list(a.strides)} and {list(b.strides)})")
    spatial = a.kernel.ndim - 2
    dilations, sizes, pads = [], [], [[0, 0] for _ in range(spatial)]
    for axis in range(spatial):
        ka, kb = a.kernel.shape[2 + axis], b.kernel.shape[2 + axis]
        da, db = a.dilations[axis], b.dilations[axis]
        if ka > 1 and kb > 1 and da != db:
            return Skip(f"branches have different dilations ({list(a.dilations)} and {list(b.dilations)})")
        dilations.append(da if ka > 1 else db)
        sizes.append(max(ka, kb))
        big = a if ka >= kb else b
        pads[axis] = [big.pads[axis], big.pads[spatial + axis]]
    group = gcd(a.group, b.group)
    kernels = []
    for term in (a, b):
        kernel = _regroup(term.kernel.astype(np.float64, copy=False), term.group, group)
        offsets = []
        for axis in range(spatial):
            k, d = term.kernel.shape[2 + axis], dilations[axis]
            begin = pads[axis][0] - term.pads[axis]
            end = pads[axis][1] - term.pads[spatial + axis]
            if begin % d or end % d or begin < 0 or end < 0 or begin // d + end // d != sizes[axis] - k:
                return Skip(
                    f"{' + '.join(term.branches)} (kernel {list(term.kernel.shape[2:])}, pads {list(term.pads)}) "
                    f"does not line up in the {'×'.join(map(str, sizes))} kernel with pads "
                    f"{[p[0] for p in pads] + [p[1] for p in pads]}"
                )
            offsets.append((begin // d, end // d))
        kernels.append(np.pad(kernel, [(0, 0), (0, 0), *offsets]))
    return Term(
        kernel=kernels[0] + kernels[1],
        bias=a.bias + b.bias,
        group=group,
        strides=a.strides,
        dilations=tuple(dilations),
        pads=tuple(p[0] for p in pads) + tuple(p[1] for p in pads),
        nodes=a.nodes + b.nodes,
        branches=a.branches + b.branches,
        convs=a.convs + b.convs,
        x=a.x,
        dtype=a.dtype or b.dtype,
    )


def _shaped_alike(term: Term, other: Term) -> Term | Skip:
    """A per-channel term (identity, BN) beside another term: it takes the other's channel count
    if it had none yet, and beside a conv the conv's rank (1-wide kernel, stride 1, no padding).
    A conv term is returned as it is."""
    if term.strides:
        return term
    if other.group != 0:
        term = with_channels(term, other.kernel.shape[0])
    if not other.strides:
        return term  # two per-channel terms add as they are
    channels = other.kernel.shape[0]
    if other.in_channels != channels:
        return Skip(f"an identity branch sits beside a {other.in_channels}→{channels}-channel conv")
    if term.kernel.shape[0] != channels:
        return Skip(f"a {term.kernel.shape[0]}-channel branch sits beside a {channels}-channel conv")
    spatial = other.kernel.ndim - 2
    shaped = replace(
        term,
        kernel=term.kernel.reshape((channels, 1) + (1,) * spatial),
        group=channels,
        strides=(1,) * spatial,
        dilations=(1,) * spatial,
        pads=(0,) * (2 * spatial),
    )
    if other.strides != shaped.strides:
        return Skip(f"an identity branch sits beside a conv with strides {list(other.strides)}")
    return shaped


def _regroup(kernel: np.ndarray, group: int, target: int) -> np.ndarray:
    """A group-`group` kernel as the equal group-`target` kernel (`target` divides `group`):
    block-diagonal within each of the target's groups."""
    if group == target:
        return kernel
    out_channels, in_per_group = kernel.shape[:2]
    in_channels = in_per_group * group
    result = np.zeros((out_channels, in_channels // target) + kernel.shape[2:])
    out_per_group, out_per_target = out_channels // group, out_channels // target
    for o in range(out_channels):
        first_input = (o // out_per_group) * in_per_group  # of this output's group, among all inputs
        offset = first_input - (o // out_per_target) * (in_channels // target)
        result[o, offset : offset + in_per_group] = kernel[o]
    return result
