"""Every precondition of a fold, violated once: the model comes back unchanged, with the reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import assert_refused, conv_bn_model
from onnx import TensorProto, helper, numpy_helper


def assert_sole_outcome_refused(model: onnx.ModelProto, reason: str, *, check: bool = True) -> None:
    """assert_refused, for a model whose one candidate is the node refused."""
    result = assert_refused(model, reason, check=check)
    (outcome,) = result.report.outcomes
    assert not outcome.folded


def set_initializer(model: onnx.ModelProto, name: str, values) -> None:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(np.asarray(values, dtype=numpy_helper.to_array(tensor).dtype), name))


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


# ---- the BatchNormalization normalizes with batch statistics ------------------------------------
def test_training_mode():
    model = conv_bn_model(opset=15, bn_attrs={"training_mode": 1}, bn_outputs=("bn_out", "rm", "rv"))
    assert_sole_outcome_refused(model, "training_mode=1")


def test_declared_statistics_outputs_before_opset_14():
    # onnxruntime runs this form with batch statistics (measured: 6.4 off the reference evaluator).
    model = conv_bn_model(opset=9, bn_outputs=("bn_out", "m", "v", "sm", "sv"))
    assert_sole_outcome_refused(model, "declares statistics outputs")


def test_used_statistics_output():
    model = conv_bn_model(opset=9, bn_outputs=("bn_out", "running_mean", "v", "sm", "sv"))
    model.graph.output.append(helper.make_tensor_value_info("running_mean", TensorProto.FLOAT, [6]))
    assert_sole_outcome_refused(model, "statistics output 'running_mean' is used")


def test_is_test_0_in_batch_norm_6():
    model = conv_bn_model(opset=6, bn_attrs={"is_test": 0}, ir_version=3)
    assert_sole_outcome_refused(model, "is_test=0")


def test_spatial_0_in_batch_norm_7():
    model = conv_bn_model(opset=7, bn_attrs={"spatial": 0})
    assert_sole_outcome_refused(model, "spatial=0")


# ---- the conv's output is needed elsewhere ------------------------------------------------------
def test_conv_output_has_another_reader():
    model = conv_bn_model()
    model.graph.node.append(helper.make_node("Sigmoid", ["conv_out"], ["gate"], name="gate"))
    model.graph.output.append(helper.make_tensor_value_info("gate", TensorProto.FLOAT, [2, 6, 5, 5]))
    assert_sole_outcome_refused(model, "Conv 'conv' output also feeds Sigmoid 'gate'")


def test_conv_output_is_a_graph_output():
    model = conv_bn_model()
    model.graph.output.append(helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, [2, 6, 5, 5]))
    assert_sole_outcome_refused(model, "output 'conv_out' is also a graph output")


def test_conv_output_read_inside_a_subgraph():
    model = conv_bn_model()
    branch = helper.make_graph(
        [helper.make_node("Identity", ["conv_out"], ["branch_out"])],
        "branch",
        [],
        [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, [2, 6, 5, 5])],
    )
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(
        helper.make_node("If", ["cond"], ["picked"], name="if", then_branch=branch, else_branch=branch)
    )
    model.graph.output.append(helper.make_tensor_value_info("picked", TensorProto.FLOAT, [2, 6, 5, 5]))
    assert_sole_outcome_refused(model, "output also feeds If 'if'")


# ---- a parameter is not a constant --------------------------------------------------------------
@pytest.mark.parametrize(
    "name, shape, reason",
    [
        ("mean", [6], "BatchNormalization mean is not constant: 'mean' is a graph input"),
        ("W", [6, 4, 3, 3], "Conv weight is not constant: 'W' is a graph input"),
    ],
)
def test_parameter_is_a_graph_input(name, shape, reason):
    model = conv_bn_model()
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == name))
    model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    assert_sole_outcome_refused(model, reason)


@pytest.mark.parametrize(
    "reader, position, reason",
    [
        ("bn", 3, "BatchNormalization mean is not constant: 'runtime' is a graph input"),
        ("conv", 2, "Conv bias is not constant: 'runtime' is a graph input"),
    ],
)
def test_parameter_is_computed_from_a_graph_input(reader, position, reason):
    model = conv_bn_model()
    node(model, reader).input[position] = "computed"
    model.graph.node.insert(0, helper.make_node("Sqrt", ["runtime"], ["computed"], name="sqrt"))
    model.graph.input.append(helper.make_tensor_value_info("runtime", TensorProto.FLOAT, [6]))
    assert_sole_outcome_refused(model, reason)


def test_parameter_from_an_op_bnfold_does_not_evaluate():
    model = conv_bn_model()
    node(model, "bn").input[3] = "computed"
    model.graph.node.insert(0, helper.make_node("Relu", ["mean"], ["computed"], name="relu_mean"))
    assert_sole_outcome_refused(
        model, "BatchNormalization mean is not constant: 'computed' is computed by Relu 'relu_mean'"
    )


def test_initializer_that_is_also_a_graph_input_can_be_overridden():
    model = conv_bn_model()  # IR version ≥ 4: the input is an overridable default
    model.graph.input.append(helper.make_tensor_value_info("var", TensorProto.FLOAT, [6]))
    assert_sole_outcome_refused(model, "can override it at run time")


# ---- the numbers do not allow it ----------------------------------------------------------------
def test_channel_count_mismatch():
    # Invalid for onnx's shape inference too, so the checker is off to reach the rule itself.
    model = conv_bn_model()
    for name in ("gamma", "beta", "mean", "var"):
        set_initializer(model, name, np.ones(4))
    assert_sole_outcome_refused(model, "has shape [4], but the 6-channel op next to it needs [6]", check=False)


def test_variance_plus_epsilon_not_positive():
    model = conv_bn_model()
    set_initializer(model, "var", [1, -1, 1, 1, -2, 1])
    assert_sole_outcome_refused(model, "variance + epsilon is not positive in 2 of 6 channels")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_statistics(bad):
    model = conv_bn_model()
    set_initializer(model, "mean", [0, bad, 0, 0, 0, 0])
    assert_sole_outcome_refused(model, "BatchNormalization mean 'mean' holds NaN or Inf")


def test_folded_float16_weights_would_overflow():
    model = conv_bn_model(dtype=np.float16)
    set_initializer(model, "W", np.full((6, 4, 3, 3), 60000.0))
    set_initializer(model, "gamma", np.full(6, 4.0))
    assert_sole_outcome_refused(model, "the folded weights overflow float16")


# ---- nothing to fold into -----------------------------------------------------------------------
def test_batch_norm_on_a_graph_input():
    model = conv_bn_model()
    node(model, "bn").input[0] = "x2"
    model.graph.input.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, [2, 6, 5, 5]))
    model.graph.output.append(helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, [2, 6, 5, 5]))
    assert_sole_outcome_refused(model, "its input 'x2' is a graph input")


def test_producer_is_not_a_supported_op():
    model = conv_bn_model()
    node(model, "bn").input[0] = "conv_relu"
    model.graph.node.insert(1, helper.make_node("Relu", ["conv_out"], ["conv_relu"], name="relu0"))
    assert_sole_outcome_refused(model, "its input comes from Relu 'relu0'; bnfold folds into Conv")
