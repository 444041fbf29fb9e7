"""Building and running small models: what bnfold's tests and benchmarks share, public so that
a pipeline can check its own folds the same way.

- `bn_parameters`, `BranchGraph`: trained-looking BatchNormalization statistics, and branch sums.
- `random_inputs`, `run`: inputs for a model, and one onnxruntime run with optimizations off.
- `widen_floats`: a float16/bfloat16 (or float32) model widened exactly, as a reference.
- `mutate`: seeded damage to a model file, the way broken downloads and hostile uploads look.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.verification.precision import widen_floats  # noqa: F401 (part of this module's kit)

# onnx >= 1.22 writes IR version 13 by default, which onnxruntime loads from 1.24 on (and 1.24 has
# no Python 3.10 build); models built here say 10, which every onnxruntime bnfold allows loads.
IR_VERSION = 10


def bn_parameters(rng: np.random.Generator, channels: int) -> dict[str, np.ndarray]:
    """Trained-looking statistics: γ and var away from 1, β and mean away from 0."""
    return {
        "gamma": rng.uniform(0.5, 1.5, channels),
        "beta": rng.normal(0, 0.5, channels),
        "mean": rng.normal(0, 0.5, channels),
        "var": rng.uniform(0.3, 2.0, channels),
    }


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
    """Run `model` once in onnxruntime with graph optimizations disabled (at its default level
    onnxruntime folds Conv+BN itself, and a comparison would measure that fold instead)."""
    from bnfold.verification.runtime import make_session

    return make_session(model).run(None, feeds)


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
        elem = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}[self.dtype]
        relu = self._name("relu")
        self.nodes.append(helper.make_node("Relu", [y], [relu], name=relu))
        graph = helper.make_graph(
            self.nodes,
            "branches",
            [helper.make_tensor_value_info("x", elem, [1, in_channels or self.channels, *self.spatial])],
            [helper.make_tensor_value_info(relu, elem, None)],
            self.inits,
        )
        model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", opset)])
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
