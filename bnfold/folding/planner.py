"""Which fold a node gets: for each kind of candidate, its mechanisms in order and what their
refusals mean (plan.decide reads these tables; plan.py says what a mechanism returns).

A BatchNormalization in inference mode folds, in this order of preference:
1. after a channel Concat: split across the Concat's inputs (that decides it);
2. into the DequantizeLinear scale of the quantized weight of the linear op before it (decides
   it when that weight is one: quantized.py);
3. backward, into the linear op that produces its input;
4. over the last axis of a token MatMul behind shape-only ops (a backward fold: its refusal is
   the backward reason, and forward is still tried; EfficientViT's BN1d after a Flatten);
5. through shape-only ops, into a linear op (its refusal says more than backward's);
6. forward, into the one Conv, ConvTranspose, Gemm or MatMul it feeds.
First its guard: a BN in training mode (or whose batch statistics are read) folds nowhere.
Refused, the reason names why backward and why forward failed, unless the BN sits inside a
quantized model, which explains it.

A Mul/Add/Sub/Div by a per-channel constant folds backward into the linear op behind the first
of its inputs that comes from one (into its quantized weight's scale when it has one), else
through shape-only ops, else forward into every linear op that reads it; refused, it is not reported
(most such nodes are no BN at all).
"""

from __future__ import annotations

import onnx

from bnfold.folding.backward import plan_backward
from bnfold.folding.channel_last import plan_channel_last, plan_channel_last_scale
from bnfold.folding.checks import producer_through_no_ops
from bnfold.folding.concat import plan_concat
from bnfold.folding.forward import plan_forward, plan_forward_into_several, plan_forward_scale, plan_heads
from bnfold.folding.linear import linear_op
from bnfold.folding.plan import NOT_MINE, Answer, Check, Mechanism, Mechanisms, Pass, Plan, Role, Skip, answer, decide
from bnfold.folding.quantized import plan_quantized_weight
from bnfold.folding.reparam import plan_merge
from bnfold.folding.shape_ops import plan_through_shape_ops
from bnfold.folding.sources import (
    ELEMENTWISE_AFFINE,
    RUNTIME_NORMALIZATIONS,
    RUNTIME_STATISTICS,
    BatchNormSource,
    ElementwiseSource,
    check_inference_mode,
)
from bnfold.graph.context import GraphContext
from bnfold.graph.protos import is_onnx_op, node_label
from bnfold.report import BRANCH_MERGE


def _inference_mode(bn: onnx.NodeProto, ctx: GraphContext, version: int) -> Skip | None:
    return check_inference_mode(bn, version, ctx)


def _quantized(bn: onnx.NodeProto, ctx: GraphContext, version: int) -> Skip | None:
    """A BN between DequantizeLinear and QuantizeLinear: a model quantized before folding."""
    producer = ctx.index.producer(bn.input[0])
    readers = ctx.index.readers(bn.output[0])
    if (producer is not None and is_onnx_op(producer, "DequantizeLinear")) or any(
        is_onnx_op(r, "QuantizeLinear") for r in readers
    ):
        if ctx.scope.requantize:
            return Skip(
                "it sits between DequantizeLinear and QuantizeLinear, and its input is not a linear op's output "
                "through one quantizer pair alone (--requantize folds only that)"
            )
        return Skip(
            "it sits between DequantizeLinear and QuantizeLinear: the model was quantized before folding, and "
            "a fold across a quantizer is not exact; fold before quantizing, or fold with --requantize"
        )
    return None


def _behind_linear(plan):
    """A mechanism for a Mul/Add/Sub/Div: `plan` of the node, read from the first input that comes
    from a linear op (through no-ops); NOT_MINE without one."""

    def mechanism(node: onnx.NodeProto, ctx: GraphContext, version: int) -> Answer:
        for data in node.input:
            producer, _, _ = producer_through_no_ops(data, ctx)
            if linear_op(producer) is not None:
                return plan(ElementwiseSource(node, data), ctx)
        return NOT_MINE

    return mechanism


def _elementwise_forward(node: onnx.NodeProto, ctx: GraphContext, version: int) -> Answer:
    """Forward into every linear op that reads it (plan_heads), when its one non-constant input
    comes from no linear op (else backward decided): tf2onnx's Mul/Add of a BN before several
    Dense heads."""
    data = [name for name in node.input if ctx.constants.why_not(name) is not None]
    if len(data) != 1 or linear_op(producer_through_no_ops(data[0], ctx)[0]) is not None:
        return NOT_MINE
    return plan_heads(ElementwiseSource(node, data[0]), ctx)


def _elementwise_through_shape_ops(node: onnx.NodeProto, ctx: GraphContext, version: int) -> Answer:
    """Through shape-only ops, from any input; only a plan counts (refusals go unreported)."""
    for data in node.input:
        through = answer(plan_through_shape_ops, ElementwiseSource(node, data), ctx)
        if isinstance(through, Plan):
            return through
    return NOT_MINE


def _backward_nor_forward(why: dict[Role, Skip]) -> Skip:
    unmatched = Skip("no mechanism matched it")
    return Skip(f"{why.get(Role.BACKWARD, unmatched).reason}; nor forward: {why.get(Role.FORWARD, unmatched).reason}")


BATCH_NORM = Mechanisms(
    guards=(Check("inference mode", _inference_mode),),
    order=(
        Mechanism("split at a Concat", lambda bn, ctx, _: plan_concat(bn, ctx), Role.DECIDES),
        Mechanism(
            "into a quantized weight", lambda bn, ctx, _: plan_quantized_weight(BatchNormSource(bn), ctx), Role.DECIDES
        ),
        Mechanism("backward", lambda bn, ctx, _: plan_backward(BatchNormSource(bn), ctx), Role.BACKWARD),
        Mechanism("token MatMul, channel last", lambda bn, ctx, _: plan_channel_last(bn, ctx), Role.BACKWARD),
        Mechanism(
            "token MatMul without bias, channel last",
            lambda bn, ctx, _: plan_channel_last_scale(bn, ctx),
            Role.BACKWARD,
        ),
        Mechanism(
            "through shape ops", lambda bn, ctx, _: plan_through_shape_ops(BatchNormSource(bn), ctx), Role.BACKWARD
        ),
        Mechanism("forward, into several readers", lambda bn, ctx, _: plan_forward_into_several(bn, ctx), Role.FORWARD),
        Mechanism("forward", lambda bn, ctx, _: plan_forward(bn, ctx), Role.FORWARD),
        Mechanism("forward, the scale past zeros", lambda bn, ctx, _: plan_forward_scale(bn, ctx), Role.FORWARD),
    ),
    explanations=(Check("quantized", _quantized),),
    refused=lambda bn, why: _backward_nor_forward(why),
)

ELEMENTWISE = Mechanisms(
    order=(
        Mechanism("into a quantized weight", _behind_linear(plan_quantized_weight), Role.DECIDES),
        Mechanism("backward", _behind_linear(plan_backward), Role.DECIDES),
        Mechanism("through shape ops", _elementwise_through_shape_ops, Role.DECIDES),
        Mechanism("forward", _elementwise_forward, Role.DECIDES),
    ),
    refused=lambda node, why: Skip(f"{node_label(node)} does not follow a linear op"),
    reported=False,  # most such nodes are no BN at all: only folds are reported
)

# reported, so a user who asks why sees the answer
RUNTIME_NORMALIZATION = Mechanisms(order=(), refused=lambda node, why: RUNTIME_STATISTICS)

CANDIDATES = {
    "BatchNormalization": BATCH_NORM,
    **{op: ELEMENTWISE for op in ELEMENTWISE_AFFINE},
    **{op: RUNTIME_NORMALIZATION for op in RUNTIME_NORMALIZATIONS},
}

# A sum of parallel branches (RepVGG, MobileOne, RepMixer) merged into one Conv; a sum of other
# things (a ResNet shortcut) is no candidate, and the report says nothing of it.
SUMS = Mechanisms(
    order=(Mechanism("branch merge", plan_merge, Role.DECIDES),),
    refused=lambda node, why: None,
    label=BRANCH_MERGE,
)
SUM_OPS = ("Add", "Sub", "Sum")

# The walk's passes over a graph, repeated until a round changes nothing: a merge makes a Conv
# that a BN after the sum folds into, a fold makes a Conv that joins a sum.
FOLDS = Pass("fold", CANDIDATES)
MERGES = Pass("merge branches", dict.fromkeys(SUM_OPS, SUMS), from_the_end=True)


def plan_batch_norm(bn: onnx.NodeProto, ctx: GraphContext, version: int) -> Plan | Skip | None:
    return decide(bn, BATCH_NORM, ctx, version)
