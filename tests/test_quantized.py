"""BatchNormalization folded into quantized weights (bnfold.folding.quantized): the scale goes
into the weight's DequantizeLinear scale, the integers stay byte for byte.

The models are made by onnxruntime.quantization (quantize_static, QDQ format, per tensor and per
channel) from a Conv → BN → Relu model whose BN was not folded first, with the quantizer on the
conv's output taken out: the form a quantization-aware-training export has, where the BN (or
the Div by its scale factor) follows the conv directly. Every fold is checked by structure (BN
gone, integers unchanged), by numbers (onnxruntime with optimizations off, against the
original), and by onnx.checker; every refusal leaves the model unchanged."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import assert_refused, conv_bn_model, make_model, op_types, random_inputs, run
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import bnfold


class _Reader(CalibrationDataReader):
    def __init__(self, model: onnx.ModelProto):
        self.feeds = iter([random_inputs(model, seed) for seed in range(4)])

    def get_next(self):
        return next(self.feeds, None)


def quantize(float_model: onnx.ModelProto, tmp_path, per_channel: bool, op_types=None) -> onnx.ModelProto:
    """`float_model` as onnxruntime's quantize_static makes it: QDQ format, int8 weights, an int32
    bias behind its own DequantizeLinear, a quantizer on every quantized op's output."""
    onnx.save(float_model, tmp_path / "float.onnx")
    quantize_static(
        str(tmp_path / "float.onnx"), str(tmp_path / "qdq.onnx"), _Reader(float_model), quant_format=QuantFormat.QDQ,
        per_channel=per_channel, op_types_to_quantize=op_types, weight_type=QuantType.QInt8,
    )  # fmt: skip
    return onnx.load(str(tmp_path / "qdq.onnx"))


def quantized(tmp_path, per_channel: bool, *, bias: bool = True) -> onnx.ModelProto:
    """conv_bn_model quantized (only its Conv), then the quantizer on the conv's output removed:
    Conv → BN directly."""
    model = without_the_convs_quantizer(quantize(conv_bn_model(bias=bias, opset=17), tmp_path, per_channel, ["Conv"]))
    onnx.checker.check_model(model, full_check=True)
    return model


def without_the_convs_quantizer(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (changed here) with the QuantizeLinear → DequantizeLinear pair on its Conv's output
    taken out: the BN reads the Conv directly."""
    graph = model.graph
    conv = next(n for n in graph.node if n.op_type == "Conv")
    quantizer = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == conv.output[0])
    dequantizer = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == quantizer.output[0])
    next(n for n in graph.node if n.op_type == "BatchNormalization").input[0] = conv.output[0]
    graph.node.remove(quantizer)
    graph.node.remove(dequantizer)
    return model


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def dequantizer_of(model: onnx.ModelProto, node_type: str, position: int) -> onnx.NodeProto:
    """The DequantizeLinear that makes input `position` of the first `node_type` node."""
    name = next(n for n in model.graph.node if n.op_type == node_type).input[position]
    return next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == name)


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_bn_after_a_quantized_conv_folds_into_the_weight_scale(tmp_path, per_channel):
    model = quantized(tmp_path, per_channel)
    result = bnfold.fold(model)
    folded = result.model
    assert result.report.folded == 1 and "BatchNormalization" not in op_types(folded)
    onnx.checker.check_model(folded, full_check=True)
    before, after = initializers(model), initializers(folded)
    weight, bias = dequantizer_of(folded, "Conv", 1), dequantizer_of(folded, "Conv", 2)
    # the integer weights and their zero points are the same bytes; the scale is per channel now
    original_weight = dequantizer_of(model, "Conv", 1)
    assert weight.input[0] == original_weight.input[0] and after[weight.input[0]].dtype == np.int8
    assert after[weight.input[1]].shape == (6,) and helper.get_node_attr_value(weight, "axis") == 0
    assert np.array_equal(np.broadcast_to(before[original_weight.input[2]], (6,)), after[weight.input[2]])
    # the bias is still int32 behind a DequantizeLinear whose scale is the input's × the weight's
    x_scale = before["x_scale"]
    assert after[bias.input[0]].dtype == np.int32
    np.testing.assert_allclose(after[bias.input[1]], x_scale * after[weight.input[1]], rtol=1e-6)
    assert "int32 bias requantized: at most 0." in result.report.outcomes[0].via
    # the requantized bias is at most half a step of its new scale off; the rest is float32's
    feeds = random_inputs(model)
    (want,), (got,) = run(model, feeds), run(folded, feeds)
    half_step = 0.5 * after[bias.input[1]].reshape(1, -1, 1, 1)
    assert (np.abs(got - want) <= half_step + 1e-5 * np.abs(want).max()).all()


def _loudest_up(values: np.ndarray) -> np.ndarray:
    return values + np.where(np.abs(values) == np.abs(values).max(), 0.03 * np.abs(values), 0)


MISTAKES = {  # (the Conv input whose DequantizeLinear holds it, which of its inputs, the change)
    "one channel's weight scale ×1.01": (1, 1, lambda v: v * np.where(np.arange(v.size) == 2, 1.01, 1.0)),
    "the loudest channel's int32 bias 3% off": (2, 0, _loudest_up),
    "one channel's weight zero point off by one": (1, 2, lambda v: v + (np.arange(v.size) == 2)),
}


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("mistake", MISTAKES)
def test_the_fold_verifies_and_a_seeded_mistake_fails_at_its_site(tmp_path, per_channel, mistake):
    model = quantized(tmp_path, per_channel)
    onnx.save(model, tmp_path / "model.onnx")
    folded = bnfold.fold(model).model
    onnx.save(folded, tmp_path / "folded.onnx")
    report = bnfold.verify(tmp_path / "model.onnx", tmp_path / "folded.onnx")
    assert report.equivalent and report.sites, report.table()
    position, slot, change = MISTAKES[mistake]
    tensor_name = dequantizer_of(folded, "Conv", position).input[slot]
    tensor = next(t for t in folded.graph.initializer if t.name == tensor_name)
    values = numpy_helper.to_array(tensor)
    changed = change(values.astype(np.float64))
    changed = np.round(changed) if values.dtype.kind == "i" else changed
    tensor.CopyFrom(numpy_helper.from_array(changed.astype(values.dtype), tensor_name))
    onnx.save(folded, tmp_path / "mistaken.onnx")
    report = bnfold.verify(tmp_path / "model.onnx", tmp_path / "mistaken.onnx")
    assert not report.equivalent and not report.sites[0].passed, report.table()


def qat_export(
    tmp_path, *, divide: bool, gamma_sign: float = 1.0, fake_quant: bool = False, int32_bias: bool = False
) -> onnx.ModelProto:
    """What an eager-mode QAT export of a fused ConvBnReLU2d looks like: Conv(DQ(x), DQ(W per
    channel), b) → Div by the BN's scale factor → BatchNormalization → Relu → QuantizeLinear.
    With `fake_quant`, as torch.onnx exports one (FakeQuantize, not converted): the weight's
    integers are QuantizeLinear(W·factor) of float constants, computed at run time. With
    `int32_bias`, the bias is int32 behind a DequantizeLinear at the input's × the weight's scale,
    as onnxruntime's quantizer writes it."""
    rng = np.random.default_rng(5)
    channels = 8
    weight = rng.normal(0, 0.3, (channels, 3, 3, 3))
    steps = np.abs(weight).reshape(channels, -1).max(axis=1) / 127
    gamma = rng.uniform(0.5, 1.5, channels) * gamma_sign
    var = rng.uniform(0.5, 1.5, channels)
    values = {
        "qw": np.round(weight / steps[:, None, None, None]).astype(np.int8),
        "sw": steps.astype(np.float32), "zw": np.zeros(channels, np.int8),
        "b": rng.normal(0, 0.1, channels).astype(np.float32),
        "factor": (gamma / np.sqrt(var + 1e-5)).reshape(1, channels, 1, 1).astype(np.float32),
        "sx": np.float32(0.02), "zx": np.uint8(128), "sy": np.float32(0.03), "zy": np.uint8(0),
        "g": gamma.astype(np.float32), "be": rng.normal(0, 0.1, channels).astype(np.float32),
        "m": rng.normal(0, 0.1, channels).astype(np.float32), "v": var.astype(np.float32),
    }  # fmt: skip
    conv_out = "div" if divide else "conv"
    fake = []
    if fake_quant:  # the integers from the float weight scaled by the factor, at run time
        values["w"] = (values.pop("qw").astype(np.float32) * steps[:, None, None, None]).astype(np.float32)
        values["w"] /= values["factor"].reshape(channels, 1, 1, 1)
        fake = [helper.make_node("Mul", ["w", "factor_w"], ["w_scaled"]),
                helper.make_node("QuantizeLinear", ["w_scaled", "sw", "zw"], ["qw"], axis=0)]  # fmt: skip
        values["factor_w"] = values["factor"].reshape(channels, 1, 1, 1)
    bias = "b"
    if int32_bias:
        values["qb"] = np.round(values.pop("b") / (0.02 * steps)).astype(np.int32)
        values["sb"] = (0.02 * steps).astype(np.float32)
        fake.append(helper.make_node("DequantizeLinear", ["qb", "sb"], ["bd"], axis=0))
        bias = "bd"
    nodes = [
        *fake,
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["qw", "sw", "zw"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd", bias], ["conv"], pads=[1, 1, 1, 1]),
        *([helper.make_node("Div", ["conv", "factor"], ["div"])] if divide else []),
        helper.make_node("BatchNormalization", [conv_out, "g", "be", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["relu"]),
        helper.make_node("QuantizeLinear", ["relu", "sy", "zy"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "qat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 16, 16])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in values.items()],
    )  # fmt: skip
    return make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def optimized_ops(model: onnx.ModelProto, tmp_path) -> collections.Counter:
    """The op types in onnxruntime's own fully optimized graph of `model`."""
    onnx.save(model, tmp_path / "to_optimize.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "to_optimize.onnx"), options, providers=["CPUExecutionProvider"])
    return collections.Counter(op_types(onnx.load(str(tmp_path / "optimized.onnx"))))


# onnxruntime 1.32 quantizes a float bias itself when it fuses DQ → Conv → Q; 1.20 fuses only a
# conv whose bias is int32 behind a DequantizeLinear (or that has none)
FUSES_FLOAT_BIAS = tuple(int(v) for v in ort.__version__.split(".")[:2]) >= (1, 32)


@pytest.mark.parametrize(
    "divide, fake_quant, int32_bias",
    [(False, False, False), (True, False, False), (True, True, False), (True, False, True)],
)
def test_a_qat_export_folds_and_its_conv_becomes_an_integer_kernel(tmp_path, divide, fake_quant, int32_bias):
    model = qat_export(tmp_path, divide=divide, fake_quant=fake_quant, int32_bias=int32_bias)
    assert "QLinearConv" not in optimized_ops(model, tmp_path)  # float BN between the conv and its quantizer
    result = bnfold.fold(model)
    folded = result.model
    assert result.report.folded == 1 and "BatchNormalization" not in op_types(folded)
    assert op_types(folded).count("Div") == 0 and op_types(folded).count("Conv") == 1
    onnx.checker.check_model(folded, full_check=True)
    weights = "w" if fake_quant else "qw"  # the integers, or the float weight they are computed from
    assert initializers(folded)[weights].tobytes() == initializers(model)[weights].tobytes()
    assert optimized_ops(folded, tmp_path)["QLinearConv"] == (1 if int32_bias or FUSES_FLOAT_BIAS else 0)
    onnx.save(model, tmp_path / "model.onnx")
    onnx.save(folded, tmp_path / "folded.onnx")
    report = bnfold.verify(tmp_path / "model.onnx", tmp_path / "folded.onnx")
    assert report.equivalent, report.table()


# ---- refusals: each leaves the model unchanged --------------------------------------------------------
def test_a_negative_bn_scale_is_refused(tmp_path):
    model = qat_export(tmp_path, divide=False, gamma_sign=-1.0)
    assert_refused(model, "the weight's DequantizeLinear scale would not stay positive")


@pytest.mark.parametrize("shared", ["wd", "bd"], ids=["weight", "int32 bias"])
def test_a_dequantizer_another_node_reads_is_copied_for_the_conv(tmp_path, shared):
    # A ReduceSum (a graph output) reads the weight's (or the int32 bias's) DequantizeLinear too:
    # the Conv gets a copy to rescale, reading the same integers; the ReduceSum keeps the original.
    model = qat_export(tmp_path, divide=False, int32_bias=True)
    model.graph.node.append(helper.make_node("ReduceSum", [shared], ["total"], keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, []))
    result = bnfold.fold(model)
    folded = result.model
    assert result.report.folded == 1 and "BatchNormalization" not in op_types(folded), result.report.table()
    onnx.checker.check_model(folded, full_check=True)
    dequantizers = {n.output[0]: n for n in folded.graph.node if n.op_type == "DequantizeLinear"}
    original = next(n for n in model.graph.node if n.output and n.output[0] == shared)
    assert dequantizers[shared].input == original.input  # what the ReduceSum reads: untouched
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    position = 1 if shared == "wd" else 2
    copy = dequantizers[conv.input[position]]  # the Conv's own, with a new scale
    assert copy is not dequantizers[shared] and copy.input[1] != original.input[1]
    for name in {"qw", *original.input}:  # the weight's integers, and all the original reads
        assert initializers(folded)[name].tobytes() == initializers(model)[name].tobytes()
    onnx.save(model, tmp_path / "model.onnx")
    onnx.save(folded, tmp_path / "folded.onnx")
    report = bnfold.verify(tmp_path / "model.onnx", tmp_path / "folded.onnx")
    assert report.equivalent and {o.name for o in report.outputs} == {"y", "total"}, report.table()
    assert next(o for o in report.outputs if o.name == "total").max_abs_error == 0.0
    for mistake in ("one channel's scale ×1.01", "the loudest int32 bias 3% off"):  # in the Conv's copy
        wrong = onnx.ModelProto()
        wrong.CopyFrom(folded)
        tensors = {t.name: t for t in wrong.graph.initializer}
        if mistake.startswith("one"):
            tensor = tensors[dequantizers[conv.input[1]].input[1]]
            values = numpy_helper.to_array(tensor).copy()
            values[3] *= 1.01
        else:
            tensor = tensors[dequantizers[conv.input[2]].input[0]]
            values = numpy_helper.to_array(tensor).copy()
            loudest = np.argmax(np.abs(values))
            values[loudest] = np.int32(round(values[loudest] * 1.03))
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
        onnx.save(wrong, tmp_path / "wrong.onnx")
        assert not bnfold.verify(tmp_path / "model.onnx", tmp_path / "wrong.onnx").equivalent, mistake


def test_two_convs_that_share_a_weight_dequantizer_both_fold(tmp_path):
    # conv → BN and conv2 → BN2 read one DequantizeLinear: the first fold copies it, the second
    # rescales what is then its own.
    model = qat_export(tmp_path, divide=False)
    graph = model.graph
    rng = np.random.default_rng(9)
    bn2 = [numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), f"{k}2") for k in ("g", "v")]
    bn2 += [numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), f"{k}2") for k in ("be", "m")]
    graph.initializer.extend(bn2)
    graph.node.extend([
        helper.make_node("Conv", ["xd", "wd", "b"], ["conv2"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv2", "g2", "be2", "m2", "v2"], ["y2"]),
    ])  # fmt: skip
    graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 8, 16, 16]))
    result = bnfold.fold(model)
    folded = result.model
    assert result.report.folded == 2 and "BatchNormalization" not in op_types(folded), result.report.table()
    assert op_types(folded).count("DequantizeLinear") == op_types(model).count("DequantizeLinear") + 1
    assert initializers(folded)["qw"].tobytes() == initializers(model)["qw"].tobytes()
    onnx.checker.check_model(folded, full_check=True)
    onnx.save(model, tmp_path / "model.onnx")
    onnx.save(folded, tmp_path / "folded.onnx")
    report = bnfold.verify(tmp_path / "model.onnx", tmp_path / "folded.onnx")
    assert report.equivalent, report.table()


def test_a_scale_on_the_input_channel_axis_is_refused(tmp_path):
    model = qat_export(tmp_path, divide=False)
    weight = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "wd")
    weight.attribute[0].i = 1
    steps = np.full(3, 0.01, np.float32)
    for name, value in (("sw", steps), ("zw", np.zeros(3, np.int8))):
        tensor = next(t for t in model.graph.initializer if t.name == name)
        tensor.CopyFrom(numpy_helper.from_array(value, name))
    assert_refused(model, "scales axis 1 ([3]), not the weight's output channels (axis 0, 8)")


def test_blocked_quantization_is_refused(tmp_path):
    model = qat_export(tmp_path, divide=False)
    weight = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "wd")
    weight.attribute.append(helper.make_attribute("block_size", 3))
    assert_refused(model, "is blocked (block_size)", check=False)


# ---- across a quantizer, on request (--requantize) ----------------------------------------------------
@pytest.mark.parametrize("per_channel", [False, True])
def test_a_bn_behind_the_convs_quantizer_folds_only_with_requantize(tmp_path, per_channel):
    # quantize_static of a model whose BN was not folded first: Conv → Q → DQ → BN → Q → DQ, the
    # BN's own scale quantized as a weight
    model = quantize(conv_bn_model(opset=17), tmp_path, per_channel)
    assert_refused(model, "a fold across a quantizer is not exact; fold before quantizing, or fold with --requantize")
    result = bnfold.fold(model, requantize=True)
    folded = result.model
    onnx.checker.check_model(folded, full_check=True)
    before, after = collections.Counter(op_types(model)), collections.Counter(op_types(folded))
    assert after["BatchNormalization"] == 0 and after["QuantizeLinear"] == before["QuantizeLinear"] - 1
    assert "removed (--requantize)" in result.report.outcomes[0].via
    assert result.report.notes[0].startswith("1 quantizer removed (--requantize)")
    weight = dequantizer_of(folded, "Conv", 1)
    assert initializers(folded)[weight.input[0]].tobytes() == initializers(model)[weight.input[0]].tobytes()
    onnx.save(model, tmp_path / "model.onnx")
    onnx.save(folded, tmp_path / "folded.onnx")
    # against the original with the removed pair bypassed: float noise, judged where the fold acts
    report = bnfold.verify(tmp_path / "model.onnx", tmp_path / "folded.onnx", requantize=True)
    assert report.equivalent and report.sites, report.table()
    assert report.notes[0].startswith("note: --requantize: judged against the original with the 1 quantizer pair")
    assert any(n.startswith("note: the removed quantizers clipped ") for n in report.notes), report.notes
    scale = next(t for t in folded.graph.initializer if t.name == weight.input[1])
    values = numpy_helper.to_array(scale).copy()
    values[2] *= 1.01
    scale.CopyFrom(numpy_helper.from_array(values, scale.name))
    onnx.save(folded, tmp_path / "mistaken.onnx")
    report = bnfold.verify(tmp_path / "model.onnx", tmp_path / "mistaken.onnx", requantize=True)
    assert not report.equivalent and not report.sites[0].passed, report.table()


def test_optimize_with_requantize_verifies_against_the_bypassed_original(tmp_path):
    from typer.testing import CliRunner

    from bnfold.cli import app

    onnx.save(quantize(conv_bn_model(opset=17), tmp_path, True), tmp_path / "model.onnx")
    out = str(tmp_path / "out.onnx")
    refused = CliRunner().invoke(app, ["optimize", str(tmp_path / "model.onnx"), "-o", out])
    assert refused.exit_code == 0 and "folded 0 of 1" in refused.stderr
    result = CliRunner().invoke(app, ["optimize", str(tmp_path / "model.onnx"), "-o", out, "--requantize"])
    assert result.exit_code == 0, result.output
    assert "folded 1 of 1" in result.stderr and "note: --requantize: judged against the original" in result.stderr
    assert "BatchNormalization" not in op_types(onnx.load(out))


def relu_before_bn(tmp_path) -> onnx.ModelProto:
    """Conv → Relu → BN, quantized: quantize_static removes the Relu and lets the quantizer on
    its output (uint8, zero point 0) clip the negatives instead: Conv → Q → DQ → BN."""
    from builders import insert_between_conv_and_bn

    float_model = conv_bn_model(opset=17)
    insert_between_conv_and_bn(float_model, helper.make_node("Relu", ["conv_out"], ["relu_out"]))
    model = quantize(float_model, tmp_path, True)
    assert "Relu" not in op_types(model)
    return model


def test_with_requantize_a_quantizer_that_holds_a_fused_relu_is_not_removed(tmp_path):
    # removing it would remove the Relu: the function changes, not just a rounding
    model = relu_before_bn(tmp_path)
    before = model.SerializeToString(deterministic=True)
    result = bnfold.fold(model, requantize=True)
    assert result.model.SerializeToString(deterministic=True) == before
    (outcome,) = result.report.outcomes
    assert outcome.reason.startswith("the quantizer before it, QuantizeLinear 'relu_out_QuantizeLinear', clips at zero")


def test_verify_requantize_does_not_bypass_a_quantizer_that_holds_a_fused_relu(tmp_path):
    # a tool that removed it anyway (the fold without the check) is wrong, and verify says so
    model = relu_before_bn(tmp_path)
    onnx.save(model, tmp_path / "model.onnx")
    onnx.save(without_the_convs_quantizer(model), tmp_path / "relu_removed.onnx")
    report = bnfold.verify(tmp_path / "model.onnx", tmp_path / "relu_removed.onnx", requantize=True)
    assert not report.equivalent and "clips at zero" in report.notes[0], report.table()


def zero_points_as_pytorch_writes_them(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (changed here) with each activation quantizer's zero point computed at run time
    from a Constant, as torch.onnx exports a FakeQuantize: Constant (int32) → Cast (uint8)."""
    graph = model.graph
    weights = {n.input[2] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in
               {t.name for t in graph.initializer}}  # fmt: skip
    for tensor in [t for t in graph.initializer if t.name.endswith("zero_point") and t.name not in weights]:
        value = numpy_helper.to_array(tensor)
        const, cast = f"{tensor.name}_int", f"{tensor.name}_cast"
        graph.node.insert(0, helper.make_node("Cast", [const], [cast], to=tensor.data_type))
        graph.node.insert(
            0, helper.make_node("Constant", [], [const], value=numpy_helper.from_array(value.astype(np.int32)))
        )
        for node in graph.node:
            node.input[:] = [cast if name == tensor.name else name for name in node.input]
    return model


def test_requantize_reads_zero_points_pytorch_computes_at_run_time(tmp_path):
    # A PyTorch QAT export with an observer after each conv (Conv → Q → DQ → BN): each zero point
    # is a Cast of a Constant. verify --requantize crashed (exit 3) reading them as initializers,
    # and so could not see a quantizer that clips at zero either.
    model = zero_points_as_pytorch_writes_them(quantize(conv_bn_model(opset=17), tmp_path, True))
    folded = bnfold.fold(model, requantize=True).model
    assert "BatchNormalization" not in op_types(folded)
    onnx.save(model, tmp_path / "model.onnx")
    onnx.save(folded, tmp_path / "folded.onnx")
    report = bnfold.verify(tmp_path / "model.onnx", tmp_path / "folded.onnx", requantize=True)
    assert report.equivalent, report.table()
    relu = zero_points_as_pytorch_writes_them(relu_before_bn(tmp_path))
    onnx.save(relu, tmp_path / "relu.onnx")
    onnx.save(without_the_convs_quantizer(relu), tmp_path / "relu_removed.onnx")
    report = bnfold.verify(tmp_path / "relu.onnx", tmp_path / "relu_removed.onnx", requantize=True)
    assert not report.equivalent and "clips at zero" in report.notes[0], report.table()


def test_the_share_of_inputs_a_removed_quantizer_clipped_is_counted(tmp_path):
    from bnfold.verification.quantizers import bypass_removed

    def model(with_pair: bool) -> onnx.ModelProto:
        nodes = [helper.make_node("Neg", ["x"], ["t"])]
        if with_pair:  # int8, zero point 0: the range is [-1.28, 1.27], and it clips nothing at zero
            nodes += [helper.make_node("QuantizeLinear", ["t", "s", "z"], ["q"]),
                      helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"])]  # fmt: skip
        nodes.append(helper.make_node("Identity", ["d" if with_pair else "t"], ["y"]))
        graph = helper.make_graph(
            nodes, "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
            [numpy_helper.from_array(np.float32(0.01), "s"), numpy_helper.from_array(np.int8(0), "z")],
        )  # fmt: skip
        return make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    bypass = bypass_removed(model(True), model(False))
    assert bypass.refusal is None and "the 1 quantizer pair the fold removed" in bypass.note
    # -2 and 3 (negated) fall outside [-1.28, 1.27]: 2 of the 8 values of the two trials
    feeds = [{"x": np.array([0.5, -2.0, 3.0, 1.0], np.float32)}, {"x": np.array([0.1, 0.2, 0.3, 0.4], np.float32)}]
    assert bypass.clipped(feeds, ["CPUExecutionProvider"]).startswith("the removed quantizers clipped 25.00% of")


def _as_int4(name: str, values: np.ndarray) -> np.ndarray:
    import ml_dtypes

    values = values.astype(np.float64)
    return (np.clip(np.round(values / 16), -8, 7) if name == "qw" else values).astype(ml_dtypes.int4)


def _as_float8(name: str, values: np.ndarray) -> np.ndarray:  # float8 keeps the integers' values; its zero point is 0
    import ml_dtypes

    return (values.astype(np.float32) * (0.25 if name == "qw" else 0.0)).astype(ml_dtypes.float8_e4m3fn)


@pytest.mark.parametrize(
    "convert, opset", [(_as_int4, 21), (_as_float8, 19)], ids=["int4", "float8"]
)  # DequantizeLinear-21 reads int4, DequantizeLinear-19 float8
def test_narrow_weights_fold_into_their_scale_and_stay_the_same_bytes(tmp_path, convert, opset):
    model = qat_export(tmp_path, divide=False)
    for tensor in model.graph.initializer:
        if tensor.name in ("qw", "zw"):
            tensor.CopyFrom(numpy_helper.from_array(convert(tensor.name, numpy_helper.to_array(tensor)), tensor.name))
    model.opset_import[0].version = opset
    onnx.checker.check_model(model, full_check=True)
    folded = bnfold.fold(model).model
    assert "BatchNormalization" not in op_types(folded)
    assert initializers(folded)["qw"].tobytes() == initializers(model)["qw"].tobytes()
    onnx.save(model, tmp_path / "model.onnx")
    onnx.save(folded, tmp_path / "folded.onnx")
    report = bnfold.verify(tmp_path / "model.onnx", tmp_path / "folded.onnx")
    assert report.equivalent and report.sites, report.table()


def test_bench_requantize_times_the_quantized_model_before_and_after(tmp_path):
    import json

    from typer.testing import CliRunner

    from bnfold.cli import app

    onnx.save(quantize(conv_bn_model(opset=17), tmp_path, True), tmp_path / "model.onnx")
    result = CliRunner().invoke(app, ["bench", str(tmp_path / "model.onnx"), "--requantize", "--runs", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fold_summary"].startswith("folded 1 of 1") and len(report["timings"]) == 4


def test_below_opset_13_a_per_tensor_weight_scale_cannot_become_per_channel(tmp_path):
    # onnxruntime's quantizer on an opset-11 recognizer (rapidocr's PP-OCR classifier): the BN's
    # per-channel scale has nowhere to go, and a per-axis DequantizeLinear is invalid there
    model = qat_export(tmp_path, divide=False)
    weight = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "wd")
    del weight.attribute[:]
    for name, value in (("sw", np.float32(0.01)), ("zw", np.int8(0))):
        tensor = next(t for t in model.graph.initializer if t.name == name)
        tensor.CopyFrom(numpy_helper.from_array(np.asarray(value), name))
    model.opset_import[0].version = 12
    onnx.checker.check_model(model, full_check=True)
    assert_refused(model, "is DequantizeLinear-10 (opset 12): one scale per tensor")


def test_a_bn_scale_quantized_by_its_own_pair_is_no_removed_quantizer(tmp_path):
    # rapidocr's classifier through quantize_static: each BN's scale is QuantizeLinear(γ) →
    # DequantizeLinear, uint8 with zero point 0. That pair goes with the folded BN; verify
    # --requantize once took it for a removed activation quantizer and refused the correct fold.
    model = quantize(conv_bn_model(opset=17), tmp_path, True)
    graph = model.graph
    bn = next(n for n in graph.node if n.op_type == "BatchNormalization")
    scale = next(t for t in conv_bn_model(opset=17).graph.initializer if t.name == "gamma")
    graph.initializer.extend([numpy_helper.from_array(numpy_helper.to_array(scale), "gamma_float"),
                              numpy_helper.from_array(np.float32(0.01), "gamma_step"),
                              numpy_helper.from_array(np.uint8(0), "gamma_zero")])  # fmt: skip
    graph.node.insert(0, helper.make_node("QuantizeLinear", ["gamma_float", "gamma_step", "gamma_zero"], ["gamma_q"]))
    graph.node.insert(1, helper.make_node("DequantizeLinear", ["gamma_q", "gamma_step", "gamma_zero"], ["gamma_d"]))
    bn.input[1] = "gamma_d"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, tmp_path / "model.onnx")
    folded = bnfold.fold(model, requantize=True).model
    assert "BatchNormalization" not in op_types(folded)
    onnx.save(folded, tmp_path / "folded.onnx")
    report = bnfold.verify(tmp_path / "model.onnx", tmp_path / "folded.onnx", requantize=True)
    assert report.equivalent, report.table()
