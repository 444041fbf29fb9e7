"""The usual fold: a per-channel affine map after a linear op, affine(linear(x)) → linear'(x).

Inference no-ops between them (Identity, Dropout) are looked through and removed. The linear op
takes over the affine's output name, so every reader and graph output downstream is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.folding.checks import call_site_attributes, producer_through_no_ops, single_reader
from bnfold.folding.linear import (
    LINEAR_OPS,
    LinearOp,
    fold_output,
    give_parameters,
    linear_op,
    output_parameters,
)
from bnfold.folding.plan import Plan, Skip
from bnfold.folding.sources import AffineSource
from bnfold.graph.context import GraphContext
from bnfold.graph.protos import node_label


@dataclass(frozen=True)
class BackwardPlan(Plan):
    source: onnx.NodeProto
    op: LinearOp
    linear: onnx.NodeProto
    weight: np.ndarray  # folded, in the weight's own dtype
    bias: np.ndarray  # folded, in the weight's dtype (Conv's B and Gemm's C share W's type)
    passthrough: tuple[onnx.NodeProto, ...] = ()  # no-ops between them, removed with the source
    rounding: str | None = None  # how a 16-bit weight's second rounding was handled

    @property
    def linears(self):
        return (self.linear,)

    def rewrite(self, ctx: GraphContext) -> None:
        give_parameters(ctx, self.op, self.linear, self.source, self.weight, self.bias)
        for node in (self.source, *self.passthrough):
            ctx.index.remove_node(node)
        ctx.index.set_output(self.linear, 0, self.source.output[0])


def plan_backward(source: AffineSource, ctx: GraphContext, reader: onnx.NodeProto | None = None) -> BackwardPlan | Skip:
    """Fold `source` into the linear op producing the tensor it reads. `reader` is the node that
    must be the only reader of that tensor (default: the source itself)."""
    # match
    linear, passthrough, blocked = producer_through_no_ops(source.data, ctx)
    if blocked:
        return blocked
    if linear is None:
        kind = "a graph input" if source.data in ctx.index.graph_inputs else "not produced by any node"
        return Skip(f"its input '{source.data}' is {kind}; nothing to fold into")
    op = linear_op(linear)
    if op is None:
        return Skip(f"its input comes from {node_label(linear)}; bnfold folds into {', '.join(LINEAR_OPS)}")
    # checks
    first = passthrough[-1] if passthrough else (reader or source.node)
    failed = call_site_attributes(source.node, linear, *passthrough) or single_reader(linear, first, ctx)
    if failed:
        return failed
    params = output_parameters(op, linear, ctx)
    if isinstance(params, Skip):
        return params
    weight, bias, channels = params
    scale_shift = source.affine(ctx, channels, op.output_rank(weight))
    if isinstance(scale_shift, Skip):
        return scale_shift
    # build
    folded = fold_output(ctx, op, linear, weight, bias, scale_shift)
    if isinstance(folded, Skip):
        return folded
    new_weight, new_bias, rounding = folded
    return BackwardPlan(source.node, op, linear, new_weight, new_bias, tuple(passthrough), rounding)
