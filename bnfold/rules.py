"""Fold rules: BatchNormalization into the linear op that feeds it.

A rule is *match* (the op pair), *check* (every precondition; the first that fails becomes the
`Skip` reason the user reads) and *rewrite* (move tensors and edges through the GraphIndex).
The arithmetic lives in `bnfold.affine`; a rule only says which weight axis holds the output
channels.

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

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx

from bnfold import affine
from bnfold.graph import GraphIndex, NotConstant, is_onnx_op, node_label

DEFAULT_EPSILON = float(np.float32(1e-5))
FLOAT_DTYPES = {np.dtype(t) for t in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)}
BN_PARAMETERS = ("scale", "bias", "mean", "var")  # inputs 1..4, in the spec's order


@dataclass(frozen=True)
class Skip:
    """Why a BatchNormalization stays: one sentence for the report."""

    reason: str


@dataclass(frozen=True)
class FoldPlan:
    """Everything a rewrite needs, computed and checked before the graph is touched."""

    rule: LinearBatchNormRule
    bn: onnx.NodeProto
    linear: onnx.NodeProto
    weight: np.ndarray  # folded, in the weight's own dtype
    bias: np.ndarray  # folded, in the weight's dtype (Conv's B shares type T with W)


def batch_norm_version(opset: int) -> int:
    """The BatchNormalization version in force at an ai.onnx opset (1, 6, 7, 9, 14 or 15)."""
    return onnx.defs.get_schema("BatchNormalization", opset).since_version


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return attr.i
    return default


def _epsilon(bn: onnx.NodeProto) -> float:
    for attr in bn.attribute:
        if attr.name == "epsilon":
            return float(attr.f)
    return DEFAULT_EPSILON


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


def read_batch_norm(
    bn: onnx.NodeProto, index: GraphIndex, channels: int
) -> tuple[np.ndarray, np.ndarray] | Skip:
    """BN's (scale s, shift t) in float64, if its parameters are constant, [C]-shaped and sane."""
    if len(bn.input) != 5:
        return Skip(f"it has {len(bn.input)} inputs; BatchNormalization takes 5")
    params = []
    for role, name in zip(BN_PARAMETERS, bn.input[1:]):
        value = _constant(index, name, f"BatchNormalization {role}")
        if isinstance(value, Skip):
            return value
        if value.shape != (channels,):
            return Skip(
                f"BatchNormalization {role} '{name}' has shape {list(value.shape)}, "
                f"but the producer has {channels} output channels"
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


class LinearBatchNormRule:
    """Fold `Linear → BatchNormalization` into `Linear`. Subclasses name the op and its weight
    layout; the preconditions and the rewrite are shared."""

    op_type: str
    weight_channel_axis: int  # the weight axis that runs over output channels (within a group)

    def groups(self, node: onnx.NodeProto) -> int:
        """How many groups split the channel axis (1: it runs over all output channels)."""
        return 1

    def check_weight(self, weight: np.ndarray, node: onnx.NodeProto) -> Skip | None:
        return None

    def output_channels(self, weight: np.ndarray, node: onnx.NodeProto) -> int:
        return weight.shape[self.weight_channel_axis] * self.groups(node)

    def check(self, bn: onnx.NodeProto, linear: onnx.NodeProto, index: GraphIndex) -> FoldPlan | Skip:
        linear_out = linear.output[0]
        if linear_out in index.graph_outputs:
            return Skip(f"{node_label(linear)} output '{linear_out}' is also a graph output")
        others = [r for r in index.readers(linear_out) if r is not bn]
        if others:
            names = ", ".join(node_label(r) for r in others[:3])
            return Skip(f"{node_label(linear)} output also feeds {names}")
        weight = _constant(index, linear.input[1] if len(linear.input) > 1 else "", f"{self.op_type} weight")
        if isinstance(weight, Skip):
            return weight
        bad_weight = self.check_weight(weight, linear)
        if bad_weight:
            return bad_weight
        channels = self.output_channels(weight, linear)
        bias_name = linear.input[2] if len(linear.input) > 2 else ""
        bias = None
        if bias_name:
            bias = _constant(index, bias_name, f"{self.op_type} bias")
            if isinstance(bias, Skip):
                return bias
            if bias.shape != (channels,):
                return Skip(f"{self.op_type} bias has shape {list(bias.shape)}, expected [{channels}]")
        affine_map = read_batch_norm(bn, index, channels)
        if isinstance(affine_map, Skip):
            return affine_map
        scale, shift = affine_map
        axis = self.weight_channel_axis
        scaled = affine.scale_weights(weight, scale, axis=axis, group=self.groups(linear))
        new_weight = affine.cast_weights(scaled, weight.dtype, axis)
        with np.errstate(over="ignore"):  # overflow is checked just below
            new_bias = affine.fold_bias(bias, scale, shift).astype(weight.dtype)
        for what, values in (("weights", new_weight), ("bias", new_bias)):
            if not np.isfinite(values.astype(np.float64)).all():
                return Skip(f"the folded {what} overflow {weight.dtype}")
        return FoldPlan(self, bn, linear, new_weight, new_bias)

    @staticmethod
    def rewrite(plan: FoldPlan, index: GraphIndex) -> list[str]:
        """Point the linear op at fresh folded tensors and have it produce the BN's output name,
        so every reader and graph output downstream is untouched. Returns names that may now be
        dead, for one sweep at the end."""
        linear, bn = plan.linear, plan.bn
        old_bias = linear.input[2] if len(linear.input) > 2 else ""
        maybe_dead = [linear.input[1], old_bias, linear.output[0], *bn.input[1:]]
        weight_name = index.add_initializer(plan.weight, f"{linear.input[1]}_bnfold")
        bias_name = index.add_initializer(plan.bias, f"{old_bias or bn.input[2]}_bnfold")
        index.set_input(linear, 1, weight_name)
        index.set_input(linear, 2, bias_name)
        bn_output = bn.output[0]
        index.remove_node(bn)
        index.set_output(linear, 0, bn_output)
        return maybe_dead


class ConvBatchNormRule(LinearBatchNormRule):
    """Conv weight is `[C_out, C_in/group, k…]`: output channels on axis 0, whatever the group."""

    op_type = "Conv"
    weight_channel_axis = 0

    def check_weight(self, weight: np.ndarray, node: onnx.NodeProto) -> Skip | None:
        if weight.ndim < 3:
            return Skip(f"Conv weight has rank {weight.ndim}; a Conv weight has rank 3 or more")
        return None


RULES = {rule.op_type: rule for rule in (ConvBatchNormRule(),)}


def plan_fold(bn: onnx.NodeProto, index: GraphIndex, version: int) -> FoldPlan | Skip:
    """Match the op feeding `bn` to a rule and check every precondition."""
    mode = check_inference_mode(bn, version, index)
    if mode:
        return mode
    source = bn.input[0]
    producer = index.producer(source)
    if producer is None:
        kind = "a graph input" if source in index.graph_inputs else "not produced by any node"
        return Skip(f"its input '{source}' is {kind}; nothing to fold into")
    rule = RULES.get(producer.op_type) if producer.domain in ("", "ai.onnx") else None
    if rule is None:
        supported = ", ".join(sorted(RULES))
        return Skip(f"its input comes from {node_label(producer)}; bnfold folds into {supported}")
    return rule.check(bn, producer, index)
