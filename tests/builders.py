"""Tiny ONNX models for tests, and the assertions every fold test makes: structure, numbers
(onnxruntime with graph optimizations disabled, bnfold.testing.run) and the checker."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.testing import IR_VERSION, bn_parameters, random_inputs, run, widen_floats  # noqa: F401 (shared with bench/)


def make_model(graph: onnx.GraphProto, **kwargs) -> onnx.ModelProto:
    """helper.make_model, at an IR version and opset (17 unless given) that the oldest
    onnxruntime bnfold allows can load: onnx's own defaults are its newest."""
    kwargs.setdefault("ir_version", IR_VERSION)
    kwargs.setdefault("opset_imports", [helper.make_opsetid("", 17)])
    return helper.make_model(graph, **kwargs)


ONNX_TYPE = {
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(ml_dtypes.bfloat16): TensorProto.BFLOAT16,
}

# How far a folded model may drift from the original, as a fraction of the output's largest
# magnitude. A fold reorders rounding: in float32 the drift seen is ~1e-7 of the output scale
# (BENCHMARKS.md); real folding mistakes (ε 1e-3 for 1e-5, a dropped β, a wrong axis) move it
# by 1e-4 and more. float16 keeps ~3 significant digits per rounding and a fold re-rounds each
# weight, so its bound is set by float16's own precision, not by bnfold.
RELATIVE_TOLERANCE = {
    np.dtype(np.float64): 1e-12,
    np.dtype(np.float32): 1e-5,
    np.dtype(np.float16): 5e-3,
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
    return make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kwargs)


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
    probe = onnx.shape_inference.infer_shapes(make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
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
    return make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


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
