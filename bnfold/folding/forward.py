"""A BatchNormalization whose producer cannot absorb it folds into the one op it feeds:
linear(BN(x)) → linear'(x) (pre-activation networks, a BN on the network's input).

Whole only when every output reads the shift of every tap. Conv and Gemm take it
(affine.fold_input_affine): W'[o, i] = W[o, i]·s_i, b'_o = b_o + Σ W[o, i]·t_i; so does a 2-D
MatMul (a Gemm without C; it becomes one). A Conv that pads its input takes the scale only: a
padded border reads 0, not s·0 + t, but s·x + t = s·(x + t/s) and zero padding commutes with the
scale, so Conv(pad(s·x + t); W) = Conv(pad(x + t/s); W·s) exactly, and the BN becomes the Add
of t/s in front of the Conv (every s ≠ 0). A ConvTranspose takes it whole when every output
position receives every tap (linear.ConvTranspose.check_input_fold); else, as a padded Conv, its
weight takes the scale per input channel and the BN becomes the Add of t/s (the op is linear in
its input, so ConvTranspose(s·(x + t/s); W) = ConvTranspose(x + t/s; W·s)). Each op's own
`fold_input` holds its algebra.

On the way to the op the BN may pass shape-only ops that carry its channel axis whole, and a
mean over every position of each channel (GlobalAveragePool, ReduceMean over exactly the spatial
axes, keepdims or not): the mean of s·x + t is s·mean(x) + t, so a BN before the pooling of a
classifier head folds into the head's Gemm. A Flatten or Reshape that merges the channel axis with
every axis after it (N, C, H, W → N, C·H·W) makes channel c the block of features c·HW …
(c+1)·HW − 1: into a Gemm or MatMul after it the BN folds with its scale and shift repeated per
block (EfficientViT's BatchNorm1d → Flatten → Linear).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.folding import affine
from bnfold.folding.checks import call_site_attributes
from bnfold.folding.correction import batch_norm_input_moments, rounding_note
from bnfold.folding.linear import ConvGeometry, LinearOp, linear_op
from bnfold.folding.linear_plan import LinearPlan, become_shift, give_parameters
from bnfold.folding.plan import NOT_MINE, NotMine, Plan, Refused, Skip, refuse_if
from bnfold.folding.shape_ops import SHAPE_OPS, axis_after, merged_axis
from bnfold.folding.sources import AffineSource, BatchNormSource, ChannelAffine, read_batch_norm
from bnfold.graph.constants import NotConstant
from bnfold.graph.context import GraphContext
from bnfold.graph.protos import ONNX_DOMAINS, ints_attr, node_label

# Means over every position of each channel: a per-channel affine map passes them unchanged.
SPATIAL_MEANS = ("GlobalAveragePool", "ReduceMean")


@dataclass(frozen=True)
class ForwardPlan(LinearPlan):
    shape_ops: tuple[onnx.NodeProto, ...] = ()  # between the BN and the linear op, in order
    shift: np.ndarray | None = None  # a padded Conv: what stays of the BN, as an Add (t/s)

    @property
    def forward(self) -> bool:
        return True

    @property
    def via(self) -> str | None:
        parts = ["through " + ", ".join(node_label(n) for n in self.shape_ops)] if self.shape_ops else []
        if self.shift is not None:
            parts.append("its shift is a new Add before the padding")
        return "; ".join(parts) or None

    def rewire(self, ctx: GraphContext) -> None:
        if self.shift is not None:
            become_shift(ctx, self.source, self.shift)
            return
        ctx.index.remove_node(self.source)
        ctx.index.set_input(self.shape_ops[0] if self.shape_ops else self.linear, 0, self.source.input[0])


@dataclass(frozen=True)
class Head:
    """One linear op an affine map folds forward into, with its folded weight and bias."""

    op: LinearOp
    linear: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray
    shape_ops: tuple[onnx.NodeProto, ...]


@dataclass(frozen=True)
class HeadsPlan(Plan):
    """One affine map folded forward into every linear op that reads it (a BN, or tf2onnx's
    Mul/Add, before several classifier heads): W'ₖ = Wₖ·s, b'ₖ = bₖ + Wₖ·t for every head k."""

    source: onnx.NodeProto
    data: str  # what the source reads, and every head reads after the fold
    heads: tuple[Head, ...]

    @property
    def linears(self):
        return tuple(head.linear for head in self.heads)

    @property
    def forward(self) -> bool:
        return True

    @property
    def via(self) -> str | None:
        return f"into each of its {len(self.heads)} readers" if len(self.heads) > 1 else None

    def rewrite(self, ctx: GraphContext) -> None:
        for head in self.heads:
            give_parameters(ctx, head.op, head.linear, self.source, head.weight, head.bias)
            ctx.index.set_input(head.shape_ops[0] if head.shape_ops else head.linear, 0, self.data)
        ctx.index.remove_node(self.source)


def plan_heads(source: AffineSource, ctx: GraphContext) -> HeadsPlan | Skip | NotMine:
    """Fold `source` forward into every node that reads its output, each a linear op reading it
    as its data input (through shape-only ops and spatial means) that takes it whole (a shift
    cannot pass a Conv's padding: plan_forward leaves it as an Add when one BN feeds one Conv)."""
    chains = _readers_heads(source.node, ctx)  # match
    return chains if isinstance(chains, NotMine) else _plan_heads(source, chains, ctx)


def _readers_heads(node: onnx.NodeProto, ctx: GraphContext) -> list[tuple] | NotMine:
    """The linear ops the readers of `node`'s output lead to (_chains), or what reads it instead."""
    out = node.output[0]
    readers = ctx.index.readers(out)
    if out in ctx.index.graph_outputs:
        return NotMine("its output is a graph output")
    if not readers:
        return NotMine("nothing reads it")
    return _heads_of(readers, out, ctx)  # a reader that is no linear op, or not reached whole


def _plan_heads(source: AffineSource, chains: list[tuple], ctx: GraphContext) -> HeadsPlan | Skip:
    """plan_heads's checks, and each head's plan."""
    heads, rank = [], ctx.shapes.rank(source.data)
    if rank is None:
        return Skip("the rank of the tensor it reads is not known, so its channel axis is not either")
    for linear, op, shape_ops, repeat in chains:
        weight, bias, geometry = _read_linear(source.node, linear, op, ctx)
        whole = op.check_input_fold(linear, weight, geometry) or (
            bias is not None and op.check_bias(bias, op.output_channels(weight, linear))
        )
        if whole:
            return whole
        if zeros := op.reads_zeros(linear, weight, geometry):
            return Skip(f"{node_label(linear)} after it {zeros}: a shift cannot pass the padding")
        scale_shift = _per_feature(lambda channels: source.affine(ctx, channels, rank), op, linear, weight, repeat)
        folded = op.cast(linear, weight.dtype, *op.fold_input(linear, weight, bias, scale_shift), None)
        heads.append(Head(op, linear, *folded, shape_ops))
    return HeadsPlan(source.node, source.data, tuple(heads))


def plan_forward_into_several(bn: onnx.NodeProto, ctx: GraphContext) -> HeadsPlan | Skip | NotMine:
    """A BN that several linear ops read, directly or past a pooling or a shape op they share
    (EfficientFormerV2's mean before its head and its distillation head): into each of them
    (plan_heads); NOT_MINE for one."""
    # match
    several = len(set(map(id, ctx.index.readers(bn.output[0])))) > 1
    heads = _readers_heads(bn, ctx)
    if isinstance(heads, NotMine):
        return heads if several else NOT_MINE  # several readers that are not all linear ops: the reason
    if len(heads) < 2:
        return NOT_MINE
    return _plan_heads(BatchNormSource(bn), heads, ctx)


@dataclass(frozen=True)
class _Reader:
    """The one linear op a BN feeds (_linear_reader), its parameters read (_read_linear)."""

    linear: onnx.NodeProto
    op: LinearOp
    shape_ops: tuple
    repeat: int
    weight: np.ndarray
    bias: np.ndarray | None
    geometry: ConvGeometry
    zeros: str | None  # where the op reads zeros for part of its input (LinearOp.reads_zeros)


def _forward_reader(bn: onnx.NodeProto, ctx: GraphContext) -> _Reader | NotMine:
    """match: the one linear op that reads `bn` as its data input (what reads it instead, when
    none does); then its parameters, every check on the op itself passed (else Refused)."""
    found = _linear_reader(bn, ctx)
    if isinstance(found, NotMine):
        return found
    linear, op, shape_ops, repeat = found
    weight, bias, geometry = _read_linear(bn, linear, op, ctx)
    return _Reader(linear, op, shape_ops, repeat, weight, bias, geometry, op.reads_zeros(linear, weight, geometry))


def plan_forward(bn: onnx.NodeProto, ctx: GraphContext) -> ForwardPlan | Skip | NotMine:
    """Fold `bn` whole into the one linear op that reads it as its data input, directly or
    through shape-only ops that carry its channel axis whole to the op's input channel axis.
    NOT_MINE for an op that reads zeros for part of its input (plan_forward_scale)."""
    # match
    found = _forward_reader(bn, ctx)
    if isinstance(found, NotMine) or found.zeros:
        return found if isinstance(found, NotMine) else NOT_MINE
    linear, op, weight, bias = found.linear, found.op, found.weight, found.bias
    # checks
    failed = op.check_input_fold(linear, weight, found.geometry) or (
        bias is not None and op.check_bias(bias, op.output_channels(weight, linear))
    )
    if failed:
        return failed
    scale_shift = _per_feature(lambda channels: read_batch_norm(bn, ctx, channels), op, linear, weight, found.repeat)
    # plan
    moments = batch_norm_input_moments(ctx, bn, weight.dtype) if op.corrects_rounding else None
    folded = op.cast(linear, weight.dtype, *op.fold_input(linear, weight, bias, scale_shift), moments)
    rounding = rounding_note(weight.dtype, moments, op.corrects_rounding and ctx.scope.bias_correction)
    return ForwardPlan(bn, op, linear, *folded, rounding, shape_ops=found.shape_ops)


def plan_forward_scale(bn: onnx.NodeProto, ctx: GraphContext) -> ForwardPlan | Skip | NotMine:
    """Into the one linear op that reads `bn` and reads zeros for part of its input (a padded
    Conv, a ConvTranspose whose border outputs miss some taps): the scale into its weight per
    input channel, the shift left as an Add of t/s in front (module docstring). NOT_MINE for
    an op that reads its input whole (plan_forward)."""
    # match
    found = _forward_reader(bn, ctx)
    if isinstance(found, NotMine) or not found.zeros:
        return found if isinstance(found, NotMine) else NOT_MINE
    conv, op, weight, bias = found.linear, found.op, found.weight, found.bias
    # checks
    if bias is not None and (failed := op.check_bias(bias, op.output_channels(weight, conv))):
        return failed
    rank = ctx.shapes.rank(bn.input[0])
    if rank is None or rank < 2:
        return Skip(f"{node_label(conv)} after it {found.zeros}, and the rank of the BN's input is not known")
    scale, shift = (
        np.asarray(v, np.float64)
        for v in _per_feature(lambda channels: read_batch_norm(bn, ctx, channels), op, conv, weight, found.repeat)
    )
    if not scale.all():
        return Skip(
            f"{node_label(conv)} after it {found.zeros}, and a channel's scale is 0, so its shift cannot move in front "
            "of it"
        )
    # plan
    folded = op.cast(conv, weight.dtype, *op.fold_input(conv, weight, bias, (scale, np.zeros_like(shift))), None)
    with np.errstate(over="ignore"):  # the Conv's input, so the BN's output, has the weight's type
        moved = (shift / scale).astype(weight.dtype).reshape((-1,) + (1,) * (rank - 2))
    if not np.isfinite(affine.float_operand(moved)).all():
        return Skip(f"the BN's shift over its scale overflows {weight.dtype}")
    rounding = rounding_note(weight.dtype, None, op.corrects_rounding and ctx.scope.bias_correction)
    return ForwardPlan(bn, op, conv, *folded, rounding, shape_ops=found.shape_ops, shift=moved)


def _read_linear(source: onnx.NodeProto, linear: onnx.NodeProto, op: LinearOp, ctx: GraphContext):
    """(weight, bias or None, geometry) of the linear op `source` folds into, every check on
    the op itself passed; else Refused."""
    refuse_if(call_site_attributes(source, linear))
    weight, bias = op.parameters(linear, ctx)
    return weight, bias, op.geometry(linear, weight)


def _per_feature(read, op: LinearOp, linear: onnx.NodeProto, weight: np.ndarray, repeat: int) -> ChannelAffine:
    """The affine map `read(channels)` gives, one entry per input feature of the op: each
    channel's repeated `repeat` times when a Flatten made it a block (channel c is features
    c·repeat … (c+1)·repeat − 1)."""
    features = op.input_channels(weight, linear)
    if features % repeat:
        raise Refused(f"{node_label(linear)} reads {features} features, not a block of {repeat} per channel")
    scale_shift = read(features // repeat)
    if repeat == 1:
        return scale_shift
    return ChannelAffine(*(np.repeat(v, repeat) for v in scale_shift))


def _linear_reader(bn: onnx.NodeProto, ctx: GraphContext) -> tuple[onnx.NodeProto, LinearOp, tuple, int] | NotMine:
    """The one Conv, ConvTranspose, Gemm or MatMul that reads the BN's output as its data input,
    through shape-only ops that carry the channel axis whole to its axis 1; and those ops."""
    out = bn.output[0]
    readers = ctx.index.readers(out)
    if out in ctx.index.graph_outputs:
        return NotMine("its output is a graph output")
    if len(readers) != 1:
        return NotMine(f"it feeds {len(readers)} nodes")
    heads = _chains(readers[0], out, ctx)
    if isinstance(heads, NotMine) or len(heads) == 1:
        return heads if isinstance(heads, NotMine) else heads[0]
    return NotMine(f"{len(heads)} linear ops read it")


def _heads_of(readers, out: str, ctx: GraphContext) -> list[tuple] | NotMine:
    """Every linear op that `readers` of `out` lead to (_chains), or what reads it instead."""
    heads = []
    for reader in {id(r): r for r in readers}.values():
        found = _chains(reader, out, ctx)
        if isinstance(found, NotMine):
            return found
        heads += found
    return heads


def _chains(
    consumer: onnx.NodeProto, out: str, ctx: GraphContext, shape_ops: tuple = (), axis: int = 1, repeat: int = 1
) -> list[tuple[onnx.NodeProto, LinearOp, tuple, int]] | NotMine:
    """From `consumer`, a reader of `out`, through shape-only ops and spatial means to the linear
    ops that read the channels as their data input, one per branch where those ops have several
    readers: for each, (that op, its layout, the ops between, how many features each channel
    became: 1, or a flattened block's size); else what reads it instead."""
    shape_ops = list(shape_ops)
    while (
        consumer.domain in ONNX_DOMAINS
        and consumer.op_type in (*SHAPE_OPS, *SPATIAL_MEANS)
        and (consumer.input[0] == out)
    ):
        if consumer.op_type in SPATIAL_MEANS:
            failed = _spatial_mean(consumer, axis, ctx)
            if failed:
                return NotMine(failed.reason)
        elif repeat == 1 and (merged := merged_axis(consumer, axis, ctx)) and axis_after(consumer, axis, ctx) is None:
            axis, repeat = merged  # each channel is now a block of `repeat` features
        else:
            axis = axis_after(consumer, axis, ctx) if repeat == 1 else None
        readers = ctx.index.readers(consumer.output[0])
        if axis is None or consumer.output[0] in ctx.index.graph_outputs or not readers:
            return NotMine(f"{node_label(consumer)} after it does not carry its channel axis, whole, to a linear op")
        shape_ops.append(consumer)
        if len(set(map(id, readers))) > 1:  # branches: a linear op at the end of each
            heads = []
            for reader in {id(r): r for r in readers}.values():
                found = _chains(reader, consumer.output[0], ctx, tuple(shape_ops), axis, repeat)
                if isinstance(found, NotMine):
                    return found
                heads += found
            return heads
        out, consumer = consumer.output[0], readers[0]
    op = linear_op(consumer)
    if repeat > 1 and op is not None and op.dense and axis == 1:
        pass  # a 2-D input: its features axis is the one the op reads
    elif axis != 1:
        return NotMine(f"its channels reach {node_label(consumer)} on axis {axis}, not the input channel axis 1")
    if op is None:
        after = ctx.index.readers(consumer.output[0]) if consumer.output else ()
        if len(after) == 1 and linear_op(after[0]) is not None:
            return NotMine(f"{node_label(consumer)} stands between it and {node_label(after[0])}")
        return NotMine(f"it feeds {node_label(consumer)}, not a Conv, ConvTranspose, Gemm or MatMul")
    if list(consumer.input).count(out) != 1 or consumer.input[0] != out:
        return NotMine(f"{node_label(consumer)} after it reads it as a parameter")
    if repeat > 1 and not op.dense:
        return NotMine(f"{node_label(consumer)} reads its channels flattened with their positions; only a Gemm or "
                       "MatMul takes them so")  # fmt: skip
    return [(consumer, op, tuple(shape_ops), repeat)]


def _spatial_mean(node: onnx.NodeProto, axis: int, ctx: GraphContext) -> Skip | None:
    """None when `node` averages over every axis after the channel axis 1 and keeps that axis
    where it is: a mean over positions commutes with a per-channel affine map, so the map may
    pass it. Else why not."""
    if axis != 1:
        return Skip(f"its channels reach {node_label(node)} on axis {axis}, not axis 1")
    if node.op_type == "GlobalAveragePool":
        return None
    rank = ctx.shapes.rank(node.input[0])
    axes = ints_attr(node, "axes") if len(node.input) < 2 or not node.input[1] else _constant_axes(node, ctx)
    if rank is None or axes is None:
        return Skip(f"{node_label(node)} after it averages over axes bnfold cannot read")
    if sorted(a % rank for a in axes) != list(range(2, rank)):
        return Skip(f"{node_label(node)} after it averages over axes {list(axes)}, not exactly the spatial ones")
    return None


def _constant_axes(node: onnx.NodeProto, ctx: GraphContext) -> list[int] | None:
    try:
        return [int(a) for a in np.asarray(ctx.constant(node.input[1])).reshape(-1)]
    except NotConstant:
        return None
