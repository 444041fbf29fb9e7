"""A per-channel affine map after a linear op whose weight is DequantizeLinear(q, scale, zero
point) of constants: the map's scale goes into the DequantizeLinear's scale, one per output
channel, and its shift into the bias. The integer weights q and the zero points stay byte for
byte what they were: what onnxruntime's integer kernels read.

DequantizeLinear gives W[c] = (q[c] − z[c])·scale[c] along its `axis`, so s[c]·W[c] is
(q[c] − z[c])·(scale[c]·s[c]): the fold's one rounding is the new float scale's. A per-tensor
scale becomes per-axis, on the weight's output-channel axis (the zero point repeated to match).

The bias absorbs the shift as in every backward fold (b' = β·b·s + t), in the form it had:
- none: a float bias of the scale's type, t;
- a float constant;
- an int32 DequantizeLinear(qb, sb, zb) of constants, the form of quantize_static's QDQ models
  (sb = the input's scale × the weight's): requantized at sb·s, which keeps that relation with
  the new weight scale. Its rounding is at most half a step; the report gives the largest.

With the scope's `requantize` (`--requantize`), a map behind a quantizer on the linear op's
output (`Conv → QuantizeLinear → DequantizeLinear → BN`, what quantize_static makes of a model
whose BN was not folded first) folds as if the BN had been folded before quantizing: that
QuantizeLinear/DequantizeLinear pair goes. Not exact (the pair rounded the conv's output to its
grid), so never by default; verification then judges the fold against the original with that
pair bypassed (bnfold.verification.quantizers). A pair that clips at zero is refused: it holds a
Relu that quantize_static fused into it (bnfold.graph.quantizers), and removing it would remove
the Relu.

Refused, with the reason: a model below opset 13 (DequantizeLinear-10 has one scale per tensor),
blocked quantization (`block_size`), a per-axis scale on another axis
than the output channels, a ConvTranspose with groups (one axis-1 scale serves every group), a
channel the map scales by zero or a negative number (a DequantizeLinear scale stays positive for
onnxruntime's integer kernels).

A weight's (or an int32 bias's) DequantizeLinear that other nodes read too is not rescaled for
them: the linear op gets a copy of it, reading the same integers and zero point, and only the
copy's scale changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.folding import affine
from bnfold.folding.checks import call_site_attributes, producer_through_no_ops, single_reader
from bnfold.folding.linear import LinearOp, linear_op
from bnfold.folding.linear_plan import folded_name, give_bias
from bnfold.folding.plan import NOT_MINE, Answer, Plan, Refused, Skip
from bnfold.folding.sources import AffineSource, ChannelAffine, float_constant
from bnfold.graph.constants import NotConstant
from bnfold.graph.context import GraphContext
from bnfold.graph.protos import int_attr, is_onnx_op, node_label
from bnfold.graph.quantizers import clips_at_zero
from bnfold.report import REMOVED

INT32 = np.iinfo(np.int32)
PER_AXIS_OPSET = 13  # DequantizeLinear-13 takes the `axis` of a per-axis scale; 10 has one scale only


@dataclass(frozen=True)
class Dequantized:
    """A DequantizeLinear of constants: its node, and q, scale, zero point (or None) as read."""

    node: onnx.NodeProto
    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None

    def per_axis(self, axis: int, channels: int, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(new scale, new zero point or None): this grid's scale times `scale` along the
        weight's `axis` of `channels`; the zero point repeated there when it was per tensor."""
        if self.scale.size == 1:
            zero_point = None if self.zero_point is None else np.full(channels, self.zero_point.reshape(()))
            return (float(self.scale.reshape(())) * scale), zero_point
        own = int_attr(self.node, "axis", 1) % self.q.ndim
        if own != axis or self.scale.shape != (channels,):
            raise Refused(
                f"{node_label(self.node)} scales axis {own} ({list(self.scale.shape)}), not the weight's output "
                f"channels (axis {axis}, {channels})"
            )
        return self.scale.astype(np.float64) * scale, None


def dequantized(name: str, ctx: GraphContext) -> Dequantized | None:
    """The DequantizeLinear of constants that makes `name`, or None when no DequantizeLinear
    makes it; Refused, saying why, when it is one that cannot be rescaled."""
    node = ctx.index.producer(name)
    if node is None or not is_onnx_op(node, "DequantizeLinear"):
        return None
    if int_attr(node, "block_size", 0):
        raise Refused(f"{node_label(node)} is blocked (block_size): one scale serves several channels' blocks")
    values = []
    for i, role in enumerate(("integers", "scale", "zero point")):
        if i >= len(node.input) or not node.input[i]:
            values.append(None)
            continue
        try:
            values.append(np.asarray(ctx.constant(node.input[i])))
        except NotConstant as why:
            raise Refused(f"the {role} of {node_label(node)} is not constant: {why}") from None
    q, scale, zero_point = values
    if q is None or scale is None or scale.dtype.kind != "f":
        raise Refused(f"{node_label(node)} has no float scale")
    return Dequantized(node, q, scale, zero_point)


@dataclass(frozen=True)
class QuantizedWeightPlan(Plan):
    source: onnx.NodeProto
    op: LinearOp
    linear: onnx.NodeProto
    weight: Dequantized
    axis: int  # the DequantizeLinear's new axis: the weight's output channels
    scale: np.ndarray  # the weight's new scale, in its dtype
    zero_point: np.ndarray | None  # a per-tensor zero point repeated per channel, or None (kept)
    bias: np.ndarray  # a float bias, or an int32 one behind `bias_grid`
    bias_grid: Dequantized | None = None
    bias_scale: np.ndarray | None = None  # the int32 bias's new scale
    note: str | None = None
    passthrough: tuple[onnx.NodeProto, ...] = ()
    quantizer: onnx.NodeProto | None = None  # the QuantizeLinear removed with --requantize

    @property
    def linears(self):
        return (self.linear,)

    @property
    def via(self) -> str | None:
        """The quantizer removed, and the int32 bias's rounding (REMOVED marks the first)."""
        removed = None if self.quantizer is None else f"across {node_label(self.quantizer)}, {REMOVED}"
        return "; ".join(part for part in (removed, self.note) if part) or None

    def rewrite(self, ctx: GraphContext) -> None:
        _rescale(ctx, _own(ctx, self.weight.node, self.linear, 1), self.scale, self.zero_point, self.axis)
        if self.bias_grid is None:
            give_bias(ctx, self.op, self.linear, self.source, self.bias)
        else:
            grid = _own(ctx, self.bias_grid.node, self.linear, 2)
            ctx.index.set_input(grid, 0, ctx.add_initializer(self.bias, folded_name(grid.input[0])))
            zero_point = None if self.bias_grid.zero_point is None or self.bias_grid.zero_point.size != 1 else (
                np.full(len(self.bias), self.bias_grid.zero_point.reshape(())))  # fmt: skip
            _rescale(ctx, grid, self.bias_scale, zero_point, 0)
            self.op.after_bias_rewrite(self.linear)
        for node in (self.source, *self.passthrough):
            ctx.index.remove_node(node)
        ctx.index.set_output(self.linear, 0, self.source.output[0])


def _own(ctx: GraphContext, dequantizer: onnx.NodeProto, linear: onnx.NodeProto, position: int) -> onnx.NodeProto:
    """The DequantizeLinear the linear op reads at `position`, its own: when another node reads
    it too, a copy of it just before the op (its integers and zero point shared, untouched), which
    the op then reads instead. The others keep the original."""
    if not _others(dequantizer, linear, ctx):
        return dequantizer
    copy = onnx.NodeProto()
    copy.CopyFrom(dequantizer)
    copy.output[0] = ctx.fresh_name(folded_name(dequantizer.output[0]))
    if copy.name:
        copy.name = ctx.fresh_name(folded_name(copy.name))
    copy = ctx.index.insert_node(copy, before=linear)
    ctx.index.set_input(linear, position, copy.output[0])
    return copy


def _rescale(ctx: GraphContext, node: onnx.NodeProto, scale: np.ndarray, zero_point, axis: int) -> None:
    """Point a DequantizeLinear at a new scale (and zero point) along `axis`."""
    ctx.index.set_input(node, 1, ctx.add_initializer(scale, folded_name(node.input[1])))
    if zero_point is not None:
        ctx.index.set_input(node, 2, ctx.add_initializer(zero_point, folded_name(node.input[2])))
    for attr in node.attribute:
        if attr.name == "axis":
            attr.i = axis
            return
    node.attribute.append(onnx.helper.make_attribute("axis", axis))


def plan_quantized_weight(source: AffineSource, ctx: GraphContext) -> Answer:
    """Fold `source` into the linear op producing its input when that op's weight is a
    DequantizeLinear of constants (else NOT_MINE: the usual backward fold's case)."""
    # match
    linear, passthrough, blocked = producer_through_no_ops(source.data, ctx)
    quantizer = _quantizer_pair(linear, ctx) if ctx.scope.requantize and not blocked else None
    if quantizer is not None:  # the pair goes with the source, as no-ops do
        dequantizer = linear
        linear, more, blocked = producer_through_no_ops(quantizer.input[0], ctx)
        passthrough = [*passthrough, dequantizer, quantizer, *more]
    op = linear_op(linear)
    if blocked or op is None or len(linear.input) < 2:
        return NOT_MINE
    weight = dequantized(linear.input[1], ctx)
    if weight is None:
        return NOT_MINE
    # checks
    if ctx.opset < PER_AXIS_OPSET:
        return Skip(
            f"{node_label(weight.node)} is DequantizeLinear-10 (opset {ctx.opset}): one scale per tensor, and the "
            "BN's scale differs per channel; per-axis scales need opset 13"
        )
    first = passthrough[-1] if passthrough else source.node
    failed = (
        call_site_attributes(source.node, linear, *passthrough)
        or single_reader(linear, first, ctx)
        or op.check_node(linear, ctx)
        or op.check_weight(weight.q, linear)
    )
    if failed:
        return failed
    if op.output_blocks(linear) > 1:
        return Skip(f"{node_label(linear)} has groups: one DequantizeLinear scale per axis-1 column serves each")
    axis, channels = op.weight_axis(linear), op.output_channels(weight.q, linear)
    scale_shift = source.affine(ctx, channels, op.output_rank(weight.q))
    scale, shift = scale_shift
    if not (scale > 0).all():
        c = int(np.argmin(scale > 0))
        return Skip(
            f"it scales channel {c} by {scale[c]:.3g}: the weight's DequantizeLinear scale would not stay positive, "
            "and the integer weights are not rewritten"
        )
    # plan
    new_scale, zero_point = weight.per_axis(axis, channels, scale)
    new_scale = new_scale.astype(weight.scale.dtype)
    if not np.isfinite(new_scale).all() or not (new_scale > 0).all():
        return Skip(f"the weight's new scale overflows or underflows {weight.scale.dtype}")
    values, grid, bias_scale, note = _folded_bias(op, linear, ctx, scale_shift, weight.scale.dtype)
    return QuantizedWeightPlan(source.node, op, linear, weight, axis, new_scale, zero_point, values, grid,
                               bias_scale, note, tuple(passthrough), quantizer)  # fmt: skip


def _quantizer_pair(node: onnx.NodeProto | None, ctx: GraphContext) -> onnx.NodeProto | None:
    """The QuantizeLinear of a DequantizeLinear(QuantizeLinear(t)) pair on one grid (`node` the
    DequantizeLinear), each read only by the next, when it only rounds; Refused when it also clips
    at zero (a Relu quantize_static fused into it: removing it would remove the Relu); else None."""
    if node is None or not is_onnx_op(node, "DequantizeLinear"):
        return None
    quantizer = ctx.index.producer(node.input[0])
    if quantizer is None or not is_onnx_op(quantizer, "QuantizeLinear"):
        return None
    if _others(quantizer, node, ctx) or len(ctx.index.readers(node.output[0])) != 1:
        return None
    if node.output[0] in ctx.index.graph_outputs or int_attr(node, "axis", 1) != int_attr(quantizer, "axis", 1):
        return None
    try:
        grids = [[ctx.constant(n.input[i]) if len(n.input) > i and n.input[i] else None for i in (1, 2)]
                 for n in (quantizer, node)]  # fmt: skip
    except NotConstant:
        return None
    same = all(
        (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b) and a.dtype == b.dtype)
        for a, b in zip(*grids)
    )
    if not same:
        return None
    if clips_at_zero(grids[0][1]):
        raise Refused(
            f"the quantizer before it, {node_label(quantizer)}, clips at zero (its zero point is the end of its "
            "range): it holds an activation fused into it, so --requantize does not remove it"
        )
    return quantizer


def _others(node: onnx.NodeProto, linear: onnx.NodeProto, ctx: GraphContext) -> bool:
    """Whether anything but `linear` reads `node`'s output (a graph output counts)."""
    out = node.output[0]
    return out in ctx.index.graph_outputs or any(r is not linear for r in ctx.index.readers(out))


def _folded_bias(op: LinearOp, linear: onnx.NodeProto, ctx: GraphContext, scale_shift: ChannelAffine, dtype):
    """(bias, its DequantizeLinear or None, its new scale or None, the report's note); else Refused."""
    scale, shift = scale_shift
    name = linear.input[2] if len(linear.input) > 2 else ""
    if not name:
        return affine.fold_bias(None, scale, shift).astype(dtype), None, None, None
    grid = dequantized(name, ctx)
    if grid is None:
        bias = float_constant(ctx, name, f"{op.op_type} bias")
        if bias.shape != scale.shape:
            raise Refused(f"{op.op_type} bias has shape {list(bias.shape)}, expected [{len(scale)}]")
        folded = affine.fold_bias(bias.astype(np.float64) * op.bias_scale(linear), scale, shift)
        return folded.astype(bias.dtype), None, None, None
    if grid.q.dtype != np.int32 or grid.q.shape != scale.shape:
        raise Refused(f"{node_label(grid.node)} is not an int32 bias of one value per channel")
    zero = 0.0 if grid.zero_point is None else grid.zero_point.astype(np.float64)
    steps = grid.scale.astype(np.float64)
    bias = (grid.q.astype(np.float64) - zero) * steps * op.bias_scale(linear)
    new_steps = (steps * scale).astype(grid.scale.dtype)
    exact = (affine.fold_bias(bias, scale, shift)) / new_steps.astype(np.float64) + zero
    if not (np.isfinite(exact).all() and (np.abs(exact) < INT32.max).all()):
        raise Refused(f"the requantized bias of {node_label(linear)} overflows int32")
    rounded = np.round(exact)
    note = f"int32 bias requantized: at most {np.abs(exact - rounded).max():.2f} of a step off"
    return rounded.astype(np.int32), grid, new_steps, note
