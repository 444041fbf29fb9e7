"""Bias correction of a float16 fold's rounding (bnfold.folding.correction), on a case where the
conv's input mean is known exactly: the BN before it has γ = 0, so its output is the constant β."""

from __future__ import annotations

import numpy as np
import onnx
from builders import run
from onnx import TensorProto, helper, numpy_helper

import bnfold


def constant_input_model(channels: int = 64) -> onnx.ModelProto:
    """x → Conv0 → BN0 (γ = 0: outputs β) → Relu → Conv1 3×3 unpadded → BN1 → y, in float16."""
    rng = np.random.default_rng(31)
    half = np.float16
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (channels, 3, 1, 1)).astype(half), "W0"),
        numpy_helper.from_array(rng.normal(0, 1.0, (8, channels, 3, 3)).astype(half) / half(8), "W1"),
    ]
    bn0 = {
        "g0": np.zeros(channels),
        "b0": rng.uniform(2, 6, channels),
        "m0": np.zeros(channels),
        "v0": np.ones(channels),
    }
    bn1 = {
        "g1": rng.uniform(0.5, 1.5, 8),
        "b1": rng.normal(0, 0.3, 8),
        "m1": rng.normal(0, 0.3, 8),
        "v1": rng.uniform(0.5, 2, 8),
    }
    inits += [numpy_helper.from_array(v.astype(half), k) for k, v in {**bn0, **bn1}.items()]
    nodes = [
        helper.make_node("Conv", ["x", "W0"], ["c0"], name="conv0"),
        helper.make_node("BatchNormalization", ["c0", "g0", "b0", "m0", "v0"], ["n0"], name="bn0"),
        helper.make_node("Relu", ["n0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "W1"], ["c1"], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "g1", "b1", "m1", "v1"], ["y"], name="bn1"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 8, 4, 4])
    return helper.make_model(
        helper.make_graph(nodes, "constant", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)]
    )


def test_the_correction_cancels_the_weights_rounding_when_the_input_mean_is_exact():
    model = constant_input_model()
    corrected = bnfold.fold(model, bias_correction=True)
    plain = bnfold.fold(model)
    outcome = next(o for o in corrected.report.batch_norms if o.node == "bn1")
    assert outcome.rounding == "bias correction, E[x] from BatchNormalization 'bn0' through Relu 'relu0'"
    assert next(o for o in plain.report.batch_norms if o.node == "bn1").rounding == "sum-preserving rounding"
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float16)}
    (want,) = run(model, feed)
    (got,) = run(corrected.model, feed)
    (rounded,) = run(plain.model, feed)
    bias = next(t for t in corrected.model.graph.initializer if t.name.startswith("b1_bnfold"))
    bias_rounding = np.spacing(np.abs(numpy_helper.to_array(bias))).astype(np.float64).max()
    error = np.abs(got.astype(np.float64) - want.astype(np.float64)).max()
    # What is left is the float16 output and bias roundings, no longer the weights' ΔW·x.
    assert error <= 2 * bias_rounding + 2 * np.spacing(np.abs(want).max()).astype(np.float64)
    assert np.abs(rounded.astype(np.float64) - want.astype(np.float64)).max() > 4 * error


def test_without_a_known_input_mean_the_report_says_so():
    model = constant_input_model()
    model.graph.node[2].op_type = "Sigmoid"  # no closed form used for it: E[x] unknown
    outcome = next(o for o in bnfold.fold(model, bias_correction=True).report.batch_norms if o.node == "bn1")
    assert outcome.rounding == "sum-preserving rounding; no E[x] known for its input"
