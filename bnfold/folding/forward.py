"""A BatchNormalization whose producer cannot absorb it folds into the one op it feeds:
linear(BN(x)) → linear'(x) (pre-activation networks, a BN on the network's input).

Whole only when every output reads the shift of every tap. Conv and Gemm take it
(affine.fold_input_affine): W'[o, i] = W[o, i]·s_i, b'_o = b_o + Σ W[o, i]·t_i; so does a 2-D
MatMul (a Gemm without C; it becomes one). A Conv that pads its input takes the scale only: a
padded border reads 0, not s·0 + t, but s·x + t = s·(x + t/s) and zero padding commutes with the
scale, so Conv(pad(s·x + t); W) = Conv(pad(x + t/s); W·s) exactly, and the BN becomes the Add
of t/s in front of the Conv (every s ≠ 0). A
ConvTranspose takes it when every output position receives every tap: stride 1, no
output_padding, and pads that crop (kernel − 1)·dilation from each border; then
W'[i] = W[i]·s_i and b'_o = b_o + Σ_i Σ_k W[i, o, k]·t_i within each group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.folding import affine
from bnfold.folding.checks import call_site_attributes
from bnfold.folding.correction import InputMoments, batch_norm_input_moments, rounding_note
from bnfold.folding.linear import LinearOp, become_shift, cast_conv, cast_folded, give_parameters, linear_op
from bnfold.folding.plan import Plan, Skip
from bnfold.folding.shape_ops import SHAPE_OPS, axis_after
from bnfold.folding.sources import read_batch_norm
from bnfold.graph.context import GraphContext
from bnfold.graph.protos import ONNX_DOMAINS, float_attr, int_attr, ints_attr, node_label, str_attr

FORWARD_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


@dataclass(frozen=True)
class ForwardPlan(Plan):
    source: onnx.NodeProto  # the BN
    op: LinearOp
    linear: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray
    shape_ops: tuple[onnx.NodeProto, ...] = ()  # between the BN and the linear op, in order
    rounding: str | None = None  # how a 16-bit weight's second rounding was chosen
    shift: np.ndarray | None = None  # a padded Conv: what stays of the BN, as an Add (t/s)

    @property
    def linears(self):
        return (self.linear,)

    @property
    def forward(self) -> bool:
        return True

    @property
    def via(self) -> str | None:
        parts = ["through " + ", ".join(node_label(n) for n in self.shape_ops)] if self.shape_ops else []
        if self.shift is not None:
            parts.append("its shift is a new Add before the padding")
        return "; ".join(parts) or None

    def rewrite(self, ctx: GraphContext) -> None:
        give_parameters(ctx, self.op, self.linear, self.source, self.weight, self.bias)
        if self.shift is not None:
            become_shift(ctx, self.source, self.shift)
            return
        ctx.index.remove_node(self.source)
        ctx.index.set_input(self.shape_ops[0] if self.shape_ops else self.linear, 0, self.source.input[0])


def plan_forward(bn: onnx.NodeProto, ctx: GraphContext) -> ForwardPlan | Skip:
    """Fold `bn` into the one linear op that reads it as its data input, directly or through
    shape-only ops that carry its channel axis whole to the op's input channel axis."""
    out = bn.output[0]
    readers = ctx.index.readers(out)
    if out in ctx.index.graph_outputs:
        return Skip("its output is a graph output")
    if len(readers) != 1:
        return Skip(f"it feeds {len(readers)} nodes")
    consumer, shape_ops, axis = readers[0], [], 1
    while consumer.domain in ONNX_DOMAINS and consumer.op_type in SHAPE_OPS and consumer.input[0] == out:
        axis = axis_after(consumer, axis, ctx)
        readers = ctx.index.readers(consumer.output[0])
        if axis is None or consumer.output[0] in ctx.index.graph_outputs or len(readers) != 1:
            return Skip(f"{node_label(consumer)} after it does not carry its channel axis, whole, to one linear op")
        shape_ops.append(consumer)
        out, consumer = consumer.output[0], readers[0]
    if axis != 1:
        return Skip(f"its channels reach {node_label(consumer)} on axis {axis}, not the input channel axis 1")
    op = linear_op(consumer)
    if op is None or op.op_type not in FORWARD_OPS:
        after = ctx.index.readers(consumer.output[0]) if consumer.output else ()
        if len(after) == 1 and after[0].op_type in FORWARD_OPS:
            return Skip(f"{node_label(consumer)} stands between it and {node_label(after[0])}")
        return Skip(f"it feeds {node_label(consumer)}, not a Conv, ConvTranspose, Gemm or MatMul")
    if list(consumer.input).count(out) != 1 or consumer.input[0] != out:
        return Skip(f"{node_label(consumer)} after it reads it as a parameter")
    bound = call_site_attributes(bn, consumer)
    if bound:
        return bound
    if op.op_type == "Gemm" and int_attr(consumer, "transA", 0):
        return Skip(f"{node_label(consumer)} after it transposes its input (transA=1)")
    params = op.check_node(consumer, ctx) or op.parameters(consumer, ctx)
    if isinstance(params, Skip):
        return params
    moments = None
    if op.op_type == "Conv" and _pads(consumer, params[0]):
        folded = _scale_into_padded_conv(bn, consumer, op, *params, ctx)
        if isinstance(folded, Skip):
            return folded
        rounding = rounding_note(params[0].dtype, None, ctx.scope.bias_correction)
        return ForwardPlan(bn, op, consumer, *folded[:2], tuple(shape_ops), rounding, shift=folded[2])
    if op.op_type == "Conv":
        moments = batch_norm_input_moments(ctx, bn, params[0].dtype)
        folded = _into_conv(bn, consumer, op, *params, ctx, moments)
    else:
        folded = _BUILDS[op.op_type](bn, consumer, op, *params, ctx)
    if isinstance(folded, Skip):
        return folded
    rounding = rounding_note(params[0].dtype, moments, op.op_type == "Conv" and ctx.scope.bias_correction)
    return ForwardPlan(bn, op, consumer, *folded, tuple(shape_ops), rounding)


def _pads(conv: onnx.NodeProto, weight: np.ndarray) -> bool:
    """Whether the Conv reads zeros beyond its input's border."""
    auto_pad = str_attr(conv, "auto_pad", "NOTSET")
    return any(ints_attr(conv, "pads") or []) or (auto_pad.startswith("SAME") and any(k > 1 for k in weight.shape[2:]))


def _scale_into_padded_conv(bn, conv, op, weight, bias, ctx):
    """(W·s on the input channels, b, t/s): the BN's scale into a Conv that pads its input, its
    shift moved in front of the padding (module docstring)."""
    group = op.groups(conv)
    if bias is not None and (bad := op.check_bias(bias, weight.shape[0])):
        return bad
    rank = ctx.shapes.rank(bn.input[0])
    if rank is None or rank < 2:
        return Skip(f"{node_label(conv)} after it pads its input, and the rank of the BN's input is not known")
    scale_shift = read_batch_norm(bn, ctx, weight.shape[1] * group)
    if isinstance(scale_shift, Skip):
        return scale_shift
    scale, shift = (np.asarray(v, np.float64) for v in scale_shift)
    if not scale.all():
        return Skip(
            f"{node_label(conv)} after it pads its input, and a channel's scale is 0, so its shift cannot move "
            "in front of the padding"
        )
    new_weight, new_bias = affine.fold_input_affine(weight, bias, scale, np.zeros_like(shift), group=group)
    folded = cast_folded(weight.dtype, new_weight, new_bias, op.weight_axis(conv))
    if isinstance(folded, Skip):
        return folded
    with np.errstate(over="ignore"):  # the Conv's input, so the BN's output, has the weight's type
        moved = (shift / scale).astype(weight.dtype).reshape((-1,) + (1,) * (rank - 2))
    if not np.isfinite(affine.float_operand(moved)).all():
        return Skip(f"the BN's shift over its scale overflows {weight.dtype}")
    return (*folded, moved)


def _into_conv(bn, conv, op, weight, bias, ctx, moments: InputMoments | None):
    group = op.groups(conv)
    if bias is not None and (bad := op.check_bias(bias, weight.shape[0])):
        return bad
    scale_shift = read_batch_norm(bn, ctx, weight.shape[1] * group)
    if isinstance(scale_shift, Skip):
        return scale_shift
    new_weight, new_bias = affine.fold_input_affine(weight, bias, *scale_shift, group=group)
    return cast_conv(weight.dtype, new_weight, new_bias, group, moments)


def _into_conv_transpose(bn, deconv, op, weight, bias, ctx):
    group = op.groups(deconv)
    kernel = weight.shape[2:]
    dilations = ints_attr(deconv, "dilations") or [1] * len(kernel)
    pads = ints_attr(deconv, "pads") or [0] * (2 * len(kernel))
    strides = ints_attr(deconv, "strides") or [1] * len(kernel)
    auto_pad = str_attr(deconv, "auto_pad", "NOTSET")
    reach = [d * (k - 1) for d, k in zip(dilations, kernel)]
    every_tap = (
        all(pads[a] >= reach[a] and pads[len(kernel) + a] >= reach[a] for a in range(len(kernel)))
        and auto_pad == "NOTSET"
    )
    if any(s != 1 for s in strides) or any(ints_attr(deconv, "output_padding") or []) or not every_tap:
        return Skip(
            f"{node_label(deconv)} after it has border outputs that miss some taps (stride, output_padding or "
            "too little cropping), so the shift is not one bias"
        )
    out_channels = op.output_channels(weight, deconv)
    if bias is not None and (bad := op.check_bias(bias, out_channels)):
        return bad
    scale_shift = read_batch_norm(bn, ctx, weight.shape[0])
    if isinstance(scale_shift, Skip):
        return scale_shift
    new_weight, new_bias = affine.fold_input_affine_transposed(weight, bias, *scale_shift, group=group)
    return cast_folded(weight.dtype, new_weight, new_bias, op.weight_axis(deconv))


def _into_gemm(bn, gemm, op, weight, bias, ctx):
    axis = op.weight_axis(gemm)  # the N axis; K is the other one
    if bias is not None:
        if bad := op.check_bias(bias, weight.shape[axis]):
            return bad
        bias = bias.astype(np.float64) * op.bias_scale(gemm)
    scale_shift = read_batch_norm(bn, ctx, weight.shape[1 - axis])
    if isinstance(scale_shift, Skip):
        return scale_shift
    # In [N, K] layout B is a k-less conv weight: output n reads input channel k.
    n_by_k = weight if axis == 0 else weight.T
    folded, shift_term = affine.fold_input_affine(n_by_k, None, *scale_shift)
    new_weight = folded if axis == 0 else folded.T
    new_bias = float_attr(gemm, "alpha", 1.0) * shift_term + (0.0 if bias is None else bias)
    return cast_folded(weight.dtype, new_weight, new_bias, axis)


# the input-side fold of each op but Conv, which also takes the rounding statistics (above);
# a 2-D MatMul is a Gemm without C, and becomes one
_BUILDS = {"ConvTranspose": _into_conv_transpose, "Gemm": _into_gemm, "MatMul": _into_gemm}
