"""Conv → BatchNormalization folds: structure (BN gone), numbers (onnxruntime, optimizations off,
against the original), then onnx.checker."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from builders import (
    assert_same_function,
    conv_bn_model,
    op_types,
    random_inputs,
    run,
    widen_floats,
)
from onnx import helper, numpy_helper

import bnfold


def fold_and_check(model: onnx.ModelProto, feeds=None) -> onnx.ModelProto:
    result = bnfold.fold(model)
    folded = result.model
    assert "BatchNormalization" not in op_types(folded)
    assert op_types(folded).count("Conv") == op_types(model).count("Conv")
    assert [o.folded for o in result.report.outcomes] == [True] * op_types(model).count("BatchNormalization")
    assert_same_function(model, folded, feeds)
    onnx.checker.check_model(folded, full_check=True)
    return folded


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("group", ["1", "2", "depthwise"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_of_any_rank_group_and_bias(rank, group, bias):
    groups = {"1": 1, "2": 2, "depthwise": 4}[group]
    cout = 8 if group != "depthwise" else 4
    model = conv_bn_model(rank=rank, cin=4, cout=cout, group=groups, bias=bias, spatial=6 if rank == 3 else 9)
    folded = fold_and_check(model)
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 3  # a bias-less conv gains the folded bias
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]  # the ReLU stays


@pytest.mark.parametrize("epsilon", [None, 1e-3, 0.1])
def test_epsilon_is_read_from_the_node(epsilon):
    # var as small as 1e-3 makes ε matter: folding with the wrong ε would be far off.
    model = conv_bn_model(epsilon=epsilon)
    var = next(t for t in model.graph.initializer if t.name == "var")
    var.CopyFrom(numpy_helper.from_array(np.full(6, 1e-3, np.float32), "var"))
    fold_and_check(model)


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 14, 15, 17, 21])
def test_every_batch_norm_version(opset):
    fold_and_check(conv_bn_model(opset=opset))


def test_batch_norm_6_in_test_mode_folds_with_ir3_initializer_inputs():
    # BatchNormalization-6 has no onnxruntime kernel, so the original runs in onnx's reference
    # evaluator; the folded model (Conv + Relu) runs in both.
    from onnx.reference import ReferenceEvaluator

    model = conv_bn_model(opset=6, bn_attrs={"is_test": 1}, ir_version=3)
    folded = bnfold.fold(model).model
    assert op_types(folded) == ["Conv", "Relu"]
    # IR v3 lists initializers as inputs: the old ones go, the new ones are listed.
    assert {i.name for i in folded.graph.input} == {"x"} | {t.name for t in folded.graph.initializer}
    feeds = random_inputs(model)
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    got = run(folded, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    onnx.checker.check_model(folded, full_check=True)


@pytest.mark.parametrize(
    "conv_attrs",
    [
        {"strides": [2, 2]},
        {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
        {"pads": [0, 1, 2, 1], "strides": [1, 2]},
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
        {"auto_pad": "VALID"},
    ],
    ids=["strides", "dilations", "asymmetric-pads", "same-upper", "valid"],
)
def test_conv_attributes_are_kept(conv_attrs):
    model = conv_bn_model(conv_attrs=conv_attrs, spatial=11)
    folded = fold_and_check(model)
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    original = next(n for n in model.graph.node if n.op_type == "Conv")
    assert list(conv.attribute) == list(original.attribute)


def test_float64_folds_exactly():
    # onnxruntime's CPU provider has no float64 Conv: both models run in onnx's reference
    # evaluator, an independent numpy implementation.
    from onnx.reference import ReferenceEvaluator

    model = conv_bn_model(dtype=np.float64)
    result = bnfold.fold(model)
    assert op_types(result.model) == ["Conv", "Relu"] and result.report.folded == 1
    assert {t.data_type for t in result.model.graph.initializer} == {onnx.TensorProto.DOUBLE}
    onnx.checker.check_model(result.model, full_check=True)
    feeds = random_inputs(model)
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    got = ReferenceEvaluator(result.model).run(None, feeds)[0]
    assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max()


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_float16_folds_in_float64_and_stays_float16(seed):
    # The same network twice from one seed: in float32 (the original a float16 deployment is
    # judged against) and rounded to float16.
    original32 = conv_bn_model(dtype=np.float32, cin=16, cout=16, seed=seed)
    model = conv_bn_model(dtype=np.float16, cin=16, cout=16, seed=seed)
    folded = fold_and_check(model)
    assert {t.data_type for t in folded.graph.initializer} == {onnx.TensorProto.FLOAT16}
    # The fold deviates from the float32 original by no more than 1.3× the unfolded float16
    # model's own deviation (a margin over the ~1.0× measured on the sample models, BENCHMARKS.md).
    feeds = random_inputs(model)
    reference = run(original32, {k: v.astype(np.float32) for k, v in feeds.items()})[0]
    unfolded_error = np.abs(run(model, feeds)[0].astype(np.float64) - reference).mean()
    folded_error = np.abs(run(folded, feeds)[0].astype(np.float64) - reference).mean()
    assert folded_error <= 1.3 * unfolded_error


def test_bfloat16_weights_fold_in_float64():
    # onnxruntime's CPU provider has no bfloat16 Conv, so the numbers are checked on the
    # float32-widened models: the folded bfloat16 parameters must compute what the original
    # bfloat16 parameters compute, up to one bfloat16 rounding of the folded weights.
    model = conv_bn_model(dtype=ml_dtypes.bfloat16, seed=4, opset=22)  # Conv takes bfloat16 from Conv-22
    result = bnfold.fold(model)
    folded = result.model
    assert op_types(folded) == ["Conv", "Relu"] and result.report.folded == 1
    assert {t.data_type for t in folded.graph.initializer} == {onnx.TensorProto.BFLOAT16}
    onnx.checker.check_model(folded, full_check=True)
    feeds = {k: v.astype(np.float32) for k, v in random_inputs(model).items()}

    def widened(m: onnx.ModelProto) -> onnx.ModelProto:  # float32 Conv is the same from Conv-11 to 22,
        m = widen_floats(m)  # and onnxruntime < 1.21 loads opsets up to 21
        m.opset_import[0].version = 17
        return m

    want = run(widened(model), feeds)[0]
    got = run(widened(folded), feeds)[0]
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 2e-2 * scale  # bfloat16 keeps 8 bits: 2^-8 ≈ 4e-3 per weight


def test_parameters_from_constant_nodes_and_identity_chains():
    """TorchScript exports with constant folding off reach parameters through Identity chains and
    share one initializer between several BNs; Constant nodes are the other constant form."""
    model = conv_bn_model()
    graph = model.graph
    gamma = next(t for t in graph.initializer if t.name == "gamma")
    graph.node.insert(0, helper.make_node("Constant", [], ["gamma"], value=gamma))
    graph.initializer.remove(gamma)
    graph.node.insert(0, helper.make_node("Identity", ["var"], ["var_id1"], name="id1"))
    graph.node.insert(1, helper.make_node("Identity", ["var_id1"], ["var_id2"], name="id2"))
    bn = next(n for n in graph.node if n.op_type == "BatchNormalization")
    bn.input[4] = "var_id2"
    folded = fold_and_check(model)
    assert op_types(folded) == ["Conv", "Relu"]  # the Constant and Identity chain are swept


def test_one_initializer_shared_by_two_batch_norms():
    model = conv_bn_model()
    graph = model.graph
    # a second Conv → BN branch whose BN reads the very same parameter initializers
    graph.initializer.append(
        numpy_helper.from_array(np.random.default_rng(7).normal(0, 0.5, (6, 4, 3, 3)).astype(np.float32), "W2")
    )
    graph.node.extend(
        [
            helper.make_node("Conv", ["x", "W2"], ["c2"], name="conv2"),
            helper.make_node("BatchNormalization", ["c2", "gamma", "beta", "mean", "var"], ["y2"], name="bn2"),
        ]
    )
    graph.output.append(helper.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, [2, 6, 5, 5]))
    folded = fold_and_check(model)
    assert len(folded.graph.initializer) == 4  # two folded weights, two folded biases


def test_chained_batch_norms_both_fold():
    model = conv_bn_model()
    graph = model.graph
    rng = np.random.default_rng(5)
    for key, value in {
        "g2": rng.uniform(0.5, 1.5, 6),
        "b2": rng.normal(0, 1, 6),
        "m2": rng.normal(0, 1, 6),
        "v2": rng.uniform(0.5, 2, 6),
    }.items():
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), key))
    relu = graph.node[2]
    relu.input[0] = "bn2_out"
    graph.node.insert(
        2, helper.make_node("BatchNormalization", ["bn_out", "g2", "b2", "m2", "v2"], ["bn2_out"], name="bn2")
    )
    folded = fold_and_check(model)
    assert op_types(folded) == ["Conv", "Relu"]


def test_batch_norm_output_that_is_a_graph_output_keeps_its_name():
    # onnxruntime's own fusion declines this case; the folded Conv simply takes over the name.
    model = conv_bn_model()
    model.graph.output.append(helper.make_tensor_value_info("bn_out", onnx.TensorProto.FLOAT, [2, 6, 5, 5]))
    folded = fold_and_check(model)
    assert [o.name for o in folded.graph.output] == ["y", "bn_out"]
    assert next(n for n in folded.graph.node if n.op_type == "Conv").output[0] == "bn_out"


def test_shared_weight_is_not_altered_for_its_other_reader():
    model = conv_bn_model()
    graph = model.graph
    graph.node.append(helper.make_node("Conv", ["x", "W", "B"], ["plain"], name="plain_conv"))
    graph.output.append(helper.make_tensor_value_info("plain", onnx.TensorProto.FLOAT, [2, 6, 5, 5]))
    original_w = numpy_helper.to_array(next(t for t in graph.initializer if t.name == "W")).copy()
    folded = fold_and_check(model)
    plain = next(n for n in folded.graph.node if n.name == "plain_conv")
    assert list(plain.input) == ["x", "W", "B"]
    kept_w = numpy_helper.to_array(next(t for t in folded.graph.initializer if t.name == "W"))
    np.testing.assert_array_equal(kept_w, original_w)
    conv = next(n for n in folded.graph.node if n.name == "conv")
    assert conv.input[1] not in ("W",) and conv.input[2] != "B"  # fresh names for folded tensors
