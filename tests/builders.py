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
