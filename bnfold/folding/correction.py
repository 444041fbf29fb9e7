"""What a 16-bit fold knows about a conv's inputs, so that its rounding can be corrected.

A float16 or bfloat16 fold rounds W·s and b' to the weight's type once more. The errors δ are
known exactly (the products are computed in float64), and their effect on output channel o is
Σ δ·x + δ_b: a mean Σ δ·E[x] + δ_b, which acts as a bias (after a ReLU inputs have a positive
mean; Nagel et al., ICCV 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction"), and a variance Σ δ²·Var[x]. affine.cast_conv_toward_moments chooses the roundings
that make the sum of the two small; this module finds E[x] and Var[x] per input channel.

Without data they come from the graph: a BatchNormalization's output in channel c is, to the
extent its running statistics describe its inputs, normal with mean β_c and standard deviation
|γ_c|; an element-wise activation (ReLU, Clip, LeakyRelu, Sigmoid, HardSigmoid, HardSwish, Tanh,
SiLU as x·Sigmoid(x), …) maps that normal by numerical integration; Add adds means and variances
(inputs taken as independent), Concat on the channel axis concatenates them, Identity and Dropout
pass them on. With calibration data they are measured instead (bnfold.calibration). Where
neither is known the fold keeps sum-preserving rounding (affine.cast_weights), and the report
says which was used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx

from bnfold.graph.constants import NotConstant
from bnfold.graph.context import GraphContext
from bnfold.graph.protos import int_attr, is_onnx_op, node_label

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
    found = _derive(ctx, node, depth + 1) if node is not None and node.domain in ("", "ai.onnx") else None
    if found is not None:
        ctx.scope.moments[name] = found
    return found


def _derive(ctx: GraphContext, node: onnx.NodeProto, depth: int) -> InputMoments | None:
    op = node.op_type
    if op == "BatchNormalization" and int_attr(node, "training_mode", 0) == 0:
        gamma, beta = _constants(ctx, node.input[1:3])
        if gamma is None or beta is None or gamma.ndim != 1 or gamma.shape != beta.shape:
            return None
        return InputMoments(beta, gamma**2, f"the statistics of {node_label(node)}")
    if op in ("Identity", "Dropout"):
        return input_moments(ctx, node.input[0], depth)
    if op == "Concat" and int_attr(node, "axis", 0) == 1:
        parts = [input_moments(ctx, name, depth) for name in node.input]
        if any(p is None for p in parts):
            return None
        mean, var = (np.concatenate([getattr(p, field) for p in parts]) for field in ("mean", "var"))
        return InputMoments(mean, var, f"the statistics of the {len(parts)} inputs of {node_label(node)}")
    if op == "Add" and len(node.input) == 2:
        return _sum(ctx, node, depth)
    activation = _activation(ctx, node)
    if activation is None:
        return None
    function, data = activation
    before = input_moments(ctx, data, depth)
    if before is None:
        return None
    return _through(function, before, f"{before.source} through {node_label(node)}")


def _sum(ctx: GraphContext, add: onnx.NodeProto, depth: int) -> InputMoments | None:
    """x + y: means and variances add (x and y taken as independent); y may be a per-channel
    constant."""
    terms = []
    for name in add.input:
        moments = input_moments(ctx, name, depth)
        if moments is None:
            (value,) = _constants(ctx, [name])
            per_channel = value is not None and (
                value.size == 1 or (value.ndim in (3, 4) and value.size == value.shape[-3])
            )
            if not per_channel:
                return None  # unknown, or a constant that does not broadcast per channel
            value = value.reshape(-1)
            moments = InputMoments(value, np.zeros_like(value), "")
        terms.append(moments)
    first, second = terms
    if first.mean.shape != second.mean.shape and min(first.mean.size, second.mean.size) != 1:
        return None
    source = first.source or second.source
    return InputMoments(first.mean + second.mean, first.var + second.var, f"{source} through {node_label(add)}")


def _through(function: Callable[[np.ndarray], np.ndarray], moments: InputMoments, source: str) -> InputMoments:
    """Moments of function(z) for z normal with the given moments, per channel (quadrature)."""
    z = moments.mean[:, None] + np.sqrt(np.maximum(moments.var, 0.0))[:, None] * _GRID[None, :]
    values = function(z)
    mean = values @ _DENSITY
    return InputMoments(mean, np.maximum((values**2) @ _DENSITY - mean**2, 0.0), source)


def _activation(ctx: GraphContext, node: onnx.NodeProto) -> tuple[Callable, str] | None:
    """The element-wise function `node` applies and the input it applies it to, if known."""
    if node.op_type == "Mul" and len(node.input) == 2:  # SiLU / Swish as exported: x · Sigmoid(x)
        for data, other in (node.input, reversed(node.input)):
            gate = ctx.index.producer(other)
            if gate is not None and is_onnx_op(gate, "Sigmoid") and gate.input[0] == data:
                return (lambda z: z * _sigmoid(z)), data
        return None
    function = _unary(ctx, node)
    return None if function is None else (function, node.input[0])


def _unary(ctx: GraphContext, node: onnx.NodeProto) -> Callable[[np.ndarray], np.ndarray] | None:
    op, alpha = node.op_type, next((a.f for a in node.attribute if a.name == "alpha"), None)
    if op == "Relu":
        return lambda z: np.maximum(z, 0.0)
    if op == "LeakyRelu":
        return lambda z: np.where(z > 0, z, (0.01 if alpha is None else alpha) * z)
    if op == "Sigmoid":
        return _sigmoid
    if op == "Tanh":
        return np.tanh
    if op == "HardSigmoid":
        beta = next((a.f for a in node.attribute if a.name == "beta"), 0.5)
        return lambda z: np.clip((0.2 if alpha is None else alpha) * z + beta, 0.0, 1.0)
    if op == "HardSwish":
        return lambda z: z * np.clip(z / 6.0 + 0.5, 0.0, 1.0)
    if op == "Clip":
        bounds = _clip_bounds(ctx, node)
        return None if bounds is None else (lambda z: np.clip(z, *bounds))
    return None


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _clip_bounds(ctx: GraphContext, clip: onnx.NodeProto) -> tuple[float, float] | None:
    low = next((a.f for a in clip.attribute if a.name == "min"), None)
    high = next((a.f for a in clip.attribute if a.name == "max"), None)
    try:
        if len(clip.input) > 1 and clip.input[1]:
            low = float(ctx.constant(clip.input[1]))
        if len(clip.input) > 2 and clip.input[2]:
            high = float(ctx.constant(clip.input[2]))
    except (NotConstant, TypeError, ValueError):
        return None
    return (-math.inf if low is None else low), (math.inf if high is None else high)


def _constants(ctx: GraphContext, names) -> list[np.ndarray | None]:
    values = []
    for name in names:
        try:
            value = np.asarray(ctx.constant(name), dtype=np.float64)
        except (NotConstant, TypeError, ValueError):
            value = None
        values.append(value if value is None or np.isfinite(value).all() else None)
    return values


def conv_input_moments(ctx: GraphContext, data: str, in_channels: int, dtype) -> InputMoments | None:
    """The moments of a 16-bit Conv's input `data`, if correction is on and they are known for
    as many channels as the conv reads."""
    if np.dtype(dtype) not in SIXTEEN_BITS or not ctx.scope.bias_correction:
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
    if np.dtype(dtype) not in SIXTEEN_BITS or not ctx.scope.bias_correction:
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
