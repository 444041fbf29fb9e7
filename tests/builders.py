"""Tiny ONNX models for tests, and the assertions every fold test makes: structure, numbers
(onnxruntime with graph optimizations disabled, bnfold.testing.run) and the checker."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.testing import IR_VERSION, random_inputs, run, widen_floats  # noqa: F401 (shared with bench/)


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


def bn_parameters(rng: np.random.Generator, channels: int) -> dict[str, np.ndarray]:
    """Trained-looking statistics: γ and var away from 1, β and mean away from 0."""
    return {
        "gamma": rng.uniform(0.5, 1.5, channels),
        "beta": rng.normal(0, 0.5, channels),
        "mean": rng.normal(0, 0.5, channels),
        "var": rng.uniform(0.3, 2.0, channels),
    }


class BranchGraph:
    """x → parallel branches (Conv, BN, identity, layer scale) → Add chain → Relu, built in a few
    lines: the shape of RepVGG / MobileOne / RepMixer blocks."""

    def __init__(self, channels: int = 4, spatial=(9, 9), dtype=np.float32, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.channels, self.spatial, self.dtype = channels, tuple(spatial), dtype
        self.nodes, self.inits, self.count = [], [], 0

    def _name(self, base):
        self.count += 1
        return f"{base}{self.count}"

    def const(self, values, base="c"):
        name = self._name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(values).astype(self.dtype), name))
        return name

    def conv(self, x="x", cout=None, k=3, stride=1, dilation=1, pads=None, group=1, bn=True, cin=None, **attrs):
        cin, cout = cin or self.channels, cout or self.channels
        ks = (k,) * len(self.spatial) if isinstance(k, int) else tuple(k)
        weight = self.rng.normal(0, 0.4, (cout, cin // group, *ks))
        out = self._name("conv")
        if pads is None and "auto_pad" not in attrs:
            pads = [dilation * (kk // 2) for kk in ks] * 2
        if pads is not None:
            attrs["pads"] = pads
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, self.const(weight, "W"), self.const(self.rng.normal(0, 0.2, cout), "B")],
                [out],
                name=out,
                kernel_shape=list(ks),
                strides=[stride] * len(ks),
                dilations=[dilation] * len(ks),
                group=group,
                **attrs,
            )
        )
        return self.bn(out, cout) if bn else out

    def bn(self, x="x", channels=None):
        params = bn_parameters(self.rng, channels or self.channels)
        out = self._name("bn")
        names = [self.const(params[k], k) for k in ("gamma", "beta", "mean", "var")]
        self.nodes.append(helper.make_node("BatchNormalization", [x, *names], [out], name=out))
        return out

    def op(self, op_type, a, b):
        out = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, [a, b], [out], name=out))
        return out

    def sum(self, *terms):
        total = terms[0]
        for term in terms[1:]:
            total = self.op("Add", total, term)
        return total

    def model(self, y, out_channels=None, in_channels=None, opset=17):
        elem = ONNX_TYPE[np.dtype(self.dtype)]
        relu = self._name("relu")
        self.nodes.append(helper.make_node("Relu", [y], [relu], name=relu))
        graph = helper.make_graph(
            self.nodes,
            "branches",
            [helper.make_tensor_value_info("x", elem, [1, in_channels or self.channels, *self.spatial])],
            [helper.make_tensor_value_info(relu, elem, None)],
            self.inits,
        )
        model = make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        return onnx.shape_inference.infer_shapes(model, strict_mode=True)


# ---- the patterns of test_fold_patterns.py --------------------------------------------------------
def add_initializer(model: onnx.ModelProto, name: str, value) -> None:
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))


def insert_between_conv_and_bn(model: onnx.ModelProto, *nodes: onnx.NodeProto) -> None:
    """conv → nodes[0] → … → bn, each node reading the previous output."""
    graph = model.graph
    previous = "conv_out"
    for position, node in enumerate(nodes, start=1):
        node.input[0] = previous
        previous = node.output[0]
        graph.node.insert(position, node)
    next(n for n in graph.node if n.name == "bn").input[0] = previous


def conv_then(ops: list[tuple[str, str, np.ndarray]], *, data_first: bool = True) -> onnx.ModelProto:
    """x → Conv (no bias) → op(·, constant) → … → y."""
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["t0"], name="conv")],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 7, 7])],
        [],
        [numpy_helper.from_array(rng.normal(0, 0.5, (6, 4, 3, 3)).astype(np.float32), "W")],
    )
    for i, (op, name, value) in enumerate(ops, start=1):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        inputs = [f"t{i - 1}", name] if data_first else [name, f"t{i - 1}"]
        graph.node.append(helper.make_node(op, inputs, [f"t{i}"], name=f"{op.lower()}{i}"))
    graph.output.append(helper.make_tensor_value_info(f"t{len(ops)}", TensorProto.FLOAT, [2, 6, 5, 5]))
    return make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def bn_then(op: str, weight: np.ndarray, *, x_shape, bias=None, attrs=None) -> onnx.ModelProto:
    """x → BatchNormalization 'bn' → <op> 'linear' → y (a BN on the input, as in pre-activation
    and input-normalizing nets)."""
    rng = np.random.default_rng(6)
    channels = x_shape[1]
    params = bn_parameters(rng, channels)
    inits = [numpy_helper.from_array(params[k].astype(np.float32), k) for k in ("gamma", "beta", "mean", "var")]
    inits.append(numpy_helper.from_array(weight.astype(np.float32), "W"))
    inputs = ["bn_out", "W"]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, np.float32), "B"))
        inputs.append("B")
    graph = helper.make_graph(
        [
            helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["bn_out"], name="bn"),
            helper.make_node(op, inputs, ["y"], name="linear", **(attrs or {})),
        ],
        "forward",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inferred = onnx.shape_inference.infer_shapes(model).graph.output[0]
    model.graph.output[0].CopyFrom(inferred)
    return model


def matmul_model(x_shape: list[int], *, bias: bool) -> onnx.ModelProto:
    """x → MatMul 'mm' (constant B [5, 6]) → [Add 'add' (bias [6])] → BatchNormalization → y."""
    rng = np.random.default_rng(11)
    params = bn_parameters(rng, 6)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (5, 6)).astype(np.float32), "B")]
    inits += [numpy_helper.from_array(params[k].astype(np.float32), k) for k in ("gamma", "beta", "mean", "var")]
    nodes = [helper.make_node("MatMul", ["x", "B"], ["mm_out"], name="mm")]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, 6).astype(np.float32), "bias"))
        nodes.append(helper.make_node("Add", ["mm_out", "bias"], ["add_out"], name="add"))
    nodes.append(
        helper.make_node("BatchNormalization", [nodes[-1].output[0], "gamma", "beta", "mean", "var"], ["y"], name="bn")
    )
    out_shape = x_shape[:-1] + [6]
    graph = helper.make_graph(
        nodes,
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )
    return make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


MIXED_KERNELS = (("c1", 4, 1, 1), ("c3", 6, 3, 1), ("c5", 2, 5, 2))  # name, channels, kernel, group


def concat_bn_model(
    *,
    axis: int = 1,
    extra_reader: str | None = None,
    pool_branch: bool = False,
    branches=MIXED_KERNELS,
    repeat: bool = False,
) -> onnx.ModelProto:
    """x → {Conv 1×1 (4 ch), Conv 3×3 padded (6 ch), Conv 5×5 padded, grouped (2 ch)} → Concat → BN → y.
    With `repeat`, the Concat takes each branch twice."""
    rng = np.random.default_rng(12)
    bn_channels = sum(b[1] for b in branches) * (1 + repeat) if axis in (1, -3) else branches[0][1]
    params = bn_parameters(rng, bn_channels)
    inits = [numpy_helper.from_array(params[k].astype(np.float32), k) for k in ("gamma", "beta", "mean", "var")]
    nodes, outputs = [], []
    for name, channels, kernel, group in branches:
        inits.append(
            numpy_helper.from_array(
                rng.normal(0, 0.5, (channels, 4 // group, kernel, kernel)).astype(np.float32), f"W_{name}"
            )
        )
        nodes.append(
            helper.make_node(
                "Conv", ["x", f"W_{name}"], [f"{name}_out"], name=name, pads=[kernel // 2] * 4, group=group
            )
        )
        outputs.append(f"{name}_out")
    if pool_branch:
        nodes[0] = helper.make_node("MaxPool", ["x"], ["c1_out"], name="pool", kernel_shape=[1, 1])
        inits = [t for t in inits if t.name != "W_c1"]
    if repeat:
        outputs = outputs * 2
    nodes.append(helper.make_node("Concat", outputs, ["cat"], name="cat", axis=axis))
    nodes.append(helper.make_node("BatchNormalization", ["cat", "gamma", "beta", "mean", "var"], ["y"], name="bn"))
    graph = helper.make_graph(
        nodes,
        "concat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    graph.output[0].CopyFrom(onnx.shape_inference.infer_shapes(make_model(graph)).graph.output[0])
    if extra_reader:
        inferred = onnx.shape_inference.infer_shapes(make_model(graph)).graph.value_info
        graph.output.append(next(v for v in inferred if v.name == extra_reader))
    return make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def token_model(kind: str, *, bias: bool = True) -> onnx.ModelProto:
    """x [2, 5, 4] → MatMul (B [4, 6]) → Add (bias [6]) → <shape op> → BN over 6 → <back> → y."""
    rng = np.random.default_rng(13)
    params = bn_parameters(rng, 6)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 6)).astype(np.float32), "B")]
    inits += [numpy_helper.from_array(params[k].astype(np.float32), k) for k in ("gamma", "beta", "mean", "var")]
    inits += [
        numpy_helper.from_array(np.array([-1, 6], np.int64), "flat"),
        numpy_helper.from_array(np.array([2, 5, 6], np.int64), "tokens"),
        numpy_helper.from_array(np.array([-1, 3], np.int64), "halves"),
    ]
    nodes = [helper.make_node("MatMul", ["x", "B"], ["mm"], name="mm")]
    last = "mm"
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, 6).astype(np.float32), "bias"))
        nodes.append(helper.make_node("Add", ["mm", "bias"], ["biased"], name="add"))
        last = "biased"
    into, back = {
        "reshape": (
            helper.make_node("Reshape", [last, "flat"], ["bn_in"], name="to_2d"),
            helper.make_node("Reshape", ["bn_out", "tokens"], ["y"], name="back"),
        ),
        "flatten": (
            helper.make_node("Flatten", [last], ["bn_in"], name="to_2d", axis=2),
            helper.make_node("Reshape", ["bn_out", "tokens"], ["y"], name="back"),
        ),
        "transpose": (
            helper.make_node("Transpose", [last], ["bn_in"], name="to_ncl", perm=[0, 2, 1]),
            helper.make_node("Transpose", ["bn_out"], ["y"], name="back", perm=[0, 2, 1]),
        ),
    }[kind]
    nodes += [
        into,
        helper.make_node("BatchNormalization", ["bn_in", "gamma", "beta", "mean", "var"], ["bn_out"], name="bn"),
        back,
    ]
    graph = helper.make_graph(
        nodes,
        "tokens",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 6])],
        inits,
    )
    return make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def add_chain_model(depth: int, *, cycle: bool = False) -> onnx.ModelProto:
    """Conv(x) + (z + 1 + 1 + … depth times): a residual-stream-like chain beside a conv."""
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv")]
    previous = "z"
    for i in range(depth):
        nodes.append(helper.make_node("Add", [previous, "one"], [f"a{i}"]))
        previous = f"a{i}"
    if cycle:  # an invalid graph: the chain's first Add reads its own last output
        nodes[1].input[0] = previous
    nodes.append(helper.make_node("Add", ["c", previous], ["y"], name="final"))
    graph = helper.make_graph(
        nodes,
        "chain",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 2, 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2, 2])],
        [
            numpy_helper.from_array(np.ones((3, 2, 3, 3), np.float32), "W"),
            numpy_helper.from_array(np.float32(1), "one"),
        ],
    )
    return make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def bn_before(op: str, *, rank: int = 2, **attrs) -> onnx.ModelProto:
    """x → BN (6 channels) → MatMul (B [6, 4]) or ConvTranspose (W [6, 4/g, 3, 3]) → y."""
    rng = np.random.default_rng(17)
    params = bn_parameters(rng, 6)
    inits = [numpy_helper.from_array(params[k].astype(np.float32), k) for k in ("gamma", "beta", "mean", "var")]
    bn = helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["bn_out"], name="bn")
    if op == "MatMul":
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (6, 4)).astype(np.float32), "B"))
        linear = helper.make_node("MatMul", ["bn_out", "B"], ["y"], name="mm")
        shape = [3, 6] if rank == 2 else [2, 6, 6]
    else:
        group = attrs.get("group", 1)
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (6, 4 // group, 3, 3)).astype(np.float32), "W"))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, 4).astype(np.float32), "b"))
        linear = helper.make_node("ConvTranspose", ["bn_out", "W", "b"], ["y"], name="deconv", **attrs)
        shape = [1, 6, 7, 7]
    graph = helper.make_graph(
        [bn, linear], "forward", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    return onnx.shape_inference.infer_shapes(make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def keras_model(layout: str, *, affine: str = "mul_add") -> onnx.ModelProto:
    """The shapes tf2onnx writes around a conv, then a Keras BatchNormalization as Mul/Add.
    conv1d: x [1, 4, 9] → Unsqueeze(2) → Conv 1×3 → Squeeze(2) → ·[1, 6, 1] +[1, 6, 1] → Relu.
    channels_last: x [1, 7, 7, 4] → Transpose → Conv 3×3 → Transpose back → ·[6] +[6] → Relu.
    merged: like conv1d, but a Reshape folds the channels into the next axis ([1, 6·9]): no fold."""
    rng = np.random.default_rng(23)
    inits = [
        numpy_helper.from_array(
            rng.normal(0, 0.4, (6, 4, 1, 3) if layout != "channels_last" else (6, 4, 3, 3)).astype(np.float32), "W"
        ),
        numpy_helper.from_array(rng.normal(0, 0.2, 6).astype(np.float32), "b"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
    ]
    if layout == "channels_last":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 7, 7, 4])
        nodes = [
            helper.make_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2]),
            helper.make_node("Conv", ["nchw", "W", "b"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Transpose", ["conv"], ["z"], name="to_nhwc", perm=[0, 2, 3, 1]),
        ]
        constant_shape = (6,)
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9])
        nodes = [
            helper.make_node("Unsqueeze", ["x", "axis2"], ["x4"]),
            helper.make_node("Conv", ["x4", "W", "b"], ["conv"], name="conv", pads=[0, 1, 0, 1]),
            helper.make_node("Squeeze", ["conv", "axis2"], ["z"], name="squeeze"),
        ]
        constant_shape = (1, 6, 1)
        if layout == "merged":
            inits.append(numpy_helper.from_array(np.array([1, 54, 1], np.int64), "flat"))
            nodes.append(helper.make_node("Reshape", ["z", "flat"], ["z_flat"], name="merge"))
            constant_shape = (1, 54, 1)
    data = nodes[-1].output[0]
    if affine == "mul_add":
        inits += [
            numpy_helper.from_array(rng.uniform(0.5, 1.5, constant_shape).astype(np.float32), "gamma"),
            numpy_helper.from_array(rng.normal(0, 0.3, constant_shape).astype(np.float32), "beta"),
        ]
        nodes += [
            helper.make_node("Mul", [data, "gamma"], ["scaled"], name="bn_mul"),
            helper.make_node("Add", ["scaled", "beta"], ["shifted"], name="bn_add"),
        ]
    else:  # a BatchNormalization over the squeezed [1, 6, 9]
        params = bn_parameters(rng, 6)
        inits += [numpy_helper.from_array(params[k].astype(np.float32), k) for k in ("gamma", "beta", "mean", "var")]
        nodes.append(
            helper.make_node("BatchNormalization", [data, "gamma", "beta", "mean", "var"], ["shifted"], name="bn")
        )
    nodes.append(helper.make_node("Relu", ["shifted"], ["y"]))
    graph = helper.make_graph(nodes, "keras", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def bn_unsqueeze_conv(perm: list[int] | None = None) -> onnx.ModelProto:
    """x [1, 4, 9] → BN → Unsqueeze(2) [→ Transpose perm] → Conv 1×3, unpadded → y."""
    rng = np.random.default_rng(29)
    params = bn_parameters(rng, 4)
    inits = [numpy_helper.from_array(params[k].astype(np.float32), k) for k in ("gamma", "beta", "mean", "var")]
    inits += [
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        numpy_helper.from_array(rng.normal(0, 0.4, (6, 4, 1, 3)).astype(np.float32), "W"),
    ]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["bn_out"], name="bn"),
        helper.make_node("Unsqueeze", ["bn_out", "axis2"], ["x4"], name="unsqueeze"),
    ]
    data = "x4"
    if perm is not None:
        nodes.append(helper.make_node("Transpose", ["x4"], ["moved"], perm=perm))
        data = "moved"
    nodes.append(helper.make_node("Conv", [data, "W"], ["y"], name="conv"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9])
    graph = helper.make_graph(nodes, "fwd", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return onnx.shape_inference.infer_shapes(make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One of: flipped bits, a truncation, inserted or deleted bytes, or two chunks swapped."""
    buf = bytearray(data)
    kind = rng.integers(5)
    if kind == 0:  # flip 1 to 8 bits
        for _ in range(rng.integers(1, 9)):
            i = int(rng.integers(len(buf)))
            buf[i] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # truncate
        buf = buf[: int(rng.integers(len(buf)))]
    elif kind == 2:  # insert random bytes
        i = int(rng.integers(len(buf)))
        buf[i:i] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
    elif kind == 3:  # delete a run
        i = int(rng.integers(len(buf)))
        del buf[i : i + int(rng.integers(1, 16))]
    else:  # swap two chunks: fields of one message landing in another
        n = int(rng.integers(2, 32))
        i, j = sorted(int(x) for x in rng.integers(0, max(1, len(buf) - n), 2))
        buf[i : i + n], buf[j : j + n] = buf[j : j + n], buf[i : i + n]
    return bytes(buf)
