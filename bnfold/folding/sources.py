"""Where a per-channel affine map y = s·x + t along axis 1 (the channel axis) comes from:

- BatchNormalization in inference mode, or
- Mul / Add / Sub / Div by a constant that broadcasts per channel: the decomposed BN of
  FrozenBatchNorm2d exports and Keras-style `(x − m)/(std + eps)·γ + β`, or a plain bias Add
  after a bias-less conv.

BatchNormalization versions (ONNX operator changelog) and what makes one use batch statistics:
- 1 and 6: `is_test=0` (the default!) is training mode; `spatial=0` is per-activation.
- 7: `is_test` removed; declaring the mean/var/saved outputs is the training-mode form.
- 9: `spatial` removed.
- 14, 15: `training_mode=1`; extra outputs are only valid in training mode. 15 lets scale and
  bias (T1) and mean and var (T2) have types other than X's.
`epsilon` defaults to 1e-5 in every version; it is a float32 attribute, and the runtime adds that
float32 value, so the fold uses it exactly as stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import ml_dtypes
import numpy as np
import onnx

from bnfold.folding import affine
from bnfold.folding.correction import record_batch_norm
from bnfold.folding.plan import Refused, Skip
from bnfold.graph.constants import NotConstant
from bnfold.graph.context import GraphContext
from bnfold.graph.protos import float_attr, int_attr, is_onnx_op, node_label

DEFAULT_EPSILON = float(np.float32(1e-5))
FLOAT_DTYPES = {np.dtype(t) for t in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)}
BN_PARAMETERS = ("scale", "bias", "mean", "var")  # inputs 1..4, in the spec's order
ELEMENTWISE_AFFINE = ("Mul", "Add", "Sub", "Div")
# Normalizations whose statistics come from each input at run time: no fixed affine map exists.
RUNTIME_NORMALIZATIONS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization")
RUNTIME_STATISTICS = Skip("it normalizes with statistics of each input, computed at run time: never folded")


class ChannelAffine(NamedTuple):
    """y_c = scale_c · x_c + shift_c, float64, one entry per channel."""

    scale: np.ndarray
    shift: np.ndarray


class AffineSource:
    """A node that applies a per-channel affine map to tensor `data`, read when a plan knows
    the channel count and rank of the linear op next to it."""

    node: onnx.NodeProto
    data: str

    def affine(self, ctx: GraphContext, channels: int, rank: int, axis: int = 1) -> ChannelAffine:
        """The map, for a linear op of `channels` output channels on `axis` of a rank-`rank`
        tensor (the tensor this source reads); Refused when it cannot be read."""
        raise NotImplementedError


@dataclass(frozen=True)
class BatchNormSource(AffineSource):
    node: onnx.NodeProto

    @property
    def data(self) -> str:
        return self.node.input[0]

    def affine(self, ctx, channels, rank, axis=1):
        if axis != 1:
            raise Refused(f"the channels reach the BatchNormalization on axis {axis}, not its channel axis 1")
        return read_batch_norm(self.node, ctx, channels)


@dataclass(frozen=True)
class ElementwiseSource(AffineSource):
    node: onnx.NodeProto
    data: str

    def affine(self, ctx, channels, rank, axis=1):
        return read_elementwise(self.node, self.data, ctx, channels, rank, axis)


@dataclass(frozen=True)
class KnownAffine(AffineSource):
    """An affine map already read (a slice of a BN's, for one input of a Concat)."""

    node: onnx.NodeProto
    data: str
    known: ChannelAffine

    def affine(self, ctx, channels, rank, axis=1):
        return self.known


def batch_norm_version(opset: int) -> int:
    """The BatchNormalization version in force at an ai.onnx opset (1, 6, 7, 9, 14 or 15)."""
    return onnx.defs.get_schema("BatchNormalization", opset).since_version


def epsilon(bn: onnx.NodeProto) -> float:
    return float_attr(bn, "epsilon", DEFAULT_EPSILON)


def check_inference_mode(bn: onnx.NodeProto, version: int, ctx: GraphContext) -> Skip | None:
    """A BN folds only if it normalizes with its stored statistics (see the module docstring)."""
    if version >= 14 and int_attr(bn, "training_mode", 0) != 0:
        return Skip("training_mode=1: it normalizes with batch statistics")
    if version < 7 and int_attr(bn, "is_test", 0) == 0:
        return Skip(f"is_test=0 means training mode in BatchNormalization-{version}")
    if version < 9 and int_attr(bn, "spatial", 1) == 0:
        return Skip("spatial=0: statistics are per activation, not per channel")
    extra = [name for name in bn.output[1:] if name]
    used = [name for name in extra if ctx.index.is_used(name)]
    if used:
        return Skip(f"its statistics output '{used[0]}' is used, so it runs in training mode")
    if extra:
        return Skip(f"it declares statistics outputs ({', '.join(extra)}): the training-mode form")
    if len(bn.input) != 5:
        return Skip(f"it has {len(bn.input)} inputs; BatchNormalization takes 5")
    return None


def float_constant(ctx: GraphContext, name: str, role: str) -> np.ndarray:
    """The value of a parameter that must be a float constant; Refused saying why it is not one."""
    if not name:
        raise Refused(f"{role} is missing")
    try:
        value = ctx.constant(name)
    except NotConstant as why:
        raise Refused(f"{role} is not constant: {why}") from None
    if value.dtype not in FLOAT_DTYPES:
        raise Refused(f"{role} '{name}' has dtype {value.dtype}, not a float type")
    return value


def dequantized_constant(ctx: GraphContext, name: str) -> np.ndarray | None:
    """The value of `name` when a DequantizeLinear of constants makes it, per tensor or per axis
    (quantize_static quantizes a BN's scale as a weight), else None. Only a BN's parameters are
    read this way: a linear op's quantized weight keeps its integers (bnfold.folding.quantized)."""
    node = ctx.index.producer(name)
    if node is None or not is_onnx_op(node, "DequantizeLinear") or int_attr(node, "block_size", 0):
        return None
    try:
        q, scale = (np.asarray(ctx.constant(n)) for n in node.input[:2])
        zero = np.asarray(ctx.constant(node.input[2])) if len(node.input) > 2 and node.input[2] else np.zeros(())
    except (NotConstant, ValueError):
        return None
    if scale.dtype not in FLOAT_DTYPES or scale.size != 1 and scale.ndim != 1:
        return None
    if scale.size > 1:  # per axis: one scale along `axis`
        view = [1] * q.ndim
        view[int_attr(node, "axis", 1) % max(q.ndim, 1)] = scale.size
        scale, zero = scale.reshape(view), zero.reshape(view) if zero.size > 1 else zero
    return ((q.astype(np.float64) - zero.astype(np.float64)) * scale.astype(np.float64)).astype(scale.dtype)


def read_batch_norm(bn: onnx.NodeProto, ctx: GraphContext, channels: int) -> ChannelAffine:
    """BN's (scale s, shift t) in float64, if its parameters are constant, [C]-shaped and sane;
    else Refused."""
    params = []
    for role, name in zip(BN_PARAMETERS, bn.input[1:]):
        value = _parameter(ctx, name, f"BatchNormalization {role}")
        if value.shape != (channels,):
            raise Refused(
                f"BatchNormalization {role} '{name}' has shape {list(value.shape)}, "
                f"but the {channels}-channel op next to it needs [{channels}]"
            )
        if not np.isfinite(value.astype(np.float64)).all():
            raise Refused(f"BatchNormalization {role} '{name}' holds NaN or Inf")
        params.append(value)
    gamma, beta, mean, var = params
    eps = epsilon(bn)
    denominator = var.astype(np.float64) + eps
    if not (denominator > 0).all():
        bad = int((denominator <= 0).sum())
        raise Refused(f"variance + epsilon is not positive in {bad} of {channels} channels")
    return ChannelAffine(*affine.fold_scale_shift(gamma, beta, mean, var, eps))


def _parameter(ctx: GraphContext, name: str, role: str) -> np.ndarray:
    """A BN parameter: a float constant, or one quantize_static stored behind a DequantizeLinear;
    else Refused, saying why it is no float constant."""
    try:
        return float_constant(ctx, name, role)
    except Refused:
        value = dequantized_constant(ctx, name)
        if value is None:
            raise
        return value


def remember_batch_norm(bn: onnx.NodeProto, ctx: GraphContext) -> None:
    """As a folded BN goes: its output's distribution N(β, γ²), by the name the tensor keeps, for
    the bias correction of 16-bit folds downstream (bnfold.folding.correction). Planning reads
    BNs without writing anything; the walk calls this when it applies a plan."""
    try:
        gamma, beta = (_parameter(ctx, name, role) for name, role in zip(bn.input[1:3], BN_PARAMETERS))
    except Refused:
        return
    record_batch_norm(ctx, bn, gamma, beta)


def read_elementwise(
    node: onnx.NodeProto, data: str, ctx: GraphContext, channels: int, rank: int, axis: int = 1
) -> ChannelAffine:
    """(s, t) of `data ∘ c` for a Mul/Add/Sub/Div by a per-channel constant c; else Refused."""
    position = list(node.input).index(data)
    other = node.input[1 - position]
    if other == data:
        raise Refused(f"{node_label(node)} combines the tensor with itself")
    value = float_constant(ctx, other, f"{node.op_type} operand")
    vector = affine.channel_vector(value, rank, channels, axis)
    if vector is None or not np.isfinite(vector).all():
        raise Refused(
            f"{node.op_type} operand '{other}' of shape {list(value.shape)} is not one finite value per channel"
        )
    ones, zeros = np.ones(channels), np.zeros(channels)
    if node.op_type == "Mul":
        return ChannelAffine(vector, zeros)
    if node.op_type == "Add":
        return ChannelAffine(ones, vector)
    if node.op_type == "Sub":
        return ChannelAffine(ones, -vector) if position == 0 else ChannelAffine(-ones, vector)
    if position == 1:
        raise Refused("a constant divided by the tensor is not affine")
    if not vector.all():
        raise Refused(f"Div operand '{other}' is zero in some channel")
    return ChannelAffine(1.0 / vector, zeros)
