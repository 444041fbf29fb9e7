"""The plan of a fold into one linear op, and the edits every such plan is applied with.

Backward, through shape ops and forward folds differ only in how the graph is rewired around
the linear op once it holds its folded weight and bias: each is a `LinearPlan` with its own
`rewire`.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.folding.correction import conv_input_moments, rounding_note
from bnfold.folding.linear import LinearOp, fold_output_affine, output_parameters
from bnfold.folding.plan import Plan
from bnfold.folding.sources import ChannelAffine
from bnfold.graph.context import GraphContext


@dataclass(frozen=True)
class LinearPlan(Plan):
    source: onnx.NodeProto  # the node that disappears (or, with a shift left, becomes an Add)
    op: LinearOp
    linear: onnx.NodeProto
    weight: np.ndarray  # folded, in the weight's own dtype
    bias: np.ndarray  # folded, in the weight's dtype (Conv's B and Gemm's C share W's type)
    rounding: str | None = None  # how a 16-bit weight's second rounding was chosen

    @property
    def linears(self):
        return (self.linear,)

    def rewrite(self, ctx: GraphContext) -> None:
        give_parameters(ctx, self.op, self.linear, self.source, self.weight, self.bias)
        self.rewire(ctx)

    @abstractmethod
    def rewire(self, ctx: GraphContext) -> None:
        """Take the source out of the data path; the linear op holds its new parameters."""


def fold_after(
    ctx: GraphContext, op: LinearOp, node: onnx.NodeProto, affine_of: Callable[[int, int], ChannelAffine]
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Every check on the linear op and its parameters, then the affine map after it, read by
    `affine_of(output channels, output rank)`, folded in: (weight, bias, rounding note); else
    Refused."""
    weight, bias, channels = output_parameters(op, node, ctx)
    scale_shift = affine_of(channels, op.output_rank(weight))
    return fold_output(ctx, op, node, weight, bias, scale_shift)


def fold_output(
    ctx: GraphContext, op: LinearOp, node: onnx.NodeProto, weight: np.ndarray, bias, scale_shift: ChannelAffine
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """fold_output_affine with what a 16-bit fold knows of a Conv's inputs
    (bnfold.folding.correction), and the report's note on how the weights were rounded."""
    moments, conv = None, op.corrects_rounding
    if conv:
        moments = conv_input_moments(ctx, node.input[0], op.input_channels(weight, node), weight.dtype)
    folded = fold_output_affine(op, node, weight, bias, scale_shift, moments)
    return (*folded, rounding_note(weight.dtype, moments, conv and ctx.scope.bias_correction))


def give_parameters(
    ctx: GraphContext, op: LinearOp, node: onnx.NodeProto, source: onnx.NodeProto, weight, bias
) -> None:
    """Point the linear op at fresh initializers holding its folded weight and bias; a tensor
    another node may read is never rewritten in place."""
    old_weight = node.input[1]
    ctx.index.set_input(node, 1, ctx.add_initializer(weight, folded_name(old_weight)))
    give_bias(ctx, op, node, source, bias, old_weight)


def give_bias(
    ctx: GraphContext, op: LinearOp, node: onnx.NodeProto, source: onnx.NodeProto, bias, weight_name: str = ""
) -> None:
    """Point the linear op at a fresh initializer holding its folded bias, named after the old
    bias, else after the BN's bias (`source`), else after the weight (`weight_name`, default the
    op's weight input)."""
    old_bias = node.input[2] if len(node.input) > 2 else ""
    weight_name = weight_name or node.input[1]
    bias_base = old_bias or (source.input[2] if source.op_type == "BatchNormalization" else weight_name + "_bias")
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
