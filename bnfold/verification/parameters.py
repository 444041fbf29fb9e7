"""A site's weights against the exact fold of the reference's (the verdict's `parameters` rule).

Where the candidate makes a site with one linear op (Conv, ConvTranspose, Gemm, MatMul) and the
reference makes it with the same op, with the same attributes, on the same input, followed only
by per-channel affine maps of constants (BatchNormalization in inference, Mul, Div, Add, Sub),
the candidate's weights must be the reference's scaled along their output channel: W' = W·s,
s the product of the maps' scales (1 where there are none). W·s is computed here in float64
from the reference's own constants. A correct fold, by any tool, differs from it by the
rounding of the candidate's weight type: a few units of that type's epsilon of the channel's
largest weight. A mistake differs by what it changed: one channel ×1.01 is 10 epsilons of
float16. That decides the sites the numbers cannot: a float16 SE block's (N, C, 1, 1) moves
about as far when its weights are rounded the other way as when one channel is ×1.01.

The bias is not judged here: a 16-bit fold corrects its rounding through the bias on purpose
(bnfold.folding.correction), and the channel rule sees a bias that is off. Anything else (a
weight behind a DequantizeLinear, another op, other attributes, an input the rewrite made)
leaves a site to the other rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx

from bnfold.graph.protos import ONNX_DOMAINS, float_attr, int_attr, node_label
from bnfold.verification.align import constant_values

PARAMETER_FACTOR = 4.0  # a correct fold rounds within this many epsilons of the channel's largest weight
LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
AFFINE = ("BatchNormalization", "Mul", "Div", "Add", "Sub")


@dataclass(frozen=True)
class WeightCheck:
    """The candidate's linear op at a site, and its channel whose weights stand furthest from
    the exact fold: `deviation` in units of the weight type's epsilon of that channel's largest."""

    node: str
    channel: int
    deviation: float
    dtype: str


class _Side:
    """One model's producers and float constants (initializers, large ones in `arrays`, and
    Constant nodes: align.constant_values)."""

    def __init__(self, model: onnx.ModelProto, arrays: dict):
        self.producer = {o: n for n in model.graph.node for o in n.output if o}
        self._values = dict(constant_values(model, arrays))

    def constant(self, name: str) -> np.ndarray | None:
        value = self._values.get(name)  # an array, or bytes standing for what numpy cannot hold
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f" and value.dtype != ml_dtypes.bfloat16:
            return None
        return value


class Weights:
    """The weight checks of one verification's sites, each made when first asked (a site whose
    channels the numbers judge is never asked: ResNet-50's 53 sites would take 0.13 s)."""

    def __init__(self, structure):
        rewrite = structure.rewrite
        self._sites = set(rewrite.sites) if structure.reference is not None and rewrite.candidate is not None else set()
        if self._sites:
            self._ours = _Side(structure.reference, structure.arrays[0])
            self._theirs = _Side(rewrite.candidate, rewrite.arrays)
            nodes = (*rewrite.candidate_nodes, *rewrite.reference_nodes)
            self._rewritten = {o for n in nodes for o in n.output}
        self._checks: dict[str, WeightCheck | None] = {}

    def check(self, site: str) -> WeightCheck | None:
        """The site's weight check, or None where the module's shape does not hold."""
        if site not in self._sites:
            return None
        if site not in self._checks:
            self._checks[site] = _check(site, self._ours, self._theirs, self._rewritten)
        return self._checks[site]


def _check(site: str, ours: _Side, theirs: _Side, rewritten: set[str]) -> WeightCheck | None:
    made = theirs.producer.get(site)
    if made is None or made.domain not in ONNX_DOMAINS or made.op_type not in LINEAR or len(made.input) < 2:
        return None
    got = theirs.constant(made.input[1])
    if got is None or made.input[0] in rewritten:
        return None  # the op's input is the rewrite's own: only the site says what it should be
    layout = _Layout.of(made, got)
    if layout is None:
        return None
    scale = np.ones(layout.channels)
    node, maps = _chain(ours, site)
    for step in maps:
        affine = _affine(step, ours, layout)
        if affine is None:
            return None
        scale = scale * affine[0]
    if node is None or not _same_op(node, made) or node.input[0] != made.input[0]:
        return None
    weight = ours.constant(node.input[1])
    if weight is None or weight.shape != got.shape or not np.isfinite(scale).all():
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        exact = layout.by_channel(weight.astype(np.float64)) * scale[:, None]
        given = layout.by_channel(got.astype(np.float64))
    if not (np.isfinite(exact).all() and np.isfinite(given).all()):
        return None
    info = ml_dtypes.finfo(got.dtype)
    largest = np.abs(exact).max(axis=1, initial=0.0)
    off = np.abs(given - exact).max(axis=1, initial=0.0)
    deviation = (off - float(info.smallest_subnormal)).clip(0) / (
        float(info.eps) * largest + float(info.smallest_subnormal)
    )
    worst = int(deviation.argmax()) if deviation.size else 0
    return WeightCheck(node_label(made), worst, float(deviation[worst]) if deviation.size else 0.0, str(got.dtype))


@dataclass(frozen=True)
class _Layout:
    """Where a linear op's output channel (axis 1 of its output, the last for MatMul) lies in
    its weight."""

    op: str
    channels: int
    rank: int | None  # of the op's output; None when not known (MatMul)
    groups: int = 1
    transposed: bool = False  # Gemm's transB

    @staticmethod
    def of(node: onnx.NodeProto, weight: np.ndarray) -> _Layout | None:
        if node.op_type == "Conv" and weight.ndim >= 3:
            return _Layout("Conv", weight.shape[0], weight.ndim)
        if node.op_type == "ConvTranspose" and weight.ndim >= 3:
            groups = int_attr(node, "group", 1)
            if groups < 1 or weight.shape[0] % groups:
                return None
            return _Layout("ConvTranspose", weight.shape[1] * groups, weight.ndim, groups)
        if node.op_type == "Gemm" and weight.ndim == 2:
            transposed = bool(int_attr(node, "transB", 0))
            return _Layout("Gemm", weight.shape[0] if transposed else weight.shape[1], 2, transposed=transposed)
        if node.op_type == "MatMul" and weight.ndim == 2:
            return _Layout("MatMul", weight.shape[1], None)
        return None

    def by_channel(self, weight: np.ndarray) -> np.ndarray:
        """The weight as (channels, everything else)."""
        if self.op == "Conv" or self.op == "Gemm" and self.transposed:
            return weight.reshape(self.channels, -1)
        if self.op == "ConvTranspose":  # [C_in, C_out/group, k…]: output channel g·(C_out/group) + j
            per_group = self.channels // self.groups
            grouped = weight.reshape(self.groups, weight.shape[0] // self.groups, per_group, -1)
            return np.moveaxis(grouped, 2, 1).reshape(self.channels, -1)
        return weight.T  # Gemm without transB, MatMul: [K, N]

    def per_channel(self, value: np.ndarray) -> np.ndarray | None:
        """A constant operand of an element-wise op as one value per output channel, or None when
        it varies along another axis (or would broadcast the output to another shape)."""
        shape = list(value.shape)
        if self.rank is None:  # MatMul: along the last axis, ones before it
            axis, rank = len(shape) - 1, max(len(shape), 1)
        else:
            axis, rank = 1, self.rank
            if len(shape) > rank:
                return None
            shape = [1] * (rank - len(shape)) + shape
        if any(size != 1 for i, size in enumerate(shape) if i != axis):
            return None
        along = shape[axis] if 0 <= axis < len(shape) else 1
        if along not in (1, self.channels):
            return None
        flat = value.astype(np.float64).reshape(-1)
        return np.broadcast_to(flat if along == self.channels else flat[:1], (self.channels,))


def _affine(node: onnx.NodeProto, side: _Side, layout: _Layout) -> tuple[np.ndarray, np.ndarray] | None:
    """A per-channel affine map y = scale·x + shift of the op's output: (scale, |shift|), one
    value per channel; None when `node` is not such a map of its non-constant input."""
    ones = np.ones(layout.channels)
    if node.op_type == "BatchNormalization":
        if layout.rank is None or int_attr(node, "training_mode", 0) or any(o for o in node.output[1:]):
            return None
        values = [side.constant(n) for n in node.input[1:5]]
        if len(values) != 4 or any(v is None or v.shape != (layout.channels,) for v in values):
            return None
        gamma, beta, mean, variance = (v.astype(np.float64) for v in values)
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = gamma / np.sqrt(variance + float_attr(node, "epsilon", 1e-5))
        return scale, np.abs(mean * scale) + np.abs(beta)
    if len(node.input) != 2:
        return None
    constants = [side.constant(n) for n in node.input]
    if (constants[0] is None) == (constants[1] is None):
        return None
    slot = 0 if constants[0] is not None else 1
    value = layout.per_channel(constants[slot])
    if value is None:
        return None
    if node.op_type == "Mul":
        return value, np.zeros(layout.channels)
    if node.op_type == "Div":
        return (1.0 / value, np.zeros(layout.channels)) if slot == 1 and (value != 0).all() else None
    return (-ones if node.op_type == "Sub" and slot == 0 else ones), np.abs(value)  # Add, x − k, k − x


def _same_op(node: onnx.NodeProto, other: onnx.NodeProto) -> bool:
    def attributes(n):
        return sorted(a.SerializeToString(deterministic=True) for a in n.attribute)

    return (
        node.op_type == other.op_type
        and node.domain in ONNX_DOMAINS
        and other.domain in ONNX_DOMAINS
        and attributes(node) == attributes(other)
    )


def bias_terms(model: onnx.ModelProto, arrays: dict, sites) -> dict[str, np.ndarray]:
    """Per channel of each site, the magnitudes of the terms its bias sums where the reference
    makes it with a linear op of constant weights followed by affine maps (|b·s| + |μ·s| + |β|
    for Conv → BN): a fold that computes the bias in the tensor's own type, step by step, errs
    by a few of that type's units of this, however small the sum (β − μ·s can cancel to 1e-4).
    Sites not made that way are left out."""
    side = _Side(model, arrays)
    found = {site: _bias_terms(side, site) for site in sites}
    return {site: terms for site, terms in found.items() if terms is not None}


def _chain(side: _Side, site: str) -> tuple[onnx.NodeProto | None, list[onnx.NodeProto]]:
    """The node before the affine maps that make `site`, and those maps, the site's own first."""
    maps, node = [], side.producer.get(site)
    while node is not None and node.domain in ONNX_DOMAINS and node.op_type in AFFINE:
        maps.append(node)
        node = side.producer.get(node.input[0] if node.op_type == "BatchNormalization" else _data_input(node, side))
    return node, maps


def _bias_terms(side: _Side, site: str) -> np.ndarray | None:
    node, maps = _chain(side, site)
    if node is None or node.domain not in ONNX_DOMAINS or node.op_type not in LINEAR or len(node.input) < 2:
        return None
    weight = side.constant(node.input[1])
    layout = None if weight is None else _Layout.of(node, weight)
    if layout is None:
        return None
    bias = side.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    terms = np.zeros(layout.channels) if bias is None else np.abs(bias.astype(np.float64)).reshape(-1)
    if terms.shape != (layout.channels,):
        return None
    for step in reversed(maps):  # from the linear op to the site: |b'| ≤ |scale|·|b| + |shift|
        affine = _affine(step, side, layout)
        if affine is None:
            return None
        terms = terms * np.abs(affine[0]) + affine[1]
    return terms if np.isfinite(terms).all() else None


def _data_input(node: onnx.NodeProto, side: _Side) -> str:
    """The input of an element-wise op by a constant that is not the constant."""
    if len(node.input) != 2:
        return ""
    return node.input[1] if side.constant(node.input[0]) is not None else node.input[0]
