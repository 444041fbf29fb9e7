"""The linear ops a per-channel affine map folds into: their weight layout, their geometry, and
both sides of their algebra (the formulas are affine.py's; each op says which applies how).

Output channel c of each is computed by one slice of its weight:
- Conv: weight [C_out, C_in/group, k…], output channels on axis 0.
- ConvTranspose: weight [C_in, C_out/group, k…], output channels on axis 1 within each group.
- Gemm: Y = α·A·B + β·C, B [K, N] (transB=0: channels on axis 1) or [N, K] (transB=1: axis 0).
- MatMul with a 2-D input and a constant [K, N] B: a Gemm without C, rewritten as one.

An affine map on the output folds the same way into each (`fold_output_affine`: W·s on the
output-channel axis); one on the input by the op's own `fold_input`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.folding import affine
from bnfold.folding.correction import InputMoments
from bnfold.folding.plan import Refused, Skip, refuse_if
from bnfold.folding.sources import ChannelAffine, float_constant
from bnfold.graph.context import GraphContext
from bnfold.graph.protos import ONNX_DOMAINS, float_attr, int_attr, ints_attr, node_label, set_float_attr, str_attr


@dataclass(frozen=True)
class ConvGeometry:
    """Where a Conv's or ConvTranspose's kernel reads, with `auto_pad` resolved once."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...] | None  # begins, then ends; None: auto_pad SAME at a stride, sized by the input
    output_padding: tuple[int, ...]  # ConvTranspose's (zeros for Conv)
    auto_pad: str

    @property
    def pads_input(self) -> bool:
        """Whether the op reads zeros beyond its input's border."""
        return self.pads is None or any(self.pads)


class LinearOp:
    """The layout of one linear op's parameters; subclasses override what differs."""

    op_type: str

    def weight_axis(self, node: onnx.NodeProto) -> int:
        """The weight axis that runs over output channels (within a group)."""
        raise NotImplementedError

    def groups(self, node: onnx.NodeProto) -> int:
        """The op's group count (its `group` attribute; 1 for Gemm and MatMul)."""
        return int_attr(node, "group", 1)

    def output_blocks(self, node: onnx.NodeProto) -> int:
        """How many blocks the weight's output-channel axis holds (ConvTranspose: one per group;
        a Conv's axis 0 runs over every output channel, whatever the group)."""
        return 1

    def output_rank(self, weight: np.ndarray) -> int:
        return weight.ndim

    def check_node(self, node: onnx.NodeProto, ctx: GraphContext) -> Skip | None:
        """Preconditions on the op itself, before its parameters are read."""
        return None

    def check_weight(self, weight: np.ndarray, node: onnx.NodeProto) -> Skip | None:
        return None

    def check_bias(self, bias: np.ndarray, channels: int) -> Skip | None:
        if bias.shape != (channels,):
            return Skip(f"{self.op_type} bias has shape {list(bias.shape)}, expected [{channels}]")
        return None

    def output_channels(self, weight: np.ndarray, node: onnx.NodeProto) -> int:
        return weight.shape[self.weight_axis(node)] * self.output_blocks(node)

    def input_channels(self, weight: np.ndarray, node: onnx.NodeProto) -> int:
        raise NotImplementedError

    def bias_scale(self, node: onnx.NodeProto) -> float:
        """What the op multiplies its bias input by (Gemm's β; 1 for convs)."""
        return 1.0

    def after_bias_rewrite(self, node: onnx.NodeProto) -> None:
        """Attribute changes the folded bias needs (Gemm: β = 1)."""

    def geometry(self, node: onnx.NodeProto, weight: np.ndarray) -> ConvGeometry:
        """Where the kernel reads (a Gemm or MatMul: nowhere beyond its input, no padding);
        Refused for a window bnfold does not read."""
        return ConvGeometry((), (), (), (), (), "NOTSET")

    corrects_rounding = False  # a 16-bit fold can be corrected with the moments of its input (Conv)
    dense = False  # reads a 2-D input's features on axis 1 (Gemm, MatMul), not channels of a map

    def check_input_fold(self, node: onnx.NodeProto, weight: np.ndarray, geometry: ConvGeometry) -> Skip | None:
        """Why an affine map on the op's input cannot become one weight and bias, or None."""
        return None

    def reads_zeros(self, node: onnx.NodeProto, weight: np.ndarray, geometry: ConvGeometry) -> str | None:
        """Where the op reads zeros for part of its input, the shift of an affine map on its
        input cannot pass (its scale still can, the shift staying as an Add of t/s in front):
        what the op does there, for the report ("pads its input"); None when it reads its input
        whole."""
        return None

    def fold_input(
        self, node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None, scale_shift: ChannelAffine
    ) -> tuple[np.ndarray, np.ndarray]:
        """op(s·x + t) as op'(x): the float64 weight and bias (the bias input's scale included)."""
        raise NotImplementedError

    def cast(
        self, node: onnx.NodeProto, dtype, weight64: np.ndarray, bias64: np.ndarray, moments: InputMoments | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """A folded float64 weight and bias in `dtype` (cast_folded: sum-preserving per output
        channel); Refused if they overflow it."""
        return cast_folded(dtype, weight64, bias64, self.weight_axis(node))

    def parameters(self, node: onnx.NodeProto, ctx: GraphContext) -> tuple[np.ndarray, np.ndarray | None]:
        """(weight, bias or None) if both are constant and sane, else Refused (the op's own
        checks, check_node, first)."""
        refuse_if(self.check_node(node, ctx))
        weight = float_constant(ctx, node.input[1] if len(node.input) > 1 else "", f"{self.op_type} weight")
        refuse_if(self.check_weight(weight, node))
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = float_constant(ctx, node.input[2], f"{self.op_type} bias")
        return weight, bias


class _Convolution(LinearOp):
    """What Conv and ConvTranspose share: a weight of rank 3 or more, the window attributes."""

    def check_weight(self, weight, node):
        if weight.ndim < 3:
            return Skip(f"{self.op_type} weight has rank {weight.ndim}; it needs rank 3 or more")
        return None

    def geometry(self, node, weight):
        kernel = tuple(weight.shape[2:])
        spatial = len(kernel)
        strides = tuple(ints_attr(node, "strides") or (1,) * spatial)
        dilations = tuple(ints_attr(node, "dilations") or (1,) * spatial)
        output_padding = tuple(ints_attr(node, "output_padding") or (0,) * spatial)
        auto_pad = str_attr(node, "auto_pad", "NOTSET")
        if auto_pad == "NOTSET":
            pads = tuple(ints_attr(node, "pads") or (0,) * (2 * spatial))
        elif auto_pad == "VALID":
            pads = (0,) * (2 * spatial)
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = self._same_pads(kernel, strides, dilations, auto_pad)
        else:
            raise Refused(f"{node_label(node)} has auto_pad={auto_pad}")
        return ConvGeometry(kernel, strides, dilations, pads, output_padding, auto_pad)

    def _same_pads(self, kernel, strides, dilations, auto_pad) -> tuple[int, ...] | None:
        """A Conv's SAME pads: the reach d·(k − 1) split with the odd one at the end for
        SAME_UPPER; at a stride > 1 they depend on the input's size (None), unless every kernel
        is 1 wide."""
        totals = [d * (k - 1) for d, k in zip(dilations, kernel)]
        if not any(totals):
            return (0,) * (2 * len(kernel))
        if any(s != 1 for s in strides):
            return None
        begins = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
        return tuple(begins) + tuple(t - b for t, b in zip(totals, begins))


class Conv(_Convolution):
    """Conv weight [C_out, C_in/group, k…]: output channels on axis 0, whatever the group."""

    op_type = "Conv"

    def weight_axis(self, node):
        return 0

    def input_channels(self, weight, node):
        return weight.shape[1] * self.groups(node)

    def check_weight(self, weight, node):
        if weight.ndim < 3:
            return Skip(f"Conv weight has rank {weight.ndim}; a Conv weight has rank 3 or more")
        return None

    corrects_rounding = True

    def reads_zeros(self, node, weight, geometry):
        return "pads its input" if geometry.pads_input else None

    def fold_input(self, node, weight, bias, scale_shift):
        return affine.fold_input_affine(weight, bias, *scale_shift, group=self.groups(node))

    def cast(self, node, dtype, weight64, bias64, moments):
        return cast_conv(dtype, weight64, bias64, self.groups(node), moments)


class ConvTranspose(_Convolution):
    """ConvTranspose weight [C_in, C_out/group, k…]: output channel g·(C_out/group) + j is column
    j of group g's block of rows, so the scale goes on axis 1 per group."""

    op_type = "ConvTranspose"

    def weight_axis(self, node):
        return 1

    def output_blocks(self, node):
        return self.groups(node)

    def input_channels(self, weight, node):
        return weight.shape[0]

    def check_weight(self, weight, node):
        if bad := super().check_weight(weight, node):
            return bad
        if weight.shape[0] % self.groups(node):
            return Skip(f"ConvTranspose weight has {weight.shape[0]} input channels, not divisible by group")
        return None

    def _same_pads(self, kernel, strides, dilations, auto_pad):
        return None  # a ConvTranspose's SAME pads follow from its output shape

    def check_input_fold(self, node, weight, geometry):
        if self.reads_zeros(node, weight, geometry):
            return Skip(
                f"{node_label(node)} after it has border outputs that miss some taps (stride, output_padding or "
                "too little cropping), so the shift is not one bias"
            )
        return None

    def reads_zeros(self, node, weight, geometry):
        """The input's shift is one bias only where every output position receives every tap:
        stride 1, no output_padding, and pads that crop (k − 1)·dilation from each border."""
        spatial, pads = len(geometry.kernel), geometry.pads
        reach = [d * (k - 1) for d, k in zip(geometry.dilations, geometry.kernel)]
        every_tap = (
            geometry.auto_pad == "NOTSET"
            and pads is not None
            and all(pads[a] >= reach[a] and pads[spatial + a] >= reach[a] for a in range(spatial))
        )
        if any(s != 1 for s in geometry.strides) or any(geometry.output_padding) or not every_tap:
            return "has border outputs that miss some taps"
        return None

    def fold_input(self, node, weight, bias, scale_shift):
        return affine.fold_input_affine_transposed(weight, bias, *scale_shift, group=self.groups(node))


class Gemm(LinearOp):
    """Gemm: Y = α·A·B + β·C with a constant B; C may be missing or broadcast."""

    op_type = "Gemm"
    dense = True

    def weight_axis(self, node):
        return 0 if int_attr(node, "transB", 0) else 1

    def input_channels(self, weight, node):
        return weight.shape[1 - self.weight_axis(node)]

    def output_rank(self, weight):
        return 2

    def check_weight(self, weight, node):
        if weight.ndim != 2:
            return Skip(f"Gemm B has rank {weight.ndim}, not 2")
        return None

    def bias_scale(self, node):
        return float_attr(node, "beta", 1.0)

    def check_bias(self, bias, channels):
        if bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, channels)):
            return Skip(f"Gemm C of shape {list(bias.shape)} does not broadcast to [M, {channels}]")
        return None

    def after_bias_rewrite(self, node):
        set_float_attr(node, "beta", 1.0)

    def check_input_fold(self, node, weight, geometry):
        if int_attr(node, "transA", 0):
            return Skip(f"{node_label(node)} after it transposes its input (transA=1)")
        return None

    def fold_input(self, node, weight, bias, scale_shift):
        """α·(A·s + t)·B + β·C = α·A·(s·B) + (α·t·B + β·C): in [N, K] layout B is a k-less conv
        weight (output n reads input channel k), so affine.fold_input_affine applies."""
        axis = self.weight_axis(node)
        n_by_k = weight if axis == 0 else weight.T
        folded, shift_term = affine.fold_input_affine(n_by_k, None, *scale_shift)
        beta_c = 0.0 if bias is None else bias.astype(np.float64) * self.bias_scale(node)
        return (folded if axis == 0 else folded.T), float_attr(node, "alpha", 1.0) * shift_term + beta_c


class MatMul(Gemm):
    """MatMul(A, B) with a constant B [K, N] and a 2-D A is a Gemm without C (transB = 0, α = β
    = 1); the fold turns it into one, C being the folded bias. With a higher-rank A the BN's
    channel axis 1 is not the MatMul's output axis, and the fold is refused."""

    op_type = "MatMul"

    def check_node(self, node, ctx):
        rank = ctx.shapes.rank(node.input[0])
        if rank != 2:
            known = f"has rank {rank}" if rank is not None else "has a rank bnfold cannot infer"
            return Skip(f"{node_label(node)}'s input {known}; only a 2-D MatMul becomes a Gemm")
        return None

    def check_weight(self, weight, node):
        if weight.ndim != 2:
            return Skip(f"MatMul B has rank {weight.ndim}, not 2")
        return None

    def after_bias_rewrite(self, node):
        node.op_type = "Gemm"  # MatMul has no attributes; Gemm's defaults are α = β = 1


LINEAR_OPS = {op.op_type: op for op in (Conv(), ConvTranspose(), Gemm(), MatMul())}


def linear_op(node: onnx.NodeProto | None) -> LinearOp | None:
    """The layout of `node` if it is a linear op bnfold folds into."""
    if node is None or node.domain not in ONNX_DOMAINS:
        return None
    return LINEAR_OPS.get(node.op_type)


def output_parameters(
    op: LinearOp, node: onnx.NodeProto, ctx: GraphContext
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(weight, bias or None, output channels) of a linear op about to absorb an affine map
    on its output, every check on the op and its parameters passed; else Refused."""
    weight, bias = op.parameters(node, ctx)
    channels = op.output_channels(weight, node)
    if bias is not None:
        refuse_if(op.check_bias(bias, channels))
    return weight, bias, channels


def fold_output_affine(
    op: LinearOp,
    node: onnx.NodeProto,
    weight: np.ndarray,
    bias: np.ndarray | None,
    scale_shift: ChannelAffine,
    moments: InputMoments | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """affine(op(x)) as op'(x): W' = W·s on the output-channel axis, b' = β_op·b·s + t, in the
    weight's dtype (affine.py's algebra); Refused if they overflow it. With `moments` of a
    Conv's input channels, a 16-bit result is rounded to keep the expected effect of its
    rounding small (bnfold.folding.correction)."""
    scale, shift = scale_shift
    scaled = affine.scale_weights(
        weight, scale, axis=op.weight_axis(node), group=op.output_blocks(node), dtype=affine.product_dtype(weight.dtype)
    )
    if bias is not None:
        bias = bias.astype(np.float64) * op.bias_scale(node)
    new_bias = affine.fold_bias(bias, scale, shift)
    return op.cast(node, weight.dtype, scaled, new_bias, moments)


def cast_conv(
    dtype, weight64: np.ndarray, bias64: np.ndarray, group: int, moments: InputMoments | None
) -> tuple[np.ndarray, np.ndarray]:
    """A Conv's folded or merged float64 weight [C_out, C_in/group, k…] and bias in `dtype`:
    rounded with its input's `moments` when they are known (bias correction), else as
    cast_folded rounds; Refused if they overflow it."""
    if moments is None:
        return cast_folded(dtype, weight64, bias64, 0)
    rounded = affine.cast_conv_toward_moments(weight64, bias64, dtype, group, moments.mean, moments.var)
    return cast_folded(dtype, weight64, bias64, 0, *rounded)


def cast_folded(
    dtype, weight64: np.ndarray, bias64: np.ndarray, axis: int, weight=None, bias=None
) -> tuple[np.ndarray, np.ndarray]:
    """The folded float64 weight and bias in the model's dtype; Refused if they overflow it
    (`weight`, `bias`: already cast, when the caller chose their rounding)."""
    weight = affine.cast_weights(weight64, dtype, axis) if weight is None else weight
    with np.errstate(over="ignore"):  # overflow is checked just below
        bias = bias64.astype(dtype) if bias is None else bias
    for what, values in (("weights", weight), ("bias", bias)):
        if not np.isfinite(affine.float_operand(values)).all():
            raise Refused(f"the folded {what} overflow {dtype}")
    return weight, bias
