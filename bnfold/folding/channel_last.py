"""A BatchNormalization over the last axis of a token Linear (MatMul + bias Add), reached
through shape-only ops: BatchNorm1d over tokens, exported as Reshape/Transpose → BN → back.

    BN(reshape(MatMul(x, B) + c)) → reshape(MatMul(x, B') + c'),  B' = B·s on its N axis,
    c' = c·s + t,

when the shape ops carry the MatMul's last axis whole to the BN's channel axis. The fold is the
MatMul layout's own (linear.fold_output_affine); the last shape op takes over the BN's output.
A MatMul without a bias Add (LeViT's bias-less Linear → BatchNorm1d) takes the scale, and the BN
node becomes the Add of its shift, per channel on its own axis 1:

    BN(reshape(MatMul(x, B))) → reshape(MatMul(x, B')) + t.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.folding.checks import call_site_attributes, single_reader
from bnfold.folding.linear import LINEAR_OPS
from bnfold.folding.linear_plan import become_shift, fold_output, folded_name
from bnfold.folding.plan import NOT_MINE, NotMine, Plan, Refused, Skip
from bnfold.folding.shape_ops import TOKEN_SHAPE_OPS, back_through
from bnfold.folding.sources import float_constant, read_batch_norm
from bnfold.graph.context import GraphContext
from bnfold.graph.protos import is_onnx_op, node_label

MATMUL = LINEAR_OPS["MatMul"]


@dataclass(frozen=True)
class ChannelLastPlan(Plan):
    source: onnx.NodeProto  # the BN
    matmul: onnx.NodeProto
    add: onnx.NodeProto | None  # the bias Add; None: the BN becomes one
    bias_position: int  # which input of the Add is the bias
    shape_ops: tuple[onnx.NodeProto, ...]  # from the BN's input back towards the Add
    weight: np.ndarray
    bias: np.ndarray
    rounding: str | None = None  # how a 16-bit weight's second rounding was chosen

    @property
    def linears(self):
        return (self.matmul,)

    @property
    def via(self) -> str:
        through = "through " + ", ".join(node_label(n) for n in reversed(self.shape_ops))
        return through if self.add is not None else through + "; its shift is a new Add"

    def rewrite(self, ctx: GraphContext) -> None:
        old_weight = self.matmul.input[1]
        ctx.index.set_input(self.matmul, 1, ctx.add_initializer(self.weight, folded_name(old_weight)))
        if self.add is None:
            become_shift(ctx, self.source, self.bias)
            return
        old_bias = self.add.input[self.bias_position]
        ctx.index.set_input(self.add, self.bias_position, ctx.add_initializer(self.bias, folded_name(old_bias)))
        ctx.index.remove_node(self.source)
        ctx.index.set_output(self.shape_ops[0], 0, self.source.output[0])


def _token_source(bn: onnx.NodeProto, ctx: GraphContext):
    """match: (the node the BN's channels come from, the one that reads it, the token shape ops
    between, the rank there) when the BN is behind token shape ops whose input's last axis is its
    channel axis; else None."""
    # walk back through shape ops to the axis the BN's channels come from
    node, reader, shape_ops, axis = back_through(bn.input[0], bn, TOKEN_SHAPE_OPS, ctx, axis=1)
    if not shape_ops:
        return None
    rank = ctx.shapes.rank(shape_ops[-1].input[0])
    if node is None or rank is None or axis != rank - 1:
        return None
    return node, reader, tuple(shape_ops), rank


def plan_channel_last(bn: onnx.NodeProto, ctx: GraphContext) -> ChannelLastPlan | Skip | NotMine:
    """NOT_MINE unless the BN is behind token shape ops whose input's last axis is its channel
    axis, and they come from a MatMul's bias Add."""
    # match
    found = _token_source(bn, ctx)
    if found is None or not is_onnx_op(found[0], "Add"):
        return NOT_MINE
    add, reader, shape_ops, rank = found
    position = next((i for i, name in enumerate(add.input) if is_onnx_op(_producer(ctx, name), "MatMul")), None)
    if position is None:
        return NOT_MINE
    matmul = ctx.index.producer(add.input[position])
    # checks
    blocked = (
        call_site_attributes(bn, add, matmul)
        or single_reader(add, reader, ctx, shape_readers=True)
        or single_reader(matmul, add, ctx, shape_readers=True)
    )
    if blocked:
        return blocked
    weight = _matmul_weight(matmul, ctx)
    bias = float_constant(ctx, add.input[1 - position], "Add bias")
    channels = weight.shape[1]
    if bias.ndim > rank or any(d != 1 for d in bias.shape[:-1]) or (bias.ndim and bias.shape[-1] not in (1, channels)):
        return Skip(f"Add bias of shape {list(bias.shape)} is not one value per channel")
    scale_shift = read_batch_norm(bn, ctx, channels)
    # plan
    new_weight, new_bias, rounding = fold_output(ctx, MATMUL, matmul, weight, bias.reshape(-1), scale_shift)
    new_bias = new_bias.reshape((1,) * max(bias.ndim - 1, 0) + (channels,))
    return ChannelLastPlan(bn, matmul, add, 1 - position, tuple(shape_ops), new_weight, new_bias, rounding)


def plan_channel_last_scale(bn: onnx.NodeProto, ctx: GraphContext) -> ChannelLastPlan | Skip | NotMine:
    """The BN's scale into a bias-less MatMul behind token shape ops; its shift stays as an Add
    (module docstring). NOT_MINE unless the channels come from a MatMul itself."""
    # match
    found = _token_source(bn, ctx)
    if found is None or not is_onnx_op(found[0], "MatMul"):
        return NOT_MINE
    matmul, reader, shape_ops, _ = found
    # checks
    blocked = call_site_attributes(bn, matmul) or single_reader(matmul, reader, ctx, shape_readers=True)
    if blocked:
        return blocked
    weight = _matmul_weight(matmul, ctx)
    rank = ctx.shapes.rank(bn.input[0])
    if rank is None or rank < 2:
        return Skip(f"the rank of the BN's input '{bn.input[0]}' is not known")
    channels = weight.shape[1]
    scale_shift = read_batch_norm(bn, ctx, channels)
    # plan
    new_weight, shift, rounding = fold_output(ctx, MATMUL, matmul, weight, None, scale_shift)
    shift = shift.reshape((channels,) + (1,) * (rank - 2))  # per channel on the BN input's axis 1
    return ChannelLastPlan(bn, matmul, None, -1, shape_ops, new_weight, shift, rounding)


def _matmul_weight(matmul: onnx.NodeProto, ctx: GraphContext) -> np.ndarray:
    weight = float_constant(ctx, matmul.input[1], "MatMul B")
    if weight.ndim != 2:
        raise Refused(f"MatMul B has rank {weight.ndim}, not 2")
    return weight


def _producer(ctx: GraphContext, name: str) -> onnx.NodeProto:
    return ctx.index.producer(name) or onnx.NodeProto()
