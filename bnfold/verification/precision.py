"""The precision each output of a model is computed in, read from the reference graph (no
onnxruntime): what the tolerance policy judges an output by.

A float32 output may be computed through float16 arithmetic (a GPU model converted with
`keep_io_types=True`: float16 weights and activations, Casts at the inputs and outputs). An
output is as precise as the narrowest float type on any path to it, so that type sets its
tolerance, not the output's own dtype. An output read off a quantization grid
(QuantizeLinear → DequantizeLinear, then only ops that move values without changing them) is
judged in steps of that grid.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.graph.protos import ONNX_DOMAINS
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


def output_precisions(model: onnx.ModelProto) -> dict[str, Precision]:
    """Precision of every graph output of `model` (its structure is enough: no tensor data is
    read but the scales of QuantizeLinear nodes)."""
    graph = model.graph
    types = _value_types(model)
    producer = {name: node for node in graph.node for name in node.output if name}
    initializers = {t.name: t for t in graph.initializer}
    precisions = {}
    for output in graph.output:
        ancestors, nodes = _ancestors(output.name, producer)
        floats = [types[n] for n in ancestors if types.get(n) in FLOAT_ORDER]
        own = FLOAT_ORDER.get(output.type.tensor_type.elem_type)
        grid = _grid_step(output.name, producer, initializers)
        if grid is not None:
            step, quantizer = grid
            precisions[output.name] = Precision(
                own or "float32", f"quantized: on the grid of {quantizer} (step {step:.3g})", step
            )
            continue
        if not floats or own is None:
            precisions[output.name] = Precision(own or "", own or "not a float output")
            continue
        narrowest = min(floats, key=list(FLOAT_ORDER).index)
        name = FLOAT_ORDER[narrowest]
        if name == own or list(FLOAT_ORDER).index(narrowest) > list(FLOAT_ORDER).index(
            output.type.tensor_type.elem_type
        ):
            precisions[output.name] = Precision(own, own)
            continue
        linear = [n for n in nodes if n.op_type in LINEAR_OPS and n.domain in ONNX_DOMAINS]
        narrow = [n for n in linear if types.get(n.input[0] if n.input else "") == narrowest]
        why = f"{name} inside: {len(narrow)} of {len(linear)} linear ops compute in {name}"
        if not linear:
            why = f"{name} inside: a {name} tensor lies on its path"
        precisions[output.name] = Precision(name, why)
    return precisions


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor name: declared, inferred (no data needed), initializers."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception:  # a type we cannot infer is a type we do not narrow by
        inferred = model.graph
    types = {t.name: t.data_type for t in model.graph.initializer}
    for value in (*inferred.input, *inferred.value_info, *inferred.output):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    return types


def _ancestors(name: str, producer: dict) -> tuple[set[str], list[onnx.NodeProto]]:
    """Every tensor and node `name` depends on (within the main graph)."""
    seen, nodes, pending = {name}, [], [name]
    visited: set[int] = set()
    while pending:
        node = producer.get(pending.pop())
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        nodes.append(node)
        for parent in node.input:
            if parent and parent not in seen:
                seen.add(parent)
                pending.append(parent)
    return seen, nodes


def _grid_step(name: str, producer: dict, initializers: dict) -> tuple[float, str] | None:
    """(step, which QuantizeLinear) when `name` is a DequantizeLinear output, possibly moved by
    value-preserving ops, whose QuantizeLinear has a constant scale."""
    node = producer.get(name)
    while node is not None and node.op_type in VALUE_PRESERVING and node.input:
        node = producer.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 2:
        return None
    scale = initializers.get(node.input[1])
    quantizer = producer.get(node.input[0])
    if scale is None or quantizer is None or quantizer.op_type != "QuantizeLinear":
        return None
    step = float(np.max(np.abs(numpy_helper.to_array(scale))))
    label = f"QuantizeLinear '{quantizer.name}'" if quantizer.name else "QuantizeLinear"
    return (step, label) if step > 0 else None


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


def with_one_more_rounding(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """The model widened to float32 (`widen_floats`), with every float16 and bfloat16
    initializer moved by a random fraction of its own rounding step, uniform in ±½ ulp: the
    same function with one more rounding of its weights, which is what a fold of a narrow model
    adds (W·s is rounded to the weight's type again). How far this moves the outputs is the
    narrow model's own noise (bnfold.verification.noise); on CPU, where onnxruntime computes
    float16 convolutions in float32, it is nearly all of it."""
    rng = np.random.default_rng(seed)
    moved = onnx.ModelProto()
    moved.CopyFrom(model)
    for tensor in moved.graph.initializer:
        if tensor.data_type not in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            continue
        values = numpy_helper.to_array(tensor)
        exact = values.astype(np.float64)
        ulp = _spacing(np.abs(exact), tensor.data_type)
        shifted = exact + rng.uniform(-0.5, 0.5, exact.shape) * ulp
        tensor.CopyFrom(numpy_helper.from_array(shifted.astype(np.float32), tensor.name))
    return widen_floats(moved)


def _spacing(magnitude: np.ndarray, data_type: int) -> np.ndarray:
    """The distance to the next representable value above each magnitude (0 at 0)."""
    bits = 10 if data_type == TensorProto.FLOAT16 else 7  # stored significand bits
    tiny = 2.0**-14 if data_type == TensorProto.FLOAT16 else 2.0**-126  # smallest normal
    exponent = np.floor(np.log2(np.maximum(magnitude, tiny)))
    return np.where(magnitude > 0, 2.0 ** (exponent - bits), 0.0)
