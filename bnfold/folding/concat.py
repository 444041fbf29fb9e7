"""A BatchNormalization after a channel Concat, split into one backward fold per Concat input:

    BN(Concat_axis1(y_1, …, y_k)) = Concat(BN_1(y_1), …, BN_k(y_k))

with BN_j the slice of the BN's parameters for y_j's channels; each BN_j folds into y_j's linear
producer, and the Concat takes over the BN's output name.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from bnfold.folding.backward import BackwardPlan, plan_backward
from bnfold.folding.checks import call_site_attributes, producer_through_no_ops, single_reader
from bnfold.folding.linear import linear_op
from bnfold.folding.linear_plan import give_parameters
from bnfold.folding.plan import NOT_MINE, NotMine, Plan, Refused, Skip, answer
from bnfold.folding.sources import ChannelAffine, KnownAffine, read_batch_norm
from bnfold.graph.context import GraphContext
from bnfold.graph.protos import int_attr, is_onnx_op, node_label


@dataclass(frozen=True)
class ConcatPlan(Plan):
    source: onnx.NodeProto  # the BN
    concat: onnx.NodeProto
    parts: tuple[BackwardPlan, ...]

    @property
    def linears(self):
        return tuple(part.linear for part in self.parts)

    @property
    def via(self) -> str:
        return f"split at {node_label(self.concat)}"

    @property
    def rounding(self) -> str | None:
        """One note when every part's weights were rounded alike, else one per part."""
        notes = {part.rounding for part in self.parts if part.rounding}
        if len(notes) <= 1:
            return next(iter(notes), None)
        return "; ".join(f"{node_label(part.linear)}: {part.rounding}" for part in self.parts)

    def rewrite(self, ctx: GraphContext) -> None:
        for part in self.parts:
            give_parameters(ctx, part.op, part.linear, self.source, part.weight, part.bias)
            if part.passthrough:  # no-ops between the linear op and the Concat go too
                read_by_concat = part.passthrough[0].output[0]
                for node in part.passthrough:
                    ctx.index.remove_node(node)
                ctx.index.set_output(part.linear, 0, read_by_concat)
        ctx.index.remove_node(self.source)
        ctx.index.set_output(self.concat, 0, self.source.output[0])


def plan_concat(bn: onnx.NodeProto, ctx: GraphContext) -> ConcatPlan | Skip | NotMine:
    """A BN right after a Concat is this mechanism's, whether or not the split can fold."""
    # match
    concat = ctx.index.producer(bn.input[0])
    if concat is None or not is_onnx_op(concat, "Concat"):
        return NOT_MINE
    # checks on the Concat
    bound = call_site_attributes(bn, concat)
    if bound:
        return bound
    axis = int_attr(concat, "axis", 0)
    if axis < 0:
        rank = ctx.shapes.rank(concat.output[0])
        axis = axis + rank if rank is not None else axis
    if axis != 1:
        return Skip(f"its input comes from {node_label(concat)} along axis {axis}, not the channel axis")
    failed = single_reader(concat, bn, ctx)
    if failed:
        return Skip(f"BatchNormalization after Concat: {failed.reason}")
    if len(set(concat.input)) != len(concat.input):
        return Skip(f"BatchNormalization after Concat: {node_label(concat)} repeats an input")
    # every input from a linear op, whose channel counts split the BN
    channels = []
    for data in concat.input:
        producer, _, _ = producer_through_no_ops(data, ctx)  # Identity, inference Dropout
        op = linear_op(producer)
        if op is None:
            what = node_label(producer) if producer is not None else f"'{data}'"
            return Skip(f"BatchNormalization after Concat: input {what} is not a linear op")
        try:
            weight, _ = op.parameters(producer, ctx)
        except Refused as refusal:
            raise Refused(f"BatchNormalization after Concat: {refusal.skip.reason}") from None
        channels.append(op.output_channels(weight, producer))
    whole = read_batch_norm(bn, ctx, sum(channels))
    # plan: one backward fold per input, with its slice of the BN
    parts, offset = [], 0
    for data, count in zip(concat.input, channels):
        piece = ChannelAffine(whole.scale[offset : offset + count], whole.shift[offset : offset + count])
        offset += count
        part = answer(plan_backward, KnownAffine(bn, data, piece), ctx, concat)
        if isinstance(part, (Skip, NotMine)):  # (every input comes from a linear op: checked above)
            return Skip(f"BatchNormalization after Concat: {part.reason if isinstance(part, Skip) else part.why}")
        parts.append(part)
    return ConcatPlan(bn, concat, tuple(parts))
