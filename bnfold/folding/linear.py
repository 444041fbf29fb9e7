"""The linear ops a per-channel affine map folds into, described by their weight layout only.

Output channel c of each is computed by one slice of its weight:
- Conv: weight [C_out, C_in/group, k…], output channels on axis 0.
- ConvTranspose: weight [C_in, C_out/group, k…], output channels on axis 1 within each group.
- Gemm: Y = α·A·B + β·C, B [K, N] (transB=0: channels on axis 1) or [N, K] (transB=1: axis 0).
- MatMul with a 2-D input and a constant [K, N] B: a Gemm without C, rewritten as one.
"""

from __future__ import annotations

import re

import numpy as np
import onnx

from bnfold.folding import affine
from bnfold.folding.correction import InputMoments, conv_input_moments, rounding_note
from bnfold.folding.plan import Skip
from bnfold.folding.sources import ChannelAffine, float_constant
from bnfold.graph.context import GraphContext
from bnfold.graph.protos import ONNX_DOMAINS, float_attr, int_attr, node_label, set_float_attr


class LinearOp:
    """The layout of one linear op's parameters; subclasses override what differs."""

    op_type: str

    def weight_axis(self, node: onnx.NodeProto) -> int:
        """The weight axis that runs over output channels (within a group)."""
        raise NotImplementedError

    def groups(self, node: onnx.NodeProto) -> int:
        """The op's group count (its `group` attribute; 1 for Gemm and MatMul)."""
        return int_attr(node, "group", 1)

    def output_blocks(self, node: onnx.NodeProto) -> int:
        """How many blocks the weight's output-channel axis holds (ConvTranspose: one per group;
        a Conv's axis 0 runs over every output channel, whatever the group)."""
        return 1

    def output_rank(self, weight: np.ndarray) -> int:
        return weight.ndim

    def check_node(self, node: onnx.NodeProto, ctx: GraphContext) -> Skip | None:
        """Preconditions on the op itself, before its parameters are read."""
        return None

    def check_weight(self, weight: np.ndarray, node: onnx.NodeProto) -> Skip | None:
        return None

    def check_bias(self, bias: np.ndarray, channels: int) -> Skip | None:
        if bias.shape != (channels,):
            return Skip(f"{self.op_type} bias has shape {list(bias.shape)}, expected [{channels}]")
        return None

    def output_channels(self, weight: np.ndarray, node: onnx.NodeProto) -> int:
        return weight.shape[self.weight_axis(node)] * self.output_blocks(node)

    def bias_scale(self, node: onnx.NodeProto) -> float:
        """What the op multiplies its bias input by (Gemm's β; 1 for convs)."""
        return 1.0

    def after_bias_rewrite(self, node: onnx.NodeProto) -> None:
        """Attribute changes the folded bias needs (Gemm: β = 1)."""

    def parameters(self, node: onnx.NodeProto, ctx: GraphContext) -> tuple[np.ndarray, np.ndarray | None] | Skip:
        """(weight, bias or None) if both are constant and sane, else Skip."""
        weight = float_constant(ctx, node.input[1] if len(node.input) > 1 else "", f"{self.op_type} weight")
        if isinstance(weight, Skip):
            return weight
        bad = self.check_weight(weight, node)
        if bad:
            return bad
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = float_constant(ctx, node.input[2], f"{self.op_type} bias")
            if isinstance(bias, Skip):
                return bias
        return weight, bias


class Conv(LinearOp):
    """Conv weight [C_out, C_in/group, k…]: output channels on axis 0, whatever the group."""

    op_type = "Conv"

    def weight_axis(self, node):
        return 0

    def check_weight(self, weight, node):
        if weight.ndim < 3:
            return Skip(f"Conv weight has rank {weight.ndim}; a Conv weight has rank 3 or more")
        return None


class ConvTranspose(LinearOp):
    """ConvTranspose weight [C_in, C_out/group, k…]: output channel g·(C_out/group) + j is column
    j of group g's block of rows, so the scale goes on axis 1 per group."""

    op_type = "ConvTranspose"

    def weight_axis(self, node):
        return 1

    def output_blocks(self, node):
        return self.groups(node)

    def check_weight(self, weight, node):
        if weight.ndim < 3:
            return Skip(f"ConvTranspose weight has rank {weight.ndim}; it needs rank 3 or more")
        if weight.shape[0] % self.groups(node):
            return Skip(f"ConvTranspose weight has {weight.shape[0]} input channels, not divisible by group")
        return None


class Gemm(LinearOp):
    """Gemm: Y = α·A·B + β·C with a constant B; C may be missing or broadcast."""

    op_type = "Gemm"

    def weight_axis(self, node):
        return 0 if int_attr(node, "transB", 0) else 1

    def output_rank(self, weight):
        return 2

    def check_weight(self, weight, node):
        if weight.ndim != 2:
            return Skip(f"Gemm B has rank {weight.ndim}, not 2")
        return None

    def bias_scale(self, node):
        return float_attr(node, "beta", 1.0)

    def check_bias(self, bias, channels):
        if bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, channels)):
            return Skip(f"Gemm C of shape {list(bias.shape)} does not broadcast to [M, {channels}]")
        return None

    def after_bias_rewrite(self, node):
        set_float_attr(node, "beta", 1.0)


class MatMul(LinearOp):
    """MatMul(A, B) with a constant B [K, N] and a 2-D A is a Gemm without C; the fold turns it
    into one (Gemm, α = β = 1, transB = 0, C = the folded bias). With a higher-rank A the BN's
    channel axis 1 is not the MatMul's output axis, and the fold is refused."""

    op_type = "MatMul"

    def weight_axis(self, node):
        return 1

    def output_rank(self, weight):
        return 2

    def check_node(self, node, ctx):
        rank = ctx.shapes.rank(node.input[0])
        if rank != 2:
            known = f"has rank {rank}" if rank is not None else "has a rank bnfold cannot infer"
            return Skip(f"{node_label(node)}'s input {known}; only a 2-D MatMul becomes a Gemm")
        return None

    def check_weight(self, weight, node):
        if weight.ndim != 2:
            return Skip(f"MatMul B has rank {weight.ndim}, not 2")
        return None

    def after_bias_rewrite(self, node):
        node.op_type = "Gemm"  # MatMul has no attributes; Gemm's defaults are α = β = 1


LINEAR_OPS = {op.op_type: op for op in (Conv(), ConvTranspose(), Gemm(), MatMul())}


def output_parameters(
    op: LinearOp, node: onnx.NodeProto, ctx: GraphContext
) -> tuple[np.ndarray, np.ndarray | None, int] | Skip:
    """(weight, bias or None, output channels) of a linear op about to absorb an affine map
    on its output, every check on the op and its parameters passed; else the Skip."""
    params = op.check_node(node, ctx) or op.parameters(node, ctx)
    if isinstance(params, Skip):
        return params
    weight, bias = params
    channels = op.output_channels(weight, node)
    if bias is not None and (bad := op.check_bias(bias, channels)):
        return bad
    return weight, bias, channels


def linear_op(node: onnx.NodeProto | None) -> LinearOp | None:
    """The layout of `node` if it is a linear op bnfold folds into."""
    if node is None or node.domain not in ONNX_DOMAINS:
        return None
    return LINEAR_OPS.get(node.op_type)


def fold_output_affine(
    op: LinearOp,
    node: onnx.NodeProto,
    weight: np.ndarray,
    bias: np.ndarray | None,
    scale_shift: ChannelAffine,
    moments: InputMoments | None = None,
) -> tuple[np.ndarray, np.ndarray] | Skip:
    """affine(op(x)) as op'(x): W' = W·s on the output-channel axis, b' = β_op·b·s + t, in the
    weight's dtype (affine.py's algebra), or a Skip if they overflow it. With `moments` of a
    Conv's input channels, a 16-bit result is rounded to keep the expected effect of its
    rounding small (bnfold.folding.correction)."""
    scale, shift = scale_shift
    axis = op.weight_axis(node)
    scaled = affine.scale_weights(
        weight, scale, axis=axis, group=op.output_blocks(node), dtype=affine.product_dtype(weight.dtype)
    )
    if bias is not None:
        bias = bias.astype(np.float64) * op.bias_scale(node)
    new_bias = affine.fold_bias(bias, scale, shift)
    if moments is None:
        return cast_folded(weight.dtype, scaled, new_bias, axis)
    return cast_conv(weight.dtype, scaled, new_bias, op.groups(node), moments)  # moments: a Conv's


def fold_output(
    ctx: GraphContext, op: LinearOp, node: onnx.NodeProto, weight: np.ndarray, bias, scale_shift: ChannelAffine
) -> tuple[np.ndarray, np.ndarray, str | None] | Skip:
    """fold_output_affine with what a 16-bit fold knows of a Conv's inputs
    (bnfold.folding.correction), and the report's note on how the weights were rounded."""
    moments, conv = None, op.op_type == "Conv"
    if conv:
        moments = conv_input_moments(ctx, node.input[0], weight.shape[1] * op.groups(node), weight.dtype)
    folded = fold_output_affine(op, node, weight, bias, scale_shift, moments)
    if isinstance(folded, Skip):
        return folded
    return (*folded, rounding_note(weight.dtype, moments, conv and ctx.scope.bias_correction))


def cast_conv(
    dtype, weight64: np.ndarray, bias64: np.ndarray, group: int, moments: InputMoments | None
) -> tuple[np.ndarray, np.ndarray] | Skip:
    """A Conv's folded or merged float64 weight [C_out, C_in/group, k…] and bias in `dtype`:
    rounded with its input's `moments` when they are known (bias correction), else as
    cast_folded rounds; a Skip if they overflow it."""
    if moments is None:
        return cast_folded(dtype, weight64, bias64, 0)
    rounded = affine.cast_conv_toward_moments(weight64, bias64, dtype, group, moments.mean, moments.var)
    return cast_folded(dtype, weight64, bias64, 0, *rounded)


def cast_folded(
    dtype, weight64: np.ndarray, bias64: np.ndarray, axis: int, weight=None, bias=None
) -> tuple[np.ndarray, np.ndarray] | Skip:
    """The folded float64 weight and bias in the model's dtype, or a Skip if they overflow it
    (`weight`, `bias`: already cast, when the caller chose their rounding)."""
    weight = affine.cast_weights(weight64, dtype, axis) if weight is None else weight
    with np.errstate(over="ignore"):  # overflow is checked just below
        bias = bias64.astype(dtype) if bias is None else bias
    for what, values in (("weights", weight), ("bias", bias)):
        if not np.isfinite(affine.float_operand(values)).all():
            return Skip(f"the folded {what} overflow {dtype}")
    return weight, bias


def give_parameters(
    ctx: GraphContext, op: LinearOp, node: onnx.NodeProto, source: onnx.NodeProto, weight, bias
) -> None:
    """Point the linear op at fresh initializers holding its folded weight and bias; a tensor
    another node may read is never rewritten in place. The new bias is named after the old
    one, else after the BN's bias (`source`), else after the weight."""
    old_weight, old_bias = node.input[1], node.input[2] if len(node.input) > 2 else ""
    bias_base = old_bias or (source.input[2] if source.op_type == "BatchNormalization" else old_weight + "_bias")
    ctx.index.set_input(node, 1, ctx.add_initializer(weight, folded_name(old_weight)))
    ctx.index.set_input(node, 2, ctx.add_initializer(bias, folded_name(bias_base)))
    op.after_bias_rewrite(node)


def become_shift(ctx: GraphContext, bn: onnx.NodeProto, shift: np.ndarray) -> None:
    """The BN node, in its place and with its output name, becomes Add(its input, shift): what
    is left of it when its scale went into a linear op and its shift could not."""
    ctx.index.set_input(bn, 1, ctx.add_initializer(shift, folded_name(bn.input[2])))
    ctx.index.truncate_inputs(bn, 2)
    bn.op_type, bn.domain = "Add", ""
    del bn.attribute[:]


def folded_name(name: str) -> str:
    """`W` → `W_bnfold`; a tensor folded again keeps one suffix (`W_bnfold` → `W_bnfold_1`)."""
    return re.sub(r"_bnfold(_\d+)?$", "", name) + "_bnfold"
