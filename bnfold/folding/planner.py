"""Which fold a node gets: the mechanisms in order, and how their refusals combine."""

from __future__ import annotations

import onnx

from bnfold.folding.backward import plan_backward
from bnfold.folding.channel_last import plan_channel_last
from bnfold.folding.checks import producer_through_no_ops
from bnfold.folding.concat import plan_concat
from bnfold.folding.forward import plan_forward
from bnfold.folding.linear import linear_op
from bnfold.folding.plan import Plan, Skip
from bnfold.folding.shape_ops import plan_through_shape_ops
from bnfold.folding.sources import BatchNormSource, ElementwiseSource, check_inference_mode
from bnfold.graph.context import GraphContext
from bnfold.graph.protos import is_onnx_op, node_label


def plan_batch_norm(bn: onnx.NodeProto, ctx: GraphContext, version: int) -> Plan | Skip:
    """A BN in inference mode folds, in this order of preference:
    1. after a channel Concat: split across the Concat's inputs (that decides it);
    2. backward, into the linear op that produces its input;
    3. through shape-only ops, into a token Linear (decides it when the BN is behind them);
    4. forward, into the one Conv or Gemm it feeds.
    Refused, the reason names why backward and why forward failed."""
    mode = check_inference_mode(bn, version, ctx)
    if mode:
        return mode
    producer = ctx.index.producer(bn.input[0])
    if producer is not None and is_onnx_op(producer, "Concat"):
        return plan_concat(bn, producer, ctx)
    backward = plan_backward(BatchNormSource(bn), ctx)
    if not isinstance(backward, Skip):
        return backward
    channel_last = plan_channel_last(bn, ctx)
    if channel_last is not None:
        return channel_last
    through = plan_through_shape_ops(BatchNormSource(bn), ctx)
    if isinstance(through, Plan):
        return through
    if through is not None:
        backward = through  # its reason says more than "its input comes from Reshape"
    forward = plan_forward(bn, ctx)
    if not isinstance(forward, Skip):
        return forward
    return _quantized(bn, ctx) or Skip(f"{backward.reason}; nor forward: {forward.reason}")


def _quantized(bn: onnx.NodeProto, ctx: GraphContext) -> Skip | None:
    """A BN between DequantizeLinear and QuantizeLinear: a model quantized before folding."""
    producer = ctx.index.producer(bn.input[0])
    readers = ctx.index.readers(bn.output[0])
    if (producer is not None and is_onnx_op(producer, "DequantizeLinear")) or any(
        is_onnx_op(r, "QuantizeLinear") for r in readers
    ):
        return Skip(
            "it sits between DequantizeLinear and QuantizeLinear: the model was quantized before folding, and "
            "quantized weights cannot absorb a scale exactly; fold before quantizing"
        )
    return None


def plan_elementwise(node: onnx.NodeProto, ctx: GraphContext) -> Plan | Skip:
    """A Mul/Add/Sub/Div by a per-channel constant, folded into the linear op before it (the
    first of its inputs that comes from one)."""
    for data in node.input:
        producer, _, _ = producer_through_no_ops(data, ctx)
        if linear_op(producer) is not None:
            return plan_backward(ElementwiseSource(node, data), ctx)
    for data in node.input:
        through = plan_through_shape_ops(ElementwiseSource(node, data), ctx)
        if isinstance(through, Plan):
            return through
    return Skip(f"{node_label(node)} does not follow a linear op")
