"""What a 16-bit fold knows about a conv's inputs, so that its rounding can be corrected.

A float16 or bfloat16 fold rounds W·s and b' to the weight's type once more. The errors δ are
known exactly (the products are computed in float64), and their effect on output channel o is
Σ δ·x + δ_b: a mean Σ δ·E[x] + δ_b, which acts as a bias (after a ReLU inputs have a positive
mean; Nagel et al., ICCV 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction"), and a variance Σ δ²·Var[x]. affine.cast_conv_toward_moments chooses the roundings
that make the sum of the two small; this module finds E[x] and Var[x] per input channel.

Without data they come from the graph: a BatchNormalization's output in channel c is, to the
extent its running statistics describe its inputs, normal with mean β_c and standard deviation
|γ_c|; an element-wise function of it (an activation, however the exporter wrote it:
bnfold.graph.pointwise) maps that normal by numerical integration; Add of two different tensors
adds means and variances (taken as independent); Concat on the channel axis concatenates them.
With calibration data they are measured instead (bnfold.calibration). Where neither is known
the fold keeps sum-preserving rounding (affine.cast_weights), and the report says which was
used.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx

from bnfold.graph.constants import NotConstant
from bnfold.graph.context import GraphContext
from bnfold.graph.pointwise import Chain, single_source
from bnfold.graph.protos import ONNX_DOMAINS, int_attr, node_label

SIXTEEN_BITS = {np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)}
_GRID = np.linspace(-8.0, 8.0, 1601)  # standard-normal quadrature nodes for activations
_DENSITY = np.exp(-0.5 * _GRID**2) / np.exp(-0.5 * _GRID**2).sum()
_MAX_DEPTH = 64


@dataclass(frozen=True)
class InputMoments:
    """E[x] and Var[x] per channel of a tensor, and where they came from (for the report)."""

    mean: np.ndarray
    var: np.ndarray
    source: str


def record_batch_norm(ctx: GraphContext, bn: onnx.NodeProto, gamma: np.ndarray, beta: np.ndarray) -> None:
    """Remember a BN's output distribution N(β, γ²) by the name the tensor keeps after the BN is
    folded away."""
    if bn.output[0] not in ctx.scope.moments:
        beta64, gamma64 = np.asarray(beta, np.float64), np.asarray(gamma, np.float64)
        ctx.scope.moments[bn.output[0]] = InputMoments(beta64, gamma64**2, f"the statistics of {node_label(bn)}")


def input_moments(ctx: GraphContext, name: str, depth: int = 0) -> InputMoments | None:
    """E[x] and Var[x] per channel of tensor `name` (module docstring), or None when unknown."""
    known = ctx.scope.calibrated.get(name) or ctx.scope.moments.get(name)
    if known is not None or depth > _MAX_DEPTH:
        return known
    node = ctx.index.producer(name)
    found = _derive(ctx, name, node, depth + 1) if node is not None and node.domain in ONNX_DOMAINS else None
    if found is not None:
        ctx.scope.moments[name] = found
    return found


def _derive(ctx: GraphContext, name: str, node: onnx.NodeProto, depth: int) -> InputMoments | None:
    op = node.op_type
    if op == "BatchNormalization" and int_attr(node, "training_mode", 0) == 0:
        gamma, beta = _constants(ctx, node.input[1:3])
        if gamma is None or beta is None or gamma.ndim != 1 or gamma.shape != beta.shape:
            return None
        return InputMoments(beta, gamma**2, f"the statistics of {node_label(node)}")
    if op == "Concat" and int_attr(node, "axis", 0) == 1:
        parts = [input_moments(ctx, part, depth) for part in node.input]
        if any(p is None for p in parts):
            return None
        mean, var = (np.concatenate([getattr(p, field) for p in parts]) for field in ("mean", "var"))
        return InputMoments(mean, var, f"the statistics of the {len(parts)} inputs of {node_label(node)}")
    chain = single_source(ctx, name)
    if chain is not None:
        before = input_moments(ctx, chain.source, depth)
        return None if before is None else _through(ctx, chain, before)
    if op == "Add" and len(node.input) == 2:
        return _sum(ctx, node, depth)
    return None


def _sum(ctx: GraphContext, add: onnx.NodeProto, depth: int) -> InputMoments | None:
    """x + y of two different tensors: means and variances add (taken as independent)."""
    first, second = (input_moments(ctx, name, depth) for name in add.input)
    if first is None or second is None or first.mean.shape != second.mean.shape:
        return None
    return InputMoments(first.mean + second.mean, first.var + second.var, f"{first.source} through {node_label(add)}")


def _through(ctx: GraphContext, chain: Chain, moments: InputMoments) -> InputMoments | None:
    """Moments of f(z) for the chain's f and z normal with the given moments, per channel
    (quadrature on a grid of ±8 standard deviations)."""
    z = moments.mean[:, None] + np.sqrt(np.maximum(moments.var, 0.0))[:, None] * _GRID[None, :]
    values = chain.evaluate(ctx, z)
    if values is None:
        return None
    values = np.broadcast_to(values, z.shape)
    mean = values @ _DENSITY
    var = np.maximum((values**2) @ _DENSITY - mean**2, 0.0)
    return InputMoments(mean, var, f"{moments.source} through {chain.describe()}")


def _constants(ctx: GraphContext, names) -> list[np.ndarray | None]:
    values = []
    for name in names:
        try:
            value = np.asarray(ctx.constant(name), dtype=np.float64)
        except (NotConstant, TypeError, ValueError):
            value = None
        values.append(value if value is None or np.isfinite(value).all() else None)
    return values


def corrects(ctx: GraphContext, dtype) -> bool:
    """Whether a fold into weights of `dtype` chooses its rounding with input statistics."""
    return np.dtype(dtype) in SIXTEEN_BITS and ctx.scope.bias_correction


def conv_input_moments(ctx: GraphContext, data: str, in_channels: int, dtype) -> InputMoments | None:
    """The moments of a 16-bit Conv's input `data`, if correction is on and they are known for
    as many channels as the conv reads."""
    if not corrects(ctx, dtype):
        return None
    moments = input_moments(ctx, data)
    if moments is None or moments.mean.size not in (1, in_channels):
        return None
    if not (np.isfinite(moments.mean).all() and np.isfinite(moments.var).all()):
        return None  # statistics too large to integrate: keep sum-preserving rounding
    shape = (in_channels,)
    return InputMoments(np.broadcast_to(moments.mean, shape), np.broadcast_to(moments.var, shape), moments.source)


def batch_norm_input_moments(ctx: GraphContext, bn: onnx.NodeProto, dtype) -> InputMoments | None:
    """The moments of a BN's *input*, for a 16-bit fold of the BN into the Conv after it: its
    running mean and variance are, by definition, what it expects them to be."""
    if not corrects(ctx, dtype):
        return None
    if bn.input[0] in ctx.scope.calibrated:
        return ctx.scope.calibrated[bn.input[0]]
    mean, var = _constants(ctx, bn.input[3:5])
    if mean is None or var is None or mean.ndim != 1 or mean.shape != var.shape or (var < 0).any():
        return None
    return InputMoments(mean, var, f"the running statistics of {node_label(bn)}")


def rounding_note(dtype, moments: InputMoments | None, correcting: bool) -> str | None:
    """What the report says about a folded 16-bit weight's rounding (None for wider types)."""
    if np.dtype(dtype) not in SIXTEEN_BITS:
        return None
    if moments is not None:
        return f"bias correction, E[x] from {moments.source}"
    return "sum-preserving rounding" + ("; no E[x] known for its input" if correcting else "")
