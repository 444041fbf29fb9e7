"""A per-channel affine map that reaches a linear op through shape-only ops:

    affine(shape_ops(linear(x))) → shape_ops(linear'(x)),

exact when the shape ops carry the linear op's channel axis whole to the axis the affine map
works along. TensorFlow models converted with tf2onnx are the common case: a Keras Conv1D is
`Unsqueeze → Conv → Squeeze` with the BatchNormalization written as Mul/Add by [1, C, 1]
constants after the Squeeze, and a channels-last graph puts a Transpose between a Conv and a
Mul/Add whose constant is [C] on the *last* axis. The affine map folds into the linear op as
usual (linear_plan.fold_after), and the shape op nearest to it takes over its output name.
(A MatMul over tokens, with or without its bias Add, is `channel_last`'s.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.folding.checks import call_site_attributes, single_reader
from bnfold.folding.linear import linear_op
from bnfold.folding.linear_plan import LinearPlan, fold_after
from bnfold.folding.plan import NOT_MINE, NotMine, Refused, Skip, refuse_if
from bnfold.folding.sources import AffineSource
from bnfold.graph.context import GraphContext
from bnfold.graph.protos import ONNX_DOMAINS, ints_attr, node_label

# The shape-only ops a fold looks through, and the two directions an axis is followed through
# them: axis_after (input axis → output axis: from a linear op to the map after it, or from a BN
# to the linear op it feeds) and axis_before (output axis → input axis: from a BN back to a token
# MatMul). TOKEN_SHAPE_OPS are the ones exporters put around BatchNorm1d over tokens.
SHAPE_OPS = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")
TOKEN_SHAPE_OPS = ("Reshape", "Flatten", "Transpose")


@dataclass(frozen=True)
class ThroughShapeOpsPlan(LinearPlan):
    shape_ops: tuple[onnx.NodeProto, ...] = ()  # from the source back towards the linear op

    @property
    def via(self) -> str:
        return "through " + ", ".join(node_label(n) for n in reversed(self.shape_ops))

    def rewire(self, ctx: GraphContext) -> None:
        ctx.index.remove_node(self.source)
        ctx.index.set_output(self.shape_ops[0], 0, self.source.output[0])


def plan_through_shape_ops(source: AffineSource, ctx: GraphContext) -> ThroughShapeOpsPlan | Skip | NotMine:
    """NOT_MINE when the source does not read a shape op chain ending at a Conv, ConvTranspose,
    Gemm or 2-D MatMul."""
    # match: back through shape ops to a linear op
    node, reader, shape_ops, _ = back_through(source.data, source.node, SHAPE_OPS, ctx)
    op = linear_op(node)
    if not shape_ops or op is None or op.check_node(node, ctx) is not None:  # (a MatMul of a 3-D input)
        return NOT_MINE
    linear = node
    # checks
    failed = call_site_attributes(source.node, linear) or single_reader(linear, reader, ctx, shape_readers=True)
    if failed:
        return failed
    axis = 1  # the output channel axis of every linear op here
    for shape_op in reversed(shape_ops):
        axis = axis_after(shape_op, axis, ctx)
        if axis is None:
            return Skip(
                f"{node_label(shape_op)} between it and the linear op does not carry the channel axis over whole"
            )
    rank = ctx.shapes.rank(source.data)
    if rank is None:
        return Skip(f"the rank of '{source.data}' is not known")
    # plan
    new_weight, new_bias, rounding = fold_after(
        ctx, op, linear, lambda channels, _: source.affine(ctx, channels, rank, axis)
    )
    return ThroughShapeOpsPlan(source.node, op, linear, new_weight, new_bias, rounding, shape_ops=tuple(shape_ops))


def back_through(
    data: str, reader: onnx.NodeProto, ops: tuple[str, ...], ctx: GraphContext, axis: int | None = None
) -> tuple[onnx.NodeProto | None, onnx.NodeProto, list[onnx.NodeProto], int | None]:
    """Walk back from tensor `data` (read by `reader`) through the shape-only `ops`, each of
    which must be read by the next alone: (the node before them or None, the one that reads it,
    the shape ops from `data` backwards, and `axis` followed back through them by axis_before
    when one is given); Refused where a shape op is shared or loses the axis."""
    node, shape_ops = ctx.index.producer(data), []
    while node is not None and node.domain in ONNX_DOMAINS and node.op_type in ops:
        refuse_if(call_site_attributes(node) or single_reader(node, reader, ctx))
        if axis is not None:
            axis = axis_before(node, axis, ctx)
            if axis is None:
                raise Refused(
                    f"{node_label(node)} between it and the linear op does not carry the channel axis over whole"
                )
        shape_ops.append(node)
        reader, node = node, ctx.index.producer(node.input[0])
    return node, reader, shape_ops, axis


def axis_after(node: onnx.NodeProto, axis: int, ctx: GraphContext) -> int | None:
    """Which output axis of a shape-only op input `axis` becomes, if it passes through whole:
    for a Transpose by its perm; for the others, the output axis of the same (known) length
    with as many elements before it: the same number, or the same dims, symbols included (the
    batch of a Squeeze or an Unsqueeze)."""
    before = ctx.shapes.symbolic_shape(node.input[0])
    if node.op_type == "Transpose":
        perm = ints_attr(node, "perm") or (list(reversed(range(len(before)))) if before is not None else None)
        return perm.index(axis) if perm is not None and axis in perm else None
    after = ctx.shapes.symbolic_shape(node.output[0])
    if before is None or after is None or axis >= len(before) or not isinstance(before[axis], int):
        return None
    for b, size in enumerate(after):
        if size == before[axis] and _same_elements(before[:axis], after[:b]):
            return b
    return None


def merged_axis(node: onnx.NodeProto, axis: int, ctx: GraphContext) -> tuple[int, int] | None:
    """(output axis, k) when a Reshape or Flatten merges input `axis` and every axis after it
    into its last axis: channel c becomes the block of features c·k … (c+1)·k − 1 there, k the
    product of the merged trailing sizes (known numbers). Else None."""
    if node.op_type not in ("Reshape", "Flatten"):
        return None
    before, after = ctx.shapes.symbolic_shape(node.input[0]), ctx.shapes.symbolic_shape(node.output[0])
    if before is None or after is None or axis >= len(before) or not after:
        return None
    trailing = before[axis:]
    if not all(isinstance(d, int) for d in trailing) or after[-1] != int(np.prod(trailing, dtype=np.int64)):
        return None
    if not _same_elements(before[:axis], after[:-1]):
        return None
    return len(after) - 1, int(np.prod(trailing[1:], dtype=np.int64))


def axis_before(node: onnx.NodeProto, axis: int, ctx: GraphContext) -> int | None:
    """Which input axis of a shape-only op becomes output `axis`, if it passes through whole: for
    a Transpose by its perm; for a Reshape or Flatten only a last axis that stays the last axis,
    with its size (how a token Linear's features reach a BatchNorm1d and back)."""
    if node.op_type == "Transpose":
        rank = ctx.shapes.rank(node.input[0])
        perm = ints_attr(node, "perm") or (list(reversed(range(rank))) if rank is not None else None)
        return perm[axis] if perm is not None and axis < len(perm) else None
    before, after = ctx.shapes.shape(node.input[0]), ctx.shapes.shape(node.output[0])
    if before is None or after is None or axis != len(after) - 1:
        return None
    return len(before) - 1 if before[-1] is not None and before[-1] == after[-1] else None


def _same_elements(a: tuple, b: tuple) -> bool:
    """Whether two runs of dims hold as many elements: known numbers with one product, or the
    same dims once the 1s are left out (a symbol stands for itself)."""
    if all(isinstance(d, int) for d in (*a, *b)):
        return int(np.prod(a, dtype=np.int64)) == int(np.prod(b, dtype=np.int64))
    a, b = [d for d in a if d != 1], [d for d in b if d != 1]
    return None not in a and a == b
