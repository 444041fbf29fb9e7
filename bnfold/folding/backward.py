"""The usual fold: a per-channel affine map after a linear op, affine(linear(x)) → linear'(x).

Inference no-ops between them (Identity, Dropout) are looked through and removed. The linear op
takes over the affine's output name, so every reader and graph output downstream is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from bnfold.folding.checks import call_site_attributes, producer_through_no_ops, single_reader
from bnfold.folding.linear import LINEAR_OPS, linear_op
from bnfold.folding.linear_plan import LinearPlan, fold_after
from bnfold.folding.plan import NotMine, Skip
from bnfold.folding.sources import AffineSource
from bnfold.graph.context import GraphContext
from bnfold.graph.protos import node_label


@dataclass(frozen=True)
class BackwardPlan(LinearPlan):
    passthrough: tuple[onnx.NodeProto, ...] = ()  # no-ops between them, removed with the source

    def rewire(self, ctx: GraphContext) -> None:
        for node in (self.source, *self.passthrough):
            ctx.index.remove_node(node)
        ctx.index.set_output(self.linear, 0, self.source.output[0])


def plan_backward(
    source: AffineSource, ctx: GraphContext, reader: onnx.NodeProto | None = None
) -> BackwardPlan | Skip | NotMine:
    """Fold `source` into the linear op producing the tensor it reads. `reader` is the node that
    must be the only reader of that tensor (default: the source itself)."""
    # match
    linear, passthrough, blocked = producer_through_no_ops(source.data, ctx)
    if blocked:  # (`linear` is then the no-op that others read)
        return blocked
    if linear is None:
        kind = "a graph input" if source.data in ctx.index.graph_inputs else "not produced by any node"
        return NotMine(f"its input '{source.data}' is {kind}; nothing to fold into")
    op = linear_op(linear)
    if op is None:
        return NotMine(f"its input comes from {node_label(linear)}; bnfold folds into {', '.join(LINEAR_OPS)}")
    # checks
    first = passthrough[-1] if passthrough else (reader or source.node)
    failed = call_site_attributes(source.node, linear, *passthrough) or single_reader(linear, first, ctx)
    if failed:
        return failed
    # plan
    new_weight, new_bias, rounding = fold_after(
        ctx, op, linear, lambda channels, rank: source.affine(ctx, channels, rank)
    )
    return BackwardPlan(source.node, op, linear, new_weight, new_bias, rounding, passthrough=tuple(passthrough))
