"""Bias correction of a float16 fold's rounding (bnfold.folding.correction, affine.
cast_conv_toward_moments): exact where the conv's input is known exactly (the BN before it has
γ = 0, so its output is the constant β), and the moments it reads from the graph."""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import onnx
import pytest
from builders import assert_same_function, make_model, run
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import bnfold
from bnfold import calibration
from bnfold.cli import app
from bnfold.folding import affine, correction


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
        "b1": rng.uniform(20, 60, 8),  # a large folded bias: its own float16 rounding matters
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
    return make_model(
        helper.make_graph(nodes, "constant", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)]
    )


def _rounding_of(result, node: str) -> str | None:
    return next(o for o in result.report.batch_norms if o.node == node).rounding


def test_the_correction_cancels_the_roundings_when_the_input_is_known_exactly():
    model = constant_input_model()
    corrected, plain = bnfold.fold(model, bias_correction=True), bnfold.fold(model)
    through = "BatchNormalization 'bn0' through Relu 'relu0'"
    assert _rounding_of(corrected, "bn1") == f"bias correction, E[x] from the statistics of {through}"
    assert _rounding_of(plain, "bn1") == "sum-preserving rounding"
    # The conv's input is the constant x = relu(β0). Per output channel the folded weights' and
    # bias's rounding adds Σ δ·x + δ_b, which correction brings as near zero as one weight's move
    # to its other neighbour allows.
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    scale = values["g1"] / np.sqrt(values["v1"] + 1e-5)
    exact_weight = values["W1"] * scale[:, None, None, None]
    exact_bias = values["b1"] - values["m1"] * scale
    x = np.maximum(values["b0"], 0)[None, :, None, None]
    for result, bound in ((corrected, 1.0), (plain, None)):
        folded = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in result.model.graph.initializer}
        weight, bias = folded["W1_bnfold"], folded["b1_bnfold"]
        shift = ((weight - exact_weight) * x).sum(axis=(1, 2, 3)) + bias - exact_bias
        step = (np.spacing(np.abs(weight).astype(np.float16)).astype(np.float64) * x).max(axis=(1, 2, 3))
        if bound:
            assert (np.abs(shift) <= step).all()
        else:  # sum-preserving rounding cannot cancel the bias's rounding
            assert (np.abs(shift) > 4 * step).any()
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float16)}
    (want,) = run(model, feed)
    (got,) = run(corrected.model, feed)
    (rounded,) = run(plain.model, feed)
    assert np.abs(got.astype(np.float64) - want).mean() < np.abs(rounded.astype(np.float64) - want).mean()


def test_the_report_notes_that_folding_before_conversion_rounds_once():
    (note,) = bnfold.fold(constant_input_model(), bias_correction=True).report.notes
    assert note.startswith("16-bit weights: 2 folds rounded their weights a second time (1 with bias correction, 1 ")
    assert "folding the float32 model before converting it to float16 rounds them once" in note
    model = constant_input_model()
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT
    assert bnfold.fold(model).report.notes == []


def test_without_known_input_statistics_the_report_says_so():
    model = constant_input_model()
    model.graph.node[2].op_type = "Sin"  # an element-wise op bnfold takes no moments through
    corrected = bnfold.fold(model, bias_correction=True)
    assert _rounding_of(corrected, "bn1") == "sum-preserving rounding; no E[x] known for its input"


def test_the_correction_is_off_unless_asked_for(tmp_path):
    # issue 24: on held-out networks it was worse than sum-preserving rounding as often as better
    onnx.save(constant_input_model(), tmp_path / "m.onnx")
    cases = (([], "sum-preserving rounding"), (["--bias-correction"], "bias correction"))
    cases += ((["--no-bias-correction"], "sum-preserving rounding"),)
    for k, (flag, expected) in enumerate(cases):
        args = ["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / f"out{k}.onnx"), "--json", *flag]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["batch_normalizations"][1]["rounding"].startswith(expected)


def test_a_forward_fold_rounds_with_the_running_statistics_of_the_bn():
    # x → BN → Conv (unpadded), in float16: after the fold the conv reads x itself, whose mean and
    # variance the BN's running statistics give (μ ≈ 5 ≫ σ ≈ 0.5: the mean part dominates).
    rng = np.random.default_rng(12)
    c = 32
    params = {
        "g": rng.uniform(0.5, 1.5, c),
        "b": rng.normal(0, 0.3, c),
        "m": rng.uniform(4, 6, c),
        "v": rng.uniform(0.1, 0.4, c),
        "W": rng.normal(0, 0.2, (16, c, 3, 3)),
    }
    nodes = [
        helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["n"], name="bn"),
        helper.make_node("Conv", ["n", "W"], ["y"], name="conv"),
    ]
    inits = [numpy_helper.from_array(v.astype(np.float16), k) for k, v in params.items()]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, c, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 16, 4, 4])
    model = make_model(
        helper.make_graph(nodes, "forward", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    corrected, plain = bnfold.fold(model, bias_correction=True), bnfold.fold(model)
    assert (
        _rounding_of(corrected, "bn") == "bias correction, E[x] from the running statistics of BatchNormalization 'bn'"
    )
    assert _rounding_of(plain, "bn") == "sum-preserving rounding"
    assert_same_function(model, corrected.model)
    onnx.checker.check_model(corrected.model, full_check=True)
    values = {k: numpy_helper.to_array(t).astype(np.float64) for k, t in ((t.name, t) for t in model.graph.initializer)}
    scale = values["g"] / np.sqrt(values["v"] + 1e-5)
    exact_weight = values["W"] * scale[None, :, None, None]
    exact_bias = (values["W"].sum(axis=(2, 3)) * (values["b"] - values["m"] * scale)).sum(axis=1)
    shifts = []
    for result in (corrected, plain):
        folded = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in result.model.graph.initializer}
        weight, bias = folded["W_bnfold"], next(v for k, v in folded.items() if k != "W_bnfold")
        delta = ((weight - exact_weight) * values["m"][None, :, None, None]).sum(axis=(1, 2, 3))
        shifts.append(np.abs(delta + bias - exact_bias).mean())
    assert shifts[0] < 0.25 * shifts[1]


def test_calibration_measures_what_the_graph_cannot_say():
    # Behind a Sin the graph gives no statistics; the calibration inputs do: the BN before it
    # has γ = 0, so the conv reads sin(β0) exactly, with variance 0.
    model = constant_input_model()
    model.graph.node[2].op_type = "Sin"
    feeds = [{"x": np.random.default_rng(k).standard_normal((1, 3, 6, 6)).astype(np.float16)} for k in range(3)]
    measured = calibration.measure(model, feeds)
    beta0 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b0")).astype(np.float64)
    sine = np.sin(beta0.astype(np.float16).astype(np.float64))
    np.testing.assert_allclose(measured["r0"].mean, sine, atol=2e-3)  # float16 arithmetic
    assert measured["r0"].var.max() < 1e-6
    assert set(measured) == {"x", "r0"}  # every Conv's data input, the graph input included
    result = bnfold.fold(model, calibration=feeds)
    assert _rounding_of(result, "bn1") == "bias correction, E[x] from the calibration inputs"
    assert_same_function(model, result.model)


def test_calibration_from_a_file_and_its_mistakes_on_the_command_line(tmp_path):
    onnx.save(constant_input_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "good.npz", x=np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float16))
    np.savez(tmp_path / "bad.npz", y=np.zeros((1, 3, 6, 6), np.float16))
    model, out = str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx")
    result = CliRunner().invoke(
        app, ["optimize", model, "-o", out, "--json", "--calibration", str(tmp_path / "good.npz")]
    )
    assert result.exit_code == 0, result.output
    roundings = [o["rounding"] for o in json.loads(result.stdout)["batch_normalizations"]]
    assert roundings == ["bias correction, E[x] from the calibration inputs"] * 2
    for data, message in (("bad.npz", "no array for input 'x'"), ("none.npz", "no such input file or folder")):
        result = CliRunner().invoke(app, ["optimize", model, "-o", out, "--calibration", str(tmp_path / data)])
        assert result.exit_code == 2 and message in result.output


def _gelu(z):
    return 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


# Each activation as exporters write it: (nodes from "n0" to "r0", constants, the function)
ACTIVATIONS = {
    "relu": ([("Relu", ["n0"], {})], {}, lambda z: np.maximum(z, 0)),
    "leaky-relu": ([("LeakyRelu", ["n0"], {"alpha": 0.1})], {}, lambda z: np.where(z > 0, z, 0.1 * z)),
    "relu6": ([("Clip", ["n0", "lo", "hi"], {})], {"lo": 0.0, "hi": 6.0}, lambda z: np.clip(z, 0, 6)),
    "sigmoid": ([("Sigmoid", ["n0"], {})], {}, lambda z: 1 / (1 + np.exp(-z))),
    "hardswish": ([("HardSwish", ["n0"], {})], {}, lambda z: z * np.clip(z / 6 + 0.5, 0, 1)),
    "silu": ([("Sigmoid", ["n0"], {}), ("Mul", ["n0", "t1"], {})], {}, lambda z: z / (1 + np.exp(-z))),
    "gelu-op": ([("Gelu", ["n0"], {})], {}, _gelu),
    "gelu-torchscript": (  # x · (erf(x / √2) + 1) · 0.5
        [
            ("Div", ["n0", "sqrt2"], {}),
            ("Erf", ["t1"], {}),
            ("Add", ["t2", "one"], {}),
            ("Mul", ["n0", "t3"], {}),
            ("Mul", ["t4", "half"], {}),
        ],
        {"sqrt2": math.sqrt(2), "one": 1.0, "half": 0.5},
        _gelu,
    ),  # fmt: skip
    "mish": (
        [("Softplus", ["n0"], {}), ("Tanh", ["t1"], {}), ("Mul", ["n0", "t2"], {})],
        {},
        lambda z: z * np.tanh(np.log1p(np.exp(z))),
    ),  # fmt: skip
    "per-channel-scale": (
        [("Relu", ["n0"], {}), ("Mul", ["t1", "scale"], {})],
        {"scale": [[[2.0]], [[0.5]], [[1.0]], [[3.0]]]},
        lambda z: np.maximum(z, 0) * np.array([2.0, 0.5, 1.0, 3.0]),
    ),  # fmt: skip
}


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_moments_through_an_activation_match_sampling(activation):
    steps, constants, function = ACTIVATIONS[activation]
    model = constant_input_model(channels=4)
    gamma = np.array([0.5, 1.0, 2.0, 3.0])
    beta = np.array([-1.0, 0.0, 0.5, 2.0])
    _set(model, "g0", gamma)
    _set(model, "b0", beta)
    chain = [
        helper.make_node(op, inputs, [f"t{k + 1}" if k + 1 < len(steps) else "r0"], name=f"act{k}", **attributes)
        for k, (op, inputs, attributes) in enumerate(steps)
    ]
    model.graph.node.pop(2)  # the Relu
    for node in reversed(chain):
        model.graph.node.insert(2, node)
    model.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float16), k) for k, v in constants.items())
    moments = correction.input_moments(_context(model), "r0")
    samples = function(np.random.default_rng(5).normal(beta, gamma, (400_000, 4)))
    np.testing.assert_allclose(moments.mean, samples.mean(axis=0), atol=0.01 * samples.std(axis=0).max())
    np.testing.assert_allclose(moments.var, samples.var(axis=0), rtol=0.02, atol=1e-3)
    assert moments.source.startswith("the statistics of BatchNormalization 'bn0' through ")


def test_moments_through_a_residual_sum_and_its_relu():
    # relu(BN_a + BN_b): the sum of two independent normals, then the ReLU (a ResNet block's end)
    model = constant_input_model(channels=4)
    model.graph.node.insert(2, helper.make_node("BatchNormalization", ["c0", "g0", "b1x", "m0", "v0"], ["n0b"]))
    model.graph.node.append(helper.make_node("Add", ["n0", "n0b"], ["sum"], name="add"))
    model.graph.node.append(helper.make_node("Relu", ["sum"], ["out"], name="relu"))
    gamma = np.array([0.5, 1.0, 2.0, 3.0])
    _set(model, "g0", gamma)
    model.graph.initializer.append(numpy_helper.from_array(np.full(4, -1, np.float16), "b1x"))
    beta = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b0")).astype(np.float64)
    moments = correction.input_moments(_context(model), "out")
    samples = np.maximum(np.random.default_rng(6).normal(beta - 1, gamma * math.sqrt(2), (400_000, 4)), 0)
    np.testing.assert_allclose(moments.mean, samples.mean(axis=0), atol=0.01 * samples.std(axis=0).max())
    np.testing.assert_allclose(moments.var, samples.var(axis=0), rtol=0.02, atol=1e-3)
    assert moments.source == "the statistics of BatchNormalization 'bn0' through Add 'add' through Relu 'relu'"


def test_a_function_of_two_tensors_is_no_activation():
    # relu(n0) · n0b: two sources; not an Add, so no rule for it: unknown
    model = constant_input_model(channels=4)
    model.graph.node.insert(2, helper.make_node("BatchNormalization", ["c0", "g0", "b0", "m0", "v0"], ["n0b"]))
    model.graph.node.append(helper.make_node("Mul", ["r0", "n0b"], ["product"]))
    assert correction.input_moments(_context(model), "product") is None


def test_moments_add_over_a_sum_and_join_over_a_concat():
    model = constant_input_model(channels=4)
    nodes = model.graph.node
    nodes.append(helper.make_node("Add", ["n0", "n0b"], ["sum"]))
    nodes.append(helper.make_node("Concat", ["n0", "sum"], ["joined"], axis=1))
    nodes.insert(2, helper.make_node("BatchNormalization", ["c0", "g0", "b1x", "m0", "v0"], ["n0b"]))
    model.graph.initializer.append(numpy_helper.from_array(np.full(4, 3, np.float16), "b1x"))
    ctx = _context(model)
    gamma, beta = (
        numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer if t.name in ("g0", "b0")
    )
    moments = correction.input_moments(ctx, "joined")
    np.testing.assert_allclose(moments.mean, np.concatenate([beta, beta + 3]))
    np.testing.assert_allclose(moments.var, np.concatenate([gamma**2, 2 * gamma**2]))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_rounding_toward_moments_keeps_each_weight_next_to_its_exact_value(dtype):
    rng = np.random.default_rng(3)
    weight = rng.normal(0, 0.05, (16, 8, 3, 3))
    bias = rng.normal(0, 1, 16)
    mean, var = rng.uniform(0, 2, 8), rng.uniform(0.1, 1, 8)
    rounded, rounded_bias = affine.cast_conv_toward_moments(weight, bias, dtype, 1, mean, var)
    nearest = weight.astype(dtype)
    # each weight is one of the two values of `dtype` around its exact value
    up, down = affine._step(nearest, np.full(weight.shape, True)), affine._step(nearest, np.full(weight.shape, False))
    below = np.where(nearest.astype(np.float64) > weight, down, nearest)
    above = np.where(nearest.astype(np.float64) < weight, up, nearest)
    assert ((rounded == below) | (rounded == above)).all()
    np.testing.assert_array_equal(rounded_bias, bias.astype(dtype))

    def mean_shift(w):  # the expected output error per channel: Σ δ·E[x] + δ_b
        return (w.astype(np.float64) - weight).sum(axis=(2, 3)) @ mean + (rounded_bias.astype(np.float64) - bias)

    assert np.abs(mean_shift(rounded)).max() < 0.2 * np.abs(mean_shift(nearest)).max()


def _set(model: onnx.ModelProto, name: str, values: np.ndarray) -> None:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float16), name))


def _context(model: onnx.ModelProto):
    from bnfold.graph.context import GraphContext, ModelScope
    from bnfold.graph.tensors import Names, TensorStore

    scope = ModelScope(model.ir_version, 17, list(model.opset_import), Names([]), TensorStore(numpy_helper.to_array))
    return GraphContext.build(model.graph, scope)
