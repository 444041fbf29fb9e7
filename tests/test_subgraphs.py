"""Folds inside If/Loop/Scan bodies, with parameters read from the enclosing scope."""

from __future__ import annotations

import numpy as np
import onnx
from builders import assert_refused, assert_same_function, bn_parameters, make_model
from onnx import TensorProto, helper, numpy_helper

import bnfold


def conv_bn_nodes(x: str, out: str, prefix: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("Conv", [x, f"{prefix}W"], [f"{prefix}c"], name=f"{prefix}conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization",
            [f"{prefix}c", f"{prefix}g", f"{prefix}b", f"{prefix}m", f"{prefix}v"],
            [out],
            name=f"{prefix}bn",
        ),
    ]


def parameters(prefix: str, seed: int) -> list[onnx.TensorProto]:
    rng = np.random.default_rng(seed)
    params = bn_parameters(rng, 4)
    tensors = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32), f"{prefix}W")]
    tensors += [
        numpy_helper.from_array(params[k].astype(np.float32), f"{prefix}{k[0]}")
        for k in ("gamma", "beta", "mean", "var")
    ]
    return tensors


def if_model() -> onnx.ModelProto:
    """y = If(cond, then: BN(Conv(x)) with the main graph's parameters, else: Relu(x))."""
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4, 6, 6])  # noqa: E731
    then_branch = helper.make_graph(conv_bn_nodes("x", "then_out", "t_"), "then", [], [value("then_out")])
    else_branch = helper.make_graph([helper.make_node("Relu", ["x"], ["else_out"])], "else", [], [value("else_out")])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch)],
        "if_model",
        [value("x"), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [value("y")],
        parameters("t_", 1),  # in the main graph, read by the then-branch from the enclosing scope
    )
    return make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fold_inside_an_if_branch_with_outer_scope_parameters():
    model = if_model()
    result = bnfold.fold(model)
    (outcome,) = result.report.outcomes
    assert outcome.folded and outcome.node == "branch.then_branch/t_bn"
    then_branch = next(a.g for a in result.model.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_branch.node] == ["Conv"]
    assert {t.name for t in then_branch.initializer} == {"t_W_bnfold", "t_b_bnfold"}
    assert not result.model.graph.initializer  # the outer parameters nothing reads any more
    for cond in (True, False):
        feeds = {"x": np.random.default_rng(2).normal(size=(1, 4, 6, 6)).astype(np.float32), "cond": np.array(cond)}
        assert_same_function(model, result.model, feeds)
    onnx.checker.check_model(result.model, full_check=True)


def loop_model(state_is_parameter: bool = False) -> onnx.ModelProto:
    """A Loop whose body applies Conv → BN (body-local parameters) to the carried tensor."""
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4, 6, 6])  # noqa: E731
    body_nodes = [helper.make_node("Identity", ["cond_in"], ["cond_out"]), *conv_bn_nodes("state", "state_out", "l_")]
    body_inputs = [
        helper.make_tensor_value_info("i", TensorProto.INT64, []),
        helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        value("state"),
    ]
    body_outputs = [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), value("state_out")]
    inits = parameters("l_", 3)
    if state_is_parameter:  # the BN's mean is loop state: a new value every iteration
        inits = [t for t in inits if t.name != "l_m"]
        body_inputs.append(helper.make_tensor_value_info("l_m", TensorProto.FLOAT, [4]))
        body_outputs.append(helper.make_tensor_value_info("l_m_out", TensorProto.FLOAT, [4]))
        body_nodes.append(helper.make_node("Identity", ["l_m"], ["l_m_out"]))
    body = helper.make_graph(body_nodes, "body", body_inputs, body_outputs, inits)
    loop_inputs = ["trips", "", "x"] + (["mean0"] if state_is_parameter else [])
    loop_outputs = ["y"] + (["mean_final"] if state_is_parameter else [])
    graph = helper.make_graph(
        [helper.make_node("Loop", loop_inputs, loop_outputs, name="loop", body=body)],
        "loop_model",
        [value("x")],
        [value("y")]
        + ([helper.make_tensor_value_info("mean_final", TensorProto.FLOAT, [4])] if state_is_parameter else []),
        [numpy_helper.from_array(np.array(2, np.int64), "trips")]
        + ([numpy_helper.from_array(np.zeros(4, np.float32), "mean0")] if state_is_parameter else []),
    )
    return make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fold_inside_a_loop_body():
    model = loop_model()
    result = bnfold.fold(model)
    assert [o.folded for o in result.report.outcomes] == [True]
    body = result.model.graph.node[0].attribute[0].g
    assert [n.op_type for n in body.node] == ["Identity", "Conv"]
    assert_same_function(model, result.model)
    onnx.checker.check_model(result.model, full_check=True)


def test_loop_state_is_not_a_constant():
    result = assert_refused(loop_model(state_is_parameter=True))
    assert result.report.outcomes[0].reason.startswith(
        "BatchNormalization mean is not constant: 'l_m' is a graph input;"
    )


def function_model(epsilon_from_caller: bool = False) -> onnx.ModelProto:
    """The main graph calls local.ConvBN(x); the function holds its parameters as Constants."""
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in parameters("f_", 5)]
    bn_attrs = {}
    body = constants + conv_bn_nodes("x_in", "y_out", "f_")
    if epsilon_from_caller:
        eps = helper.make_attribute_ref("epsilon", onnx.AttributeProto.FLOAT)
        body[-1].attribute.append(eps)
    function = helper.make_function(
        "local",
        "ConvBN",
        ["x_in"],
        ["y_out"],
        body,
        [helper.make_opsetid("", 17)],
        attributes=["epsilon"] if epsilon_from_caller else [],
    )
    if epsilon_from_caller:
        bn_attrs["epsilon"] = 1e-3
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4, 6, 6])  # noqa: E731
    graph = helper.make_graph(
        [helper.make_node("ConvBN", ["x"], ["y"], name="call", domain="local", **bn_attrs)],
        "calls",
        [value("x")],
        [value("y")],
    )
    return make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[function]
    )


def test_fold_inside_a_model_local_function():
    model = function_model()
    result = bnfold.fold(model)
    (outcome,) = result.report.outcomes
    assert outcome.folded and outcome.node == "function local.ConvBN/f_bn"
    ops = [n.op_type for n in result.model.functions[0].node]
    assert ops == ["Constant", "Constant", "Conv"]  # folded weight and bias, then the conv
    assert_same_function(model, result.model)
    onnx.checker.check_model(result.model, full_check=True)


def test_an_attribute_bound_by_the_caller_blocks_the_fold():
    result = assert_refused(function_model(epsilon_from_caller=True))
    assert result.report.outcomes[0].reason.startswith(
        "BatchNormalization 'f_bn' takes attribute 'epsilon' from the function's caller;"
    )
