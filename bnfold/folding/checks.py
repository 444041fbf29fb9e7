"""Preconditions several plans share; each returns the Skip the user reads, or None."""

from __future__ import annotations

import onnx

from bnfold.folding.plan import Skip
from bnfold.graph.constants import NotConstant
from bnfold.graph.context import GraphContext
from bnfold.graph.protos import int_attr, is_onnx_op, node_label


def call_site_attributes(*nodes: onnx.NodeProto) -> Skip | None:
    """Inside a model-local function an attribute may be bound at each call site
    (`ref_attr_name`): its value is not known here, so nothing depending on it folds."""
    for node in nodes:
        bound = [a.name for a in node.attribute if a.ref_attr_name]
        if bound:
            return Skip(f"{node_label(node)} takes attribute '{bound[0]}' from the function's caller")
    return None


SHAPE_ONLY = ("Shape", "Size")  # read a tensor's shape, never its values


def single_reader(
    node: onnx.NodeProto, reader: onnx.NodeProto, ctx: GraphContext, *, shape_readers: bool = False
) -> Skip | None:
    """`node`'s output may change only if `reader` alone reads it and it is no graph output.
    With `shape_readers`, nodes that read only its shape may read it too (for a rewrite that
    keeps the tensor's name and shape: LeViT's `reshape_as` exports a Shape of the Linear's
    output)."""
    out = node.output[0]
    if out in ctx.index.graph_outputs:
        return Skip(f"{node_label(node)} output '{out}' is also a graph output")
    others = [
        r
        for r in ctx.index.readers(out)
        if r is not reader and not (shape_readers and is_onnx_op(r, r.op_type) and r.op_type in SHAPE_ONLY)
    ]
    if others:
        return Skip(f"{node_label(node)} output also feeds {', '.join(node_label(r) for r in others[:3])}")
    return None


def is_inference_dropout(node: onnx.NodeProto, ctx: GraphContext) -> bool:
    """A Dropout that passes its input through at inference (and whose mask nobody reads)."""
    if not is_onnx_op(node, "Dropout") or any(ctx.index.is_used(m) for m in node.output[1:] if m):
        return False
    if ctx.opset < 7:
        return int_attr(node, "is_test", 0) != 0
    if len(node.input) > 2 and node.input[2]:  # Dropout-12: training_mode input
        try:
            return not bool(ctx.constant(node.input[2]))
        except NotConstant:
            return False
    return True


def producer_through_no_ops(data: str, ctx: GraphContext):
    """The node producing `data`, looking through inference no-ops (Identity, Dropout): returns
    (node or None, no-ops in between, or a Skip when a no-op's output is needed elsewhere)."""
    index = ctx.index
    passthrough = []
    node = index.producer(data)
    while node is not None and (is_onnx_op(node, "Identity") or is_inference_dropout(node, ctx)):
        out = node.output[0]
        if out in index.graph_outputs or len(index.readers(out)) > 1:
            return node, passthrough, Skip(f"{node_label(node)} in between also feeds other nodes")
        passthrough.append(node)
        node = index.producer(node.input[0])
    return node, passthrough, None
