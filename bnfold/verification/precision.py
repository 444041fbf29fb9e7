"""The precision each output of a model, and each site of a rewrite, is computed in, read from
the graph (no onnxruntime): what the tolerance policy judges a tensor by.

Precision comes from the arithmetic performed, not from the types of the tensors on the way: a
float32 output of a GPU model converted with `keep_io_types=True` is computed by float16
convolutions and judged as float16, while a float16 tensor that only passes through (a Cast of
a constant or of a bool mask, and back) computes nothing and narrows nothing. So the precision
of a tensor is the narrowest float type among the inputs and weights of the linear ops it
depends on (Conv, ConvTranspose, Gemm, MatMul), or, with no linear op on the way, among the
inputs of the other ops that compute (not Cast, not ops that only move values).

A tensor wholly on one quantization grid (DequantizeLinear, then only ops that move values
without changing them; a Concat only of inputs on the same grid) is judged in steps of that
grid, a per-axis grid in each channel's own step.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.graph.protos import ONNX_DOMAINS, int_attr
from bnfold.io.view import inferred_types
from bnfold.verification.tolerance import Precision

# Float types from the narrowest significand to the widest (bfloat16 keeps 8 bits, float16 11).
FLOAT_ORDER = {
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.DOUBLE: "float64",
}
LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops that move or select values without computing new ones: a grid survives them.
VALUE_PRESERVING = (
    "Identity", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Concat", "Slice",
    "Gather", "Split", "Relu",
)  # fmt: skip
KEEPS_AXES = ("Identity", "MaxPool", "Relu", "Slice")  # …and leave every axis where it was
# Ops that compute nothing: their input types say nothing about the arithmetic.
NOT_ARITHMETIC = (*VALUE_PRESERVING, "Cast", "CastLike", "Constant", "Shape", "Size", "Expand", "Tile", "Pad")


class Precisions:
    """The precision of any tensor of one model (its structure is enough: no tensor data is read
    but the scales of DequantizeLinear nodes)."""

    def __init__(self, model: onnx.ModelProto, types: dict[str, int] | None = None, arrays: dict | None = None):
        """`arrays`: the large initializers' values when `model` is a skeleton (bnfold.io.view.weights_apart)."""
        self.graph = model.graph
        self.types = types if types is not None else value_types(model)
        self.producer = {name: node for node in self.graph.node for name in node.output if name}
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.arrays = arrays or {}

    def of_output(self, name: str) -> Precision:
        """A graph output's precision: its grid, or the arithmetic it depends on."""
        own = FLOAT_ORDER.get(self.types.get(name, 0))
        grid = self.grid(name)
        if grid is not None:
            step, axis, quantizer = grid
            shown = f"{float(np.max(step)):.3g}" if np.ndim(step) == 0 else f"{np.min(step):.3g}–{np.max(step):.3g}"
            return Precision(
                own or "float32",
                f"on the grid of {quantizer} (step {shown}{', per channel' if axis is not None else ''})",
                step,
                axis,
            )
        return self.arithmetic(name)

    def arithmetic(self, name: str, within: set[int] | None = None) -> Precision:
        """The precision `name` is computed in: the narrowest float type among the inputs of the
        linear ops it depends on (or of its other computing ops, without linear ones). With
        `within` (ids of nodes), only those nodes count, and only their part of the graph is
        walked."""
        own_type = self.types.get(name, 0)
        own = FLOAT_ORDER.get(own_type)
        if own is None:
            return Precision(own or "", "not a float tensor")
        nodes = [n for n in self._ancestors(name, within) if n.domain in ONNX_DOMAINS]
        linear = [n for n in nodes if n.op_type in LINEAR_OPS]
        computing = linear or [n for n in nodes if n.op_type not in NOT_ARITHMETIC]
        floats = [self.types[i] for n in computing for i in n.input if self.types.get(i) in FLOAT_ORDER]
        if not floats:
            return Precision(own, own)
        narrowest = min(floats, key=list(FLOAT_ORDER).index)
        if list(FLOAT_ORDER).index(narrowest) >= list(FLOAT_ORDER).index(own_type):
            return Precision(own, own)
        kind = FLOAT_ORDER[narrowest]
        if linear:
            narrow = [n for n in linear if any(self.types.get(i) == narrowest for i in n.input[:2])]
            return Precision(kind, f"{kind} inside: {len(narrow)} of {len(linear)} linear ops compute in {kind}")
        return Precision(kind, f"{kind} inside: computed by {kind} arithmetic")

    def grid(self, name: str, axis_kept: bool = True):
        """(step, axis, which quantizer) when `name` lies wholly on one DequantizeLinear grid
        with constant scales; `axis` is the channel axis of a per-axis grid (None: one step)."""
        node = self.producer.get(name)
        keeps = axis_kept
        while node is not None and node.op_type in VALUE_PRESERVING and node.input:
            if node.op_type == "Concat":
                grids = [self.grid(i, keeps) for i in node.input if i]
                if any(g is None or g[1] is not None for g in grids) or len({float(g[0]) for g in grids}) != 1:
                    return None  # a Concat wholly on one grid, or judged as floats
                return grids[0]
            keeps = keeps and node.op_type in KEEPS_AXES
            node = self.producer.get(node.input[0])
        if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 2:
            return None
        scale = self.arrays.get(node.input[1])
        if scale is None and node.input[1] in self.initializers:
            scale = numpy_helper.to_array(self.initializers[node.input[1]])
        if scale is None:
            return None
        steps = np.abs(np.asarray(scale, dtype=np.float64))
        if not steps.size or np.any(steps <= 0):
            return None
        label = _quantizer_label(node, self.producer.get(node.input[0]))
        if steps.size == 1:
            return float(steps.reshape(())), None, label
        if not keeps or steps.ndim != 1:
            return None  # a per-axis grid whose channels moved: judged as floats
        return steps, int_attr(node, "axis", 1), label

    def _ancestors(self, name: str, within: set[int] | None) -> list[onnx.NodeProto]:
        """Every node `name` depends on (within the main graph, and within `within`)."""
        seen, nodes, pending = {name}, [], [name]
        visited: set[int] = set()
        while pending:
            node = self.producer.get(pending.pop())
            if node is None or id(node) in visited or (within is not None and id(node) not in within):
                continue
            visited.add(id(node))
            nodes.append(node)
            for parent in node.input:
                if parent and parent not in seen:
                    seen.add(parent)
                    pending.append(parent)
        return nodes


def _quantizer_label(dequantize: onnx.NodeProto, source: onnx.NodeProto | None) -> str:
    """Name the QuantizeLinear that made the grid when there is one, else the DequantizeLinear."""
    node, op = (
        (source, "QuantizeLinear")
        if source is not None and source.op_type == "QuantizeLinear"
        else (dequantize, "DequantizeLinear")
    )
    return f"{op} '{node.name}'" if node.name else op


def output_precisions(model: onnx.ModelProto) -> dict[str, Precision]:
    """Precision of every graph output of `model`."""
    precisions = Precisions(model)
    return {output.name: precisions.of_output(output.name) for output in model.graph.output}


def narrower(one: Precision, other: Precision) -> Precision:
    """Of two models' precisions for one tensor, the one a comparison between them is judged by:
    the narrower float type (the first on a tie)."""
    rank = {kind: i for i, kind in enumerate(FLOAT_ORDER.values())}
    return other if rank.get(other.dtype, len(rank)) < rank.get(one.dtype, len(rank)) else one


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor name: declared, inferred (no data needed), initializers."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    for name, value in inferred_types(model).items():
        if value.HasField("tensor_type"):
            types[name] = value.tensor_type.elem_type
    for node in model.graph.node:  # Constant nodes' outputs, which inference may leave untyped
        if node.op_type == "Constant" and node.output and node.output[0] not in types:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                types[node.output[0]] = value.data_type
    return types


def widen_floats(model: onnx.ModelProto, to: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """The same model with every narrower float tensor and type widened to `to` (exactly:
    float16 and bfloat16 fit in float32, float32 in float64)."""
    narrow = {
        TensorProto.FLOAT: {TensorProto.FLOAT16, TensorProto.BFLOAT16},
        TensorProto.DOUBLE: {TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT},
    }[to]
    wide_dtype = helper.tensor_dtype_to_np_dtype(to)
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    graph = wide.graph
    for tensor in graph.initializer:
        if tensor.data_type in narrow:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(wide_dtype), tensor.name))
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type in narrow:
            value.type.tensor_type.elem_type = to
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type in narrow:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(wide_dtype)))
            if attr.name == "to" and attr.i in narrow:
                attr.i = to
    return wide
