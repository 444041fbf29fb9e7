"""Tiny ONNX models for tests, and a real onnxruntime runner with graph optimizations disabled.

onnxruntime folds Conv+BN itself at its default level; with it on, a comparison would measure
bnfold against onnxruntime's fold, not against the original model.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ONNX_TYPE = {
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(ml_dtypes.bfloat16): TensorProto.BFLOAT16,
}

# How far a folded model may drift from the original, as a fraction of the output's largest
# magnitude. A fold reorders rounding: in float32 the drift seen is ~1e-7 of the output scale
# (tests/README.md); real folding mistakes (ε 1e-3 for 1e-5, a dropped β, a wrong axis) move it
# by 1e-4 and more. float16 keeps ~3 significant digits per rounding and a fold re-rounds each
# weight, so its bound is set by float16's own precision, not by bnfold.
RELATIVE_TOLERANCE = {
    np.dtype(np.float64): 1e-12,
    np.dtype(np.float32): 1e-5,
    np.dtype(np.float16): 5e-3,
}


def bn_parameters(rng: np.random.Generator, channels: int) -> dict[str, np.ndarray]:
    """Trained-looking statistics: γ and var away from 1, β and mean away from 0."""
    return {
        "gamma": rng.uniform(0.5, 1.5, channels),
        "beta": rng.normal(0, 0.5, channels),
        "mean": rng.normal(0, 0.5, channels),
        "var": rng.uniform(0.3, 2.0, channels),
    }


def conv_bn_model(
    *,
    rank: int = 2,
    cin: int = 4,
    cout: int = 6,
    group: int = 1,
    bias: bool = True,
    dtype=np.float32,
    opset: int = 15,
    epsilon: float | None = None,
    kernel: int = 3,
    conv_attrs: dict | None = None,
    bn_attrs: dict | None = None,
    bn_outputs: tuple[str, ...] = ("bn_out",),
    spatial: int = 7,
    seed: int = 0,
    ir_version: int | None = None,
) -> onnx.ModelProto:
    """x → Conv 'conv' → BatchNormalization 'bn' → Relu 'relu' → y."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.5, (cout, cin // group) + (kernel,) * rank)
    params = bn_parameters(rng, cout)
    inits = [numpy_helper.from_array(weight.astype(dtype), "W")]
    conv_inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, cout).astype(dtype), "B"))
        conv_inputs.append("B")
    for key in ("gamma", "beta", "mean", "var"):
        inits.append(numpy_helper.from_array(params[key].astype(dtype), key))
    attrs = dict(bn_attrs or {})
    if epsilon is not None:
        attrs["epsilon"] = epsilon
    nodes = [
        helper.make_node("Conv", conv_inputs, ["conv_out"], name="conv", group=group, **(conv_attrs or {})),
        helper.make_node(
            "BatchNormalization", ["conv_out", "gamma", "beta", "mean", "var"], list(bn_outputs), name="bn", **attrs
        ),
        helper.make_node("Relu", [bn_outputs[0]], ["y"], name="relu"),
    ]
    elem = ONNX_TYPE[dtype]
    x = helper.make_tensor_value_info("x", elem, [2, cin] + [spatial] * rank)
    y = helper.make_tensor_value_info("y", elem, [2, cout] + [f"d{i}" for i in range(rank)])
    graph = helper.make_graph(nodes, "conv_bn", [x], [y], inits)
    kwargs = {} if ir_version is None else {"ir_version": ir_version}
    if ir_version is not None and ir_version < 4:
        # Before IR v4 every initializer must also be listed as a graph input.
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kwargs)


def random_inputs(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    """Inputs for every non-initializer graph input with a static shape."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = [d.dim_value for d in tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        feeds[value.name] = rng.normal(0.3, 1.5, shape).astype(dtype)
    return feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same_function(original: onnx.ModelProto, folded: onnx.ModelProto, feeds=None) -> float:
    """Both models, run by onnxruntime, agree within the dtype's tolerance; returns the drift
    as a fraction of the output scale."""
    feeds = feeds if feeds is not None else random_inputs(original)
    worst = 0.0
    for want, got in zip(run(original, feeds), run(folded, feeds), strict=True):
        assert want.shape == got.shape and want.dtype == got.dtype
        want64, got64 = want.astype(np.float64), got.astype(np.float64)
        scale = max(float(np.abs(want64).max()), 1e-30)
        drift = float(np.abs(got64 - want64).max()) / scale
        assert drift <= RELATIVE_TOLERANCE[want.dtype], f"drift {drift:.3g} of output scale"
        worst = max(worst, drift)
    return worst


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


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


def linear_bn_model(
    op: str,
    *,
    weight: np.ndarray,
    bias: np.ndarray | None,
    x_shape: list[int],
    attrs: dict | None = None,
    opset: int = 17,
    seed: int = 0,
    dtype=np.float32,
    bn_params: dict[str, np.ndarray] | None = None,
    epsilon: float | None = None,
) -> onnx.ModelProto:
    """x → <op> 'linear' (weight W, optional bias B) → BatchNormalization 'bn' → y, for any
    linear op; the BN's channel count is taken from a shape-inferred output."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    elem = ONNX_TYPE[dtype]
    inits = [numpy_helper.from_array(np.asarray(weight).astype(dtype), "W")]
    inputs = ["x", "W"]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias).astype(dtype), "B"))
        inputs.append("B")
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["lin_out"], name="linear", **(attrs or {}))],
        "probe",
        [helper.make_tensor_value_info("x", elem, x_shape)],
        [helper.make_tensor_value_info("lin_out", elem, None)],
        inits,
    )
    probe = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
    out_shape = [d.dim_value for d in probe.graph.output[0].type.tensor_type.shape.dim]
    channels = out_shape[1]
    params = bn_params if bn_params is not None else bn_parameters(rng, channels)
    for key in ("gamma", "beta", "mean", "var"):
        graph.initializer.append(numpy_helper.from_array(np.asarray(params[key]).astype(dtype), key))
    bn_attrs = {} if epsilon is None else {"epsilon": epsilon}
    graph.node.append(
        helper.make_node(
            "BatchNormalization", ["lin_out", "gamma", "beta", "mean", "var"], ["y"], name="bn", **bn_attrs
        )
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("y", elem, out_shape))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def assert_refused(model: onnx.ModelProto, reason: str | None = None, *, check: bool = True):
    """bnfold leaves the model byte-identical and, when given, reports `reason` for some node."""
    import bnfold

    before = model.SerializeToString(deterministic=True)
    result = bnfold.fold(model, check=check)
    assert result.model.SerializeToString(deterministic=True) == before, "a refused fold changed the model"
    if reason is not None:
        reasons = [o.reason for o in result.report.outcomes if not o.folded]
        assert any(reason in r for r in reasons), reasons
    return result
