"""A tensor as an element-wise function of one other tensor, whatever ops an exporter wrote it
with: GELU as Div → Erf → Add → Mul → Mul, SiLU as x·Sigmoid(x), HardSwish, Mish, ReLU6 as
Clip, or one Relu. `single_source` finds the function and evaluates it on values of its source
(bnfold.folding.correction integrates it over a normal distribution per channel).

Constants may be scalars or one value per channel ([C, 1, …] or [1, C, 1, …]); everything is
float64 on arrays of shape [C, n] (channel, sample).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.graph.constants import NotConstant
from bnfold.graph.context import GraphContext
from bnfold.graph.protos import ONNX_DOMAINS, float_attr, node_label

MAX_NODES = 24  # a longer element-wise chain is not an activation


def _erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz & Stegun 7.1.26 (error ≤ 1.5e-7): numpy has no erf, math.erf is scalar."""
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-(x**2)))


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _gelu(node, z):
    if next((a.s for a in node.attribute if a.name == "approximate"), b"none") == b"tanh":
        return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))
    return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))


def _clip(node, z, low=None, high=None):
    low = float_attr(node, "min", -np.inf) if low is None else low
    high = float_attr(node, "max", np.inf) if high is None else high
    return np.clip(z, low, high)


UNARY: dict[str, Callable] = {
    "Relu": lambda node, z: np.maximum(z, 0.0),
    "LeakyRelu": lambda node, z: np.where(z > 0, z, float_attr(node, "alpha", 0.01) * z),
    "Sigmoid": lambda node, z: _sigmoid(z),
    "Tanh": lambda node, z: np.tanh(z),
    "HardSigmoid": lambda node, z: np.clip(
        float_attr(node, "alpha", 0.2) * z + float_attr(node, "beta", 0.5), 0.0, 1.0
    ),
    "HardSwish": lambda node, z: z * np.clip(z / 6.0 + 0.5, 0.0, 1.0),
    "Erf": lambda node, z: _erf(z),
    "Exp": lambda node, z: np.exp(z),
    "Log": lambda node, z: np.log(z),
    "Neg": lambda node, z: -z,
    "Abs": lambda node, z: np.abs(z),
    "Sqrt": lambda node, z: np.sqrt(z),
    "Reciprocal": lambda node, z: 1.0 / z,
    "Softplus": lambda node, z: np.logaddexp(0.0, z),
    "Softsign": lambda node, z: z / (1.0 + np.abs(z)),
    "Elu": lambda node, z: np.where(z > 0, z, float_attr(node, "alpha", 1.0) * np.expm1(z)),
    "Selu": lambda node, z: (
        float_attr(node, "gamma", 1.0507009873554805)
        * np.where(z > 0, z, float_attr(node, "alpha", 1.6732632423543772) * np.expm1(z))
    ),
    "Celu": lambda node, z: (
        np.maximum(z, 0.0)
        + np.minimum(0.0, float_attr(node, "alpha", 1.0) * np.expm1(z / float_attr(node, "alpha", 1.0)))
    ),
    "Mish": lambda node, z: z * np.tanh(np.logaddexp(0.0, z)),
    "Gelu": _gelu,
    "Identity": lambda node, z: z,
    "Dropout": lambda node, z: z,  # inference: the identity
}
VARIADIC: dict[str, Callable] = {
    "Add": lambda node, a, b: a + b,
    "Sub": lambda node, a, b: a - b,
    "Mul": lambda node, a, b: a * b,
    "Div": lambda node, a, b: a / b,
    "Pow": lambda node, a, b: np.power(a, b),
    "Max": lambda node, *args: np.maximum.reduce(np.broadcast_arrays(*args)),
    "Min": lambda node, *args: np.minimum.reduce(np.broadcast_arrays(*args)),
    "Clip": _clip,
}


@dataclass(frozen=True)
class Chain:
    """`target` = f(`source`), computed by `nodes` (element-wise, in no particular order)."""

    target: str
    source: str
    nodes: dict  # output name → node

    def describe(self) -> str:
        last = self.nodes[self.target]
        more = len(self.nodes) - 1
        return node_label(last) + (f" and {more} more element-wise op{'s' if more > 1 else ''}" if more else "")

    def evaluate(self, ctx: GraphContext, values: np.ndarray) -> np.ndarray | None:
        """f(values) for values of the source, shape [C, n]; None if a constant does not
        broadcast per channel."""
        memo: dict[str, np.ndarray | None] = {self.source: values}

        def value(name: str):
            if name not in memo:
                memo[name] = (
                    _compute(self.nodes[name], value)
                    if name in self.nodes
                    else _channel_constant(ctx, name, values.shape[0])
                )
            return memo[name]

        with np.errstate(all="ignore"):
            return value(self.target)


def single_source(ctx: GraphContext, name: str) -> Chain | None:
    """The element-wise chain that computes `name` from one other tensor, if there is one
    (constants aside) of at most MAX_NODES ops; None otherwise."""
    nodes, leaves, stack = {}, set(), [name]
    while stack:
        tensor = stack.pop()
        if tensor in nodes or tensor in leaves or not tensor:
            continue
        node = ctx.index.producer(tensor)
        if node is None or not _pointwise(node) or tensor != node.output[0] or _joins(ctx, node):
            leaves.add(tensor)
            continue
        if _is_constant(ctx, tensor):
            continue
        nodes[tensor] = node
        if len(nodes) > MAX_NODES:
            return None
        stack.extend(node.input)
    sources = [t for t in leaves if not _is_constant(ctx, t)]
    if name not in nodes or len(sources) != 1:
        return None
    return Chain(name, sources[0], nodes)


def _joins(ctx: GraphContext, node: onnx.NodeProto) -> bool:
    """An Add or Sub of two different computed tensors joins two paths (a residual
    connection): it ends a chain; its statistics are the sum's (bnfold.folding.correction)."""
    return (
        node.op_type in ("Add", "Sub")
        and len(set(node.input)) == 2
        and not any(_is_constant(ctx, name) for name in node.input)
    )


def _pointwise(node: onnx.NodeProto) -> bool:
    return node.domain in ONNX_DOMAINS and (node.op_type in UNARY or node.op_type in VARIADIC)


def _is_constant(ctx: GraphContext, name: str) -> bool:
    try:
        ctx.constant(name)
    except (NotConstant, TypeError, ValueError):
        return False
    return True


def _compute(node: onnx.NodeProto, value: Callable) -> np.ndarray | None:
    if node.op_type in UNARY:
        z = value(node.input[0])
        return None if z is None else UNARY[node.op_type](node, z)
    args = [value(name) if name else None for name in node.input]
    if node.op_type == "Clip":
        return None if args[0] is None else _clip(node, *args)
    if any(a is None for a in args):
        return None
    return VARIADIC[node.op_type](node, *args)


def _channel_constant(ctx: GraphContext, name: str, channels: int) -> np.ndarray | None:
    """A constant as a [C, 1] array (or a scalar), if it is one value or one per channel."""
    try:
        value = np.asarray(ctx.constant(name), dtype=np.float64)
    except (NotConstant, TypeError, ValueError):
        return None
    if value.size == 1:
        return value.reshape(())
    # [C, 1, 1] or [1, C, 1, 1]: one value per channel, broadcast over the spatial axes
    if value.ndim >= 3 and value.shape[-2:] == (1, 1) and [d for d in value.shape if d != 1] == [channels]:
        return value.reshape(channels, 1)
    return None
