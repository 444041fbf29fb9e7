"""Fold rules: a per-channel affine map folded into the linear op next to it.

A per-channel affine map y = s·x + t along axis 1 (the channel axis) comes from
- BatchNormalization in inference mode, or
- Mul / Add / Sub / Div by a constant that broadcasts per channel: the decomposed BN of
  FrozenBatchNorm2d exports and Keras-style `(x − m)/(std + eps)·γ + β`, or a plain bias Add
  after a bias-less conv.

It folds into a linear op whose output channel c is computed by one slice of its weight:
- Conv: weight [C_out, C_in/group, k…], output channels on axis 0.
- ConvTranspose: weight [C_in, C_out/group, k…], output channels on axis 1 within each group.
- Gemm: Y = α·A·B + β·C, B [K, N] (transB=0: channels on axis 1) or [N, K] (transB=1: axis 0).
- MatMul with a 2-D input and a constant [K, N] B: a Gemm without C, rewritten as one.

A rule is *match* (which ops), *check* (every precondition; the first that fails is the `Skip`
reason the user reads) and *rewrite* (tensors and edges moved through the GraphIndex). The
arithmetic lives in `bnfold.affine`.

Backward fold, the usual case: affine(linear(x)) → linear'(x); inference no-ops between them
(Identity, Dropout) are looked through and removed. Forward fold, for a BatchNormalization whose
producer is not foldable (pre-activation nets): linear(BN(x)) → linear'(x), exact only when the
linear op does not pad: a padded border reads 0, and 0 is not s·0 + t.

BatchNormalization versions (ONNX operator changelog) and what makes one use batch statistics:
- 1 and 6: `is_test=0` (the default!) is training mode; `spatial=0` is per-activation.
- 7: `is_test` removed; declaring the mean/var/saved outputs is the training-mode form.
- 9: `spatial` removed.
- 14, 15: `training_mode=1`; extra outputs are only valid in training mode. 15 lets scale and
  bias (T1) and mean and var (T2) have types other than X's.
`epsilon` defaults to 1e-5 in every version; it is a float32 attribute, and the runtime adds that
float32 value, so the fold uses it exactly as stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx

from bnfold import affine
from bnfold.graph import GraphIndex, NotConstant, is_onnx_op, node_label

DEFAULT_EPSILON = float(np.float32(1e-5))
FLOAT_DTYPES = {np.dtype(t) for t in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)}
BN_PARAMETERS = ("scale", "bias", "mean", "var")  # inputs 1..4, in the spec's order
ELEMENTWISE_AFFINE = ("Mul", "Add", "Sub", "Div")
# Normalizations whose statistics come from each input at run time: no fixed affine map exists.
RUNTIME_NORMALIZATIONS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization")


@dataclass(frozen=True)
class Skip:
    """Why a node stays: one sentence for the report."""

    reason: str


RUNTIME_STATISTICS = Skip("it normalizes with statistics of each input, computed at run time: never folded")


@dataclass(frozen=True)
class FoldPlan:
    """Everything a rewrite needs, computed and checked before the graph is touched."""

    rule: LinearRule
    source: onnx.NodeProto  # the BN or Mul/Add/Sub/Div that disappears
    linear: onnx.NodeProto  # the op that absorbs it
    weight: np.ndarray  # folded, in the weight's own dtype
    bias: np.ndarray  # folded, in the weight's dtype (Conv's B and Gemm's C share W's type)
    passthrough: tuple[onnx.NodeProto, ...] = ()  # no-ops between them, removed with the source
    forward: bool = False  # the source feeds the linear op (BN → Conv), not the other way
    via = None  # every plan says what it folded into (`linears`) and through what (`via`)

    @property
    def linears(self) -> tuple[onnx.NodeProto, ...]:
        return (self.linear,)

    def rewrite(self, index: GraphIndex) -> list[str]:
        return self.rule.rewrite(self, index)


# ---- the affine map ----------------------------------------------------------------------------
def batch_norm_version(opset: int) -> int:
    """The BatchNormalization version in force at an ai.onnx opset (1, 6, 7, 9, 14 or 15)."""
    return onnx.defs.get_schema("BatchNormalization", opset).since_version


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _float_attr(node: onnx.NodeProto, name: str, default: float) -> float:
    return next((float(a.f) for a in node.attribute if a.name == name), default)


def _epsilon(bn: onnx.NodeProto) -> float:
    return _float_attr(bn, "epsilon", DEFAULT_EPSILON)


def check_inference_mode(bn: onnx.NodeProto, version: int, index: GraphIndex) -> Skip | None:
    """A BN folds only if it normalizes with its stored statistics (see the module docstring)."""
    if version >= 14 and _int_attr(bn, "training_mode", 0) != 0:
        return Skip("training_mode=1: it normalizes with batch statistics")
    if version < 7 and _int_attr(bn, "is_test", 0) == 0:
        return Skip(f"is_test=0 means training mode in BatchNormalization-{version}")
    if version < 9 and _int_attr(bn, "spatial", 1) == 0:
        return Skip("spatial=0: statistics are per activation, not per channel")
    extra = [name for name in bn.output[1:] if name]
    used = [name for name in extra if index.is_used(name)]
    if used:
        return Skip(f"its statistics output '{used[0]}' is used, so it runs in training mode")
    if extra:
        return Skip(f"it declares statistics outputs ({', '.join(extra)}): the training-mode form")
    if len(bn.input) != 5:
        return Skip(f"it has {len(bn.input)} inputs; BatchNormalization takes 5")
    return None


def _constant(index: GraphIndex, name: str, role: str) -> np.ndarray | Skip:
    if not name:
        return Skip(f"{role} is missing")
    try:
        value = index.constant_value(name)
    except NotConstant as why:
        return Skip(f"{role} is not constant: {why}")
    if value.dtype not in FLOAT_DTYPES:
        return Skip(f"{role} '{name}' has dtype {value.dtype}, not a float type")
    return value


def read_batch_norm(bn: onnx.NodeProto, index: GraphIndex, channels: int) -> tuple[np.ndarray, np.ndarray] | Skip:
    """BN's (scale s, shift t) in float64, if its parameters are constant, [C]-shaped and sane."""
    params = []
    for role, name in zip(BN_PARAMETERS, bn.input[1:]):
        value = _constant(index, name, f"BatchNormalization {role}")
        if isinstance(value, Skip):
            return value
        if value.shape != (channels,):
            return Skip(
                f"BatchNormalization {role} '{name}' has shape {list(value.shape)}, "
                f"but the {channels}-channel op next to it needs [{channels}]"
            )
        if not np.isfinite(value.astype(np.float64)).all():
            return Skip(f"BatchNormalization {role} '{name}' holds NaN or Inf")
        params.append(value)
    gamma, beta, mean, var = params
    epsilon = _epsilon(bn)
    denominator = var.astype(np.float64) + epsilon
    if not (denominator > 0).all():
        bad = int((denominator <= 0).sum())
        return Skip(f"variance + epsilon is not positive in {bad} of {channels} channels")
    return affine.fold_scale_shift(gamma, beta, mean, var, epsilon)


def read_elementwise(
    node: onnx.NodeProto, data: str, index: GraphIndex, channels: int, rank: int
) -> tuple[np.ndarray, np.ndarray] | Skip:
    """(s, t) of `data ∘ c` for a Mul/Add/Sub/Div by a per-channel constant c."""
    position = list(node.input).index(data)
    other = node.input[1 - position]
    if other == data:
        return Skip(f"{node_label(node)} combines the tensor with itself")
    value = _constant(index, other, f"{node.op_type} operand")
    if isinstance(value, Skip):
        return value
    vector = affine.channel_vector(value, rank, channels)
    if vector is None or not np.isfinite(vector).all():
        return Skip(
            f"{node.op_type} operand '{other}' of shape {list(value.shape)} is not one finite value per channel"
        )
    ones, zeros = np.ones(channels), np.zeros(channels)
    if node.op_type == "Mul":
        return vector, zeros
    if node.op_type == "Add":
        return ones, vector
    if node.op_type == "Sub":
        return (ones, -vector) if position == 0 else (-ones, vector)
    if position == 1:
        return Skip("a constant divided by the tensor is not affine")
    if not vector.all():
        return Skip(f"Div operand '{other}' is zero in some channel")
    return 1.0 / vector, zeros


# ---- the linear ops ----------------------------------------------------------------------------
class LinearRule:
    """A linear op that absorbs a per-channel affine map on its output (backward) or, where it
    says so, on its input (forward). Subclasses describe the weight layout."""

    op_type: str
    forward_ok = False  # may a BN feeding this op fold into it?

    def weight_axis(self, node: onnx.NodeProto) -> int:
        """The weight axis that runs over output channels (within a group)."""
        raise NotImplementedError

    def groups(self, node: onnx.NodeProto) -> int:
        return 1

    def output_rank(self, weight: np.ndarray) -> int:
        return weight.ndim

    def check_weight(self, weight: np.ndarray, node: onnx.NodeProto) -> Skip | None:
        return None

    def check_node(self, node: onnx.NodeProto, index: GraphIndex) -> Skip | None:
        """Preconditions on the op itself, before its parameters are read."""
        return None

    def output_channels(self, weight: np.ndarray, node: onnx.NodeProto) -> int:
        return weight.shape[self.weight_axis(node)] * self.groups(node)

    def bias_scale(self, node: onnx.NodeProto) -> float:
        """What the op multiplies its bias input by (Gemm's β; 1 for convs)."""
        return 1.0

    def parameters(self, node: onnx.NodeProto, index: GraphIndex):
        """(weight, bias or None) if both are constant and sane, else Skip."""
        weight = _constant(index, node.input[1] if len(node.input) > 1 else "", f"{self.op_type} weight")
        if isinstance(weight, Skip):
            return weight
        bad = self.check_weight(weight, node)
        if bad:
            return bad
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = _constant(index, node.input[2], f"{self.op_type} bias")
            if isinstance(bias, Skip):
                return bias
        return weight, bias

    def check_bias(self, bias: np.ndarray, channels: int) -> Skip | None:
        if bias.shape != (channels,):
            return Skip(f"{self.op_type} bias has shape {list(bias.shape)}, expected [{channels}]")
        return None

    # -- backward: affine(linear(x)) --------------------------------------------------------------
    def plan_backward(self, source, data, linear, passthrough, index, read_affine) -> FoldPlan | Skip:
        params = self.check_node(linear, index) or self.parameters(linear, index)
        if isinstance(params, Skip):
            return params
        weight, bias = params
        channels = self.output_channels(weight, linear)
        if bias is not None:
            bad = self.check_bias(bias, channels)
            if bad:
                return bad
        scale_shift = read_affine(source, data, index, channels, self.output_rank(weight))
        if isinstance(scale_shift, Skip):
            return scale_shift
        scale, shift = scale_shift
        axis = self.weight_axis(linear)
        scaled = affine.scale_weights(
            weight, scale, axis=axis, group=self.groups(linear), dtype=affine.product_dtype(weight.dtype)
        )
        if bias is not None:
            bias = bias.astype(np.float64) * self.bias_scale(linear)
        new_bias = affine.fold_bias(bias, scale, shift)
        return self._plan(source, linear, weight, scaled, new_bias, passthrough, forward=False)

    # -- forward: linear(BN(x)) -------------------------------------------------------------------
    def plan_forward(self, bn: onnx.NodeProto, linear: onnx.NodeProto, index: GraphIndex) -> FoldPlan | Skip:
        raise NotImplementedError

    def _plan(self, source, linear, weight, new_weight64, new_bias64, passthrough, forward) -> FoldPlan | Skip:
        cast = _cast_folded(weight.dtype, new_weight64, new_bias64, self.weight_axis(linear))
        if isinstance(cast, Skip):
            return cast
        return FoldPlan(self, source, linear, *cast, tuple(passthrough), forward)

    def rewrite(self, plan: FoldPlan, index: GraphIndex) -> list[str]:
        """Give the linear op its folded tensors and cut the source out: backward, the linear
        op produces the source's output name, so every reader and graph output downstream is
        untouched; forward, it reads the source's input. Returns names that may now be dead,
        for one sweep at the end."""
        linear, source = plan.linear, plan.source
        maybe_dead = [*self.replace_parameters(plan, index), *source.input, *source.output]
        for node in plan.passthrough:
            maybe_dead += [*node.input, *node.output]
        for node in (source, *plan.passthrough):
            index.remove_node(node)
        if plan.forward:
            index.set_input(linear, 0, source.input[0])
        else:
            maybe_dead.append(linear.output[0])
            index.set_output(linear, 0, source.output[0])
        return maybe_dead

    def replace_parameters(self, plan: FoldPlan, index: GraphIndex) -> list[str]:
        """Point the linear op at fresh initializers holding the folded weight and bias; a tensor
        another node may read is never rewritten in place. Returns the old names."""
        linear, source = plan.linear, plan.source
        old_weight, old_bias = linear.input[1], linear.input[2] if len(linear.input) > 2 else ""
        bias_base = old_bias or (source.input[2] if source.op_type == "BatchNormalization" else old_weight + "_bias")
        index.set_input(linear, 1, index.add_initializer(plan.weight, _folded_name(old_weight)))
        index.set_input(linear, 2, index.add_initializer(plan.bias, _folded_name(bias_base)))
        self.after_bias_rewrite(linear)
        return [old_weight, old_bias]

    def after_bias_rewrite(self, node: onnx.NodeProto) -> None:
        """Attribute changes the folded bias needs (Gemm: β = 1)."""


class ConvRule(LinearRule):
    """Conv weight [C_out, C_in/group, k…]: output channels on axis 0, whatever the group."""

    op_type = "Conv"
    forward_ok = True

    def weight_axis(self, node):
        return 0

    def check_weight(self, weight, node):
        if weight.ndim < 3:
            return Skip(f"Conv weight has rank {weight.ndim}; a Conv weight has rank 3 or more")
        return None

    def plan_forward(self, bn, linear, index):
        params = self.parameters(linear, index)
        if isinstance(params, Skip):
            return params
        weight, bias = params
        group = _int_attr(linear, "group", 1)
        pads = next((list(a.ints) for a in linear.attribute if a.name == "pads"), [])
        auto_pad = next((a.s.decode() for a in linear.attribute if a.name == "auto_pad"), "NOTSET")
        kernel = weight.shape[2:]
        if any(pads) or (auto_pad.startswith("SAME") and any(k > 1 for k in kernel)):
            return Skip(
                f"{node_label(linear)} after it pads its input, "
                "and zero padding of a shifted input is not a shifted zero"
            )
        channels = weight.shape[1] * group
        if bias is not None:
            bad = self.check_bias(bias, weight.shape[0])
            if bad:
                return bad
        scale_shift = read_batch_norm(bn, index, channels)
        if isinstance(scale_shift, Skip):
            return scale_shift
        new_weight, new_bias = affine.fold_input_affine(weight, bias, *scale_shift, group=group)
        return self._plan(bn, linear, weight, new_weight, new_bias, (), forward=True)


class ConvTransposeRule(LinearRule):
    """ConvTranspose weight [C_in, C_out/group, k…]: output channel g·(C_out/group) + j is column
    j of group g's block of rows, so the scale goes on axis 1 per group."""

    op_type = "ConvTranspose"

    def weight_axis(self, node):
        return 1

    def groups(self, node):
        return _int_attr(node, "group", 1)

    def check_weight(self, weight, node):
        if weight.ndim < 3:
            return Skip(f"ConvTranspose weight has rank {weight.ndim}; it needs rank 3 or more")
        if weight.shape[0] % self.groups(node):
            return Skip(f"ConvTranspose weight has {weight.shape[0]} input channels, not divisible by group")
        return None


class GemmRule(LinearRule):
    """Gemm: Y = α·A·B + β·C with a constant B; C may be missing or broadcast."""

    op_type = "Gemm"
    forward_ok = True

    def weight_axis(self, node):
        return 0 if _int_attr(node, "transB", 0) else 1

    def output_rank(self, weight):
        return 2

    def check_weight(self, weight, node):
        if weight.ndim != 2:
            return Skip(f"Gemm B has rank {weight.ndim}, not 2")
        return None

    def bias_scale(self, node):
        return _float_attr(node, "beta", 1.0)

    def check_bias(self, bias, channels):
        if bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, channels)):
            return Skip(f"Gemm C of shape {list(bias.shape)} does not broadcast to [M, {channels}]")
        return None

    def after_bias_rewrite(self, node):
        _set_float_attr(node, "beta", 1.0)

    def plan_forward(self, bn, linear, index):
        if _int_attr(linear, "transA", 0):
            return Skip(f"{node_label(linear)} after it transposes its input (transA=1)")
        params = self.parameters(linear, index)
        if isinstance(params, Skip):
            return params
        weight, bias = params
        axis = self.weight_axis(linear)  # the N axis; K is the other one
        channels = weight.shape[1 - axis]
        if bias is not None:
            bad = self.check_bias(bias, weight.shape[axis])
            if bad:
                return bad
            bias = bias.astype(np.float64) * self.bias_scale(linear)
        scale_shift = read_batch_norm(bn, index, channels)
        if isinstance(scale_shift, Skip):
            return scale_shift
        # In [N, K] layout B is a k-less conv weight: output n reads input channel k.
        n_by_k = weight if axis == 0 else weight.T
        alpha = _float_attr(linear, "alpha", 1.0)
        folded, shift_term = affine.fold_input_affine(n_by_k, None, *scale_shift)
        new_weight = folded if axis == 0 else folded.T
        new_bias = alpha * shift_term + (0.0 if bias is None else bias)
        return self._plan(bn, linear, weight, new_weight, new_bias, (), forward=True)


class MatMulRule(LinearRule):
    """MatMul(A, B) with a constant B [K, N] and a 2-D A is a Gemm without C; the fold turns it
    into one (Gemm, α = β = 1, transB = 0, C = the folded bias). With a higher-rank A the BN's
    channel axis 1 is not the MatMul's output axis, and the fold is refused."""

    op_type = "MatMul"

    def weight_axis(self, node):
        return 1

    def output_rank(self, weight):
        return 2

    def check_node(self, node, index):
        rank = index.rank(node.input[0])
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


def _cast_folded(dtype, weight64: np.ndarray, bias64: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray] | Skip:
    """The folded float64 weight and bias in the model's dtype, or a Skip if they overflow it."""
    weight = affine.cast_weights(weight64, dtype, axis)
    with np.errstate(over="ignore"):  # overflow is checked just below
        bias = bias64.astype(dtype)
    for what, values in (("weights", weight), ("bias", bias)):
        if not np.isfinite(affine.float_operand(values)).all():
            return Skip(f"the folded {what} overflow {dtype}")
    return weight, bias


def _folded_name(name: str) -> str:
    """`W` → `W_bnfold`; a tensor folded again keeps one suffix (`W_bnfold` → `W_bnfold_1`)."""
    return re.sub(r"_bnfold(_\d+)?$", "", name) + "_bnfold"


def _set_float_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    for attr in node.attribute:
        if attr.name == name:
            attr.f = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


RULES = {rule.op_type: rule for rule in (ConvRule(), ConvTransposeRule(), GemmRule(), MatMulRule())}


# ---- matching ----------------------------------------------------------------------------------
def _is_inference_dropout(node: onnx.NodeProto, index: GraphIndex, opset: int) -> bool:
    if not is_onnx_op(node, "Dropout") or any(index.is_used(m) for m in node.output[1:] if m):
        return False
    if opset < 7:
        return _int_attr(node, "is_test", 0) != 0
    if len(node.input) > 2 and node.input[2]:  # Dropout-12: training_mode input
        try:
            return not bool(index.constant_value(node.input[2]))
        except NotConstant:
            return False
    return True


def _find_linear(data: str, index: GraphIndex, opset: int):
    """The node producing `data`, looking through inference no-ops (Identity, Dropout): returns
    (node or None, no-ops in between, or a Skip when a no-op's output is needed elsewhere)."""
    passthrough = []
    node = index.producer(data)
    while node is not None and (is_onnx_op(node, "Identity") or _is_inference_dropout(node, index, opset)):
        out = node.output[0]
        if out in index.graph_outputs or len(index.readers(out)) > 1:
            return node, passthrough, Skip(f"{node_label(node)} in between also feeds other nodes")
        passthrough.append(node)
        node = index.producer(node.input[0])
    return node, passthrough, None


def _call_site_attributes(*nodes: onnx.NodeProto) -> Skip | None:
    """Inside a model-local function an attribute may be bound at each call site
    (`ref_attr_name`): its value is not known here, so nothing depending on it folds."""
    for node in nodes:
        bound = [a.name for a in node.attribute if a.ref_attr_name]
        if bound:
            return Skip(f"{node_label(node)} takes attribute '{bound[0]}' from the function's caller")
    return None


def _single_reader_skip(linear: onnx.NodeProto, reader: onnx.NodeProto, index: GraphIndex) -> Skip | None:
    out = linear.output[0]
    if out in index.graph_outputs:
        return Skip(f"{node_label(linear)} output '{out}' is also a graph output")
    others = [r for r in index.readers(out) if r is not reader]
    if others:
        return Skip(f"{node_label(linear)} output also feeds {', '.join(node_label(r) for r in others[:3])}")
    return None


def plan_backward(
    source: onnx.NodeProto, data: str, index: GraphIndex, opset: int, read_affine, reader: onnx.NodeProto | None = None
) -> FoldPlan | Skip:
    """Fold the affine `source`, applied to tensor `data`, into the linear op producing `data`.
    `reader` is the node that must be the only reader of `data` (default: `source`)."""
    producer, passthrough, blocked = _find_linear(data, index, opset)
    if blocked:
        return blocked
    if producer is None:
        kind = "a graph input" if data in index.graph_inputs else "not produced by any node"
        return Skip(f"its input '{data}' is {kind}; nothing to fold into")
    rule = RULES.get(producer.op_type) if producer.domain in ("", "ai.onnx") else None
    if rule is None:
        return Skip(f"its input comes from {node_label(producer)}; bnfold folds into {', '.join(RULES)}")
    first = passthrough[-1] if passthrough else (reader or source)
    return (
        _call_site_attributes(source, producer, *passthrough)
        or _single_reader_skip(producer, first, index)
        or rule.plan_backward(source, data, producer, passthrough, index, read_affine)
    )


@dataclass(frozen=True)
class ConcatPlan:
    """A BN after a channel Concat, split into one fold per Concat input."""

    bn: onnx.NodeProto
    concat: onnx.NodeProto
    parts: tuple[FoldPlan, ...]
    forward = False

    @property
    def linears(self) -> tuple[onnx.NodeProto, ...]:
        return tuple(part.linear for part in self.parts)

    @property
    def via(self) -> str:
        return f"split at {node_label(self.concat)}"

    def rewrite(self, index: GraphIndex) -> list[str]:
        """Each producer takes its slice of the BN; the Concat takes over the BN's output."""
        maybe_dead = [name for part in self.parts for name in part.rule.replace_parameters(part, index)]
        maybe_dead += [*self.bn.input[1:], self.concat.output[0]]
        index.remove_node(self.bn)
        index.set_output(self.concat, 0, self.bn.output[0])
        return maybe_dead


def plan_concat(bn: onnx.NodeProto, concat: onnx.NodeProto, index: GraphIndex, opset: int) -> ConcatPlan | Skip:
    """BN(Concat_axis1(y_1, …, y_k)) = Concat(BN_1(y_1), …, BN_k(y_k)) with BN_j the slice of
    the BN's parameters for y_j's channels; each BN_j folds into y_j's linear producer."""
    bound = _call_site_attributes(bn, concat)
    if bound:
        return bound
    out = concat.output[0]
    axis = _int_attr(concat, "axis", 0)
    if axis < 0:
        rank = index.rank(out)
        axis = axis + rank if rank is not None else axis
    if axis != 1:
        return Skip(f"its input comes from {node_label(concat)} along axis {axis}, not the channel axis")
    single = _single_reader_skip(concat, bn, index)
    if single:
        return Skip(f"BatchNormalization after Concat: {single.reason}")
    if len(set(concat.input)) != len(concat.input):
        return Skip(f"BatchNormalization after Concat: {node_label(concat)} repeats an input")
    producers = []
    for data in concat.input:
        producer = index.producer(data)
        rule = RULES.get(producer.op_type) if producer is not None and producer.domain in ("", "ai.onnx") else None
        if rule is None:
            what = node_label(producer) if producer is not None else f"'{data}'"
            return Skip(f"BatchNormalization after Concat: input {what} is not a linear op")
        params = rule.check_node(producer, index) or rule.parameters(producer, index)
        if isinstance(params, Skip):
            return Skip(f"BatchNormalization after Concat: {params.reason}")
        producers.append((data, producer, rule.output_channels(params[0], producer)))
    total = sum(channels for _, _, channels in producers)
    scale_shift = read_batch_norm(bn, index, total)
    if isinstance(scale_shift, Skip):
        return scale_shift
    scale, shift = scale_shift
    parts, offset = [], 0
    for data, _producer, channels in producers:
        part_affine = (scale[offset : offset + channels], shift[offset : offset + channels])
        offset += channels
        part = plan_backward(bn, data, index, opset, lambda *args, p=part_affine: p, reader=concat)
        if isinstance(part, Skip):
            return Skip(f"BatchNormalization after Concat: {part.reason}")
        parts.append(part)
    return ConcatPlan(bn, concat, tuple(parts))


SHAPE_OPS = ("Reshape", "Flatten", "Transpose")


@dataclass(frozen=True)
class ChannelLastPlan:
    """A BN over the last axis of MatMul + bias Add (a Linear on tokens), reached through
    shape-only ops: BatchNorm1d over tokens, exported as Reshape/Transpose → BN → back."""

    bn: onnx.NodeProto
    matmul: onnx.NodeProto
    add: onnx.NodeProto
    bias_position: int  # which input of the Add is the bias
    shape_ops: tuple[onnx.NodeProto, ...]  # from the BN's input back towards the Add
    weight: np.ndarray
    bias: np.ndarray
    forward = False

    @property
    def linears(self) -> tuple[onnx.NodeProto, ...]:
        return (self.matmul,)

    @property
    def via(self) -> str:
        return "through " + ", ".join(node_label(n) for n in reversed(self.shape_ops))

    def rewrite(self, index: GraphIndex) -> list[str]:
        """New B and bias for the MatMul and its Add; the shape op the BN read takes over the
        BN's output name."""
        old_weight, old_bias = self.matmul.input[1], self.add.input[self.bias_position]
        index.set_input(self.matmul, 1, index.add_initializer(self.weight, _folded_name(old_weight)))
        index.set_input(self.add, self.bias_position, index.add_initializer(self.bias, _folded_name(old_bias)))
        last = self.shape_ops[0]
        maybe_dead = [old_weight, old_bias, *self.bn.input[1:], last.output[0]]
        index.remove_node(self.bn)
        index.set_output(last, 0, self.bn.output[0])
        return maybe_dead


def _axis_before(node: onnx.NodeProto, axis: int, index: GraphIndex) -> int | None:
    """Which input axis becomes output `axis` of a shape-only op, if it passes through whole."""
    if node.op_type == "Transpose":
        rank = index.rank(node.input[0])
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        perm = perm or (list(reversed(range(rank))) if rank is not None else None)
        return perm[axis] if perm is not None and axis < len(perm) else None
    before, after = index.shape(node.input[0]), index.shape(node.output[0])
    if before is None or after is None or axis != len(after) - 1:
        return None  # Reshape/Flatten: only a last axis that stays the last axis, whole
    return len(before) - 1 if before[-1] is not None and before[-1] == after[-1] else None


def plan_channel_last(bn: onnx.NodeProto, index: GraphIndex) -> ChannelLastPlan | Skip | None:
    """BN(reshape(MatMul(x, B) + c)) where the shape ops carry the MatMul's last axis to the
    BN's channel axis: B' = B·s on its N axis and c' = c·s + t; the BN goes. None when the BN
    is not behind shape-only ops at all."""
    node, reader, axis, shape_ops = index.producer(bn.input[0]), bn, 1, []
    while node is not None and node.domain in ("", "ai.onnx") and node.op_type in SHAPE_OPS:
        blocked = _call_site_attributes(node) or _single_reader_skip(node, reader, index)
        if blocked:
            return blocked
        axis = _axis_before(node, axis, index)
        if axis is None:
            return Skip(f"{node_label(node)} between it and the linear op does not carry the channel axis over whole")
        shape_ops.append(node)
        reader, node = node, index.producer(node.input[0])
    if not shape_ops:
        return None
    data = shape_ops[-1].input[0]
    rank = index.rank(data)
    if node is None or rank is None or axis != rank - 1:
        return None
    if is_onnx_op(node, "MatMul"):
        return Skip(f"{node_label(node)} has no bias Add after it to absorb the BN's shift")
    if not is_onnx_op(node, "Add"):
        return None
    add = node
    matmul_position = next(
        (i for i, name in enumerate(add.input) if (p := index.producer(name)) is not None and is_onnx_op(p, "MatMul")),
        None,
    )
    if matmul_position is None:
        return None
    matmul = index.producer(add.input[matmul_position])
    blocked = (
        _call_site_attributes(bn, add, matmul)
        or _single_reader_skip(add, reader, index)
        or _single_reader_skip(matmul, add, index)
    )
    if blocked:
        return blocked
    weight = _constant(index, matmul.input[1], "MatMul B")
    if isinstance(weight, Skip):
        return weight
    if weight.ndim != 2:
        return Skip(f"MatMul B has rank {weight.ndim}, not 2")
    bias = _constant(index, add.input[1 - matmul_position], "Add bias")
    if isinstance(bias, Skip):
        return bias
    channels = weight.shape[1]
    if bias.ndim > rank or any(d != 1 for d in bias.shape[:-1]) or (bias.ndim and bias.shape[-1] not in (1, channels)):
        return Skip(f"Add bias of shape {list(bias.shape)} is not one value per channel")
    scale_shift = read_batch_norm(bn, index, channels)
    if isinstance(scale_shift, Skip):
        return scale_shift
    scale, shift = scale_shift
    new_weight = affine.scale_weights(weight, scale, axis=1, dtype=affine.product_dtype(weight.dtype))
    new_bias = affine.fold_bias(bias.reshape(-1), scale, shift).reshape((1,) * max(bias.ndim - 1, 0) + (channels,))
    cast = _cast_folded(weight.dtype, new_weight, new_bias, axis=1)
    if isinstance(cast, Skip):
        return cast
    return ChannelLastPlan(bn, matmul, add, 1 - matmul_position, tuple(shape_ops), *cast)


def plan_forward(bn: onnx.NodeProto, index: GraphIndex) -> FoldPlan | Skip | None:
    """Fold `bn` into the one linear op it feeds; None when it feeds no candidate at all."""
    out = bn.output[0]
    readers = index.readers(out)
    if out in index.graph_outputs or len(readers) != 1:
        return None
    consumer = readers[0]
    rule = RULES.get(consumer.op_type) if consumer.domain in ("", "ai.onnx") else None
    if rule is None or not rule.forward_ok:
        return None
    if list(consumer.input).count(out) != 1 or consumer.input[0] != out:
        return Skip(f"{node_label(consumer)} after it reads it as a parameter")
    return _call_site_attributes(bn, consumer) or rule.plan_forward(bn, consumer, index)


def plan_batch_norm(
    bn: onnx.NodeProto, index: GraphIndex, version: int, opset: int
) -> FoldPlan | ConcatPlan | ChannelLastPlan | Skip:
    """Backward into the op that produces its input (split across a channel Concat, or through
    shape-only ops into a Linear on tokens), else forward into the op it feeds."""
    mode = check_inference_mode(bn, version, index)
    if mode:
        return mode
    producer = index.producer(bn.input[0])
    if producer is not None and is_onnx_op(producer, "Concat"):
        return plan_concat(bn, producer, index, opset)

    def read_bn(node, data, index, channels, rank):
        return read_batch_norm(node, index, channels)

    backward = plan_backward(bn, bn.input[0], index, opset, read_bn)
    if isinstance(backward, FoldPlan):
        return backward
    channel_last = plan_channel_last(bn, index)
    if channel_last is not None:  # the BN sits behind shape-only ops: that decides it
        return channel_last
    forward = plan_forward(bn, index) or _why_not_forward(bn, index)
    if isinstance(forward, FoldPlan):
        return forward
    return Skip(f"{backward.reason}; nor forward: {forward.reason}")


def _why_not_forward(bn: onnx.NodeProto, index: GraphIndex) -> Skip:
    """Why a BN that feeds no Conv/Gemm directly cannot fold forward, naming what is between."""
    out = bn.output[0]
    readers = index.readers(out)
    if out in index.graph_outputs:
        return Skip("its output is a graph output")
    if len(readers) != 1:
        return Skip(f"it feeds {len(readers)} nodes")
    reader = readers[0]
    after = index.readers(reader.output[0]) if reader.output else []
    if len(after) == 1 and after[0].op_type in ("Conv", "Gemm"):
        return Skip(f"{node_label(reader)} stands between it and {node_label(after[0])}")
    return Skip(f"it feeds {node_label(reader)}, not a Conv or Gemm")


def plan_elementwise(node: onnx.NodeProto, index: GraphIndex, opset: int) -> FoldPlan | Skip:
    """A Mul/Add/Sub/Div by a per-channel constant, folded into the linear op before it."""
    for data in node.input:
        producer, _, _ = _find_linear(data, index, opset)
        if producer is not None and producer.op_type in RULES and producer.domain in ("", "ai.onnx"):
            return plan_backward(node, data, index, opset, read_elementwise)
    return Skip(f"{node_label(node)} does not follow a linear op")
