"""A fold changes the folded pair and nothing else a deployment relies on."""

from __future__ import annotations

import onnx
from builders import assert_same_function, conv_bn_model, op_types
from onnx import TensorProto, helper

import bnfold


def decorated_model() -> onnx.ModelProto:
    model = conv_bn_model()
    model.producer_name, model.producer_version, model.doc_string = "exporter", "9.9", "model doc"
    model.graph.doc_string = "graph doc"
    helper.set_model_props(model, {"author": "team", "license": "MIT"})
    # value_info for the conv output (it disappears) and for the BN output (it stays)
    model.graph.value_info.extend(
        [
            helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, [2, 6, 5, 5]),
            helper.make_tensor_value_info("bn_out", TensorProto.FLOAT, [2, 6, 5, 5]),
        ]
    )
    # a model-local function, called by an untouched node
    double = helper.make_function(
        "local",
        "Double",
        ["t"],
        ["u"],
        [helper.make_node("Add", ["t", "t"], ["u"])],
        [helper.make_opsetid("", 15)],
    )
    model.functions.append(double)
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.graph.node.append(helper.make_node("Double", ["y"], ["y2"], name="double", domain="local"))
    model.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 6, 5, 5]))
    return model


def test_everything_but_the_folded_pair_is_preserved():
    model = decorated_model()
    folded = bnfold.fold(model).model
    assert op_types(folded) == ["Conv", "Relu", "Double"]
    assert [n.name for n in folded.graph.node] == ["conv", "relu", "double"]
    for field in ("ir_version", "producer_name", "producer_version", "doc_string", "model_version"):
        assert getattr(folded, field) == getattr(model, field), field
    assert folded.graph.doc_string == "graph doc"
    assert list(folded.opset_import) == list(model.opset_import)
    *kept, made = folded.metadata_props  # the model's own entries, then what made it
    assert kept == list(model.metadata_props) and made.key == "bnfold"
    assert made.value == f"bnfold {bnfold.__version__}: folded 1 of 1 BatchNormalization nodes"
    assert list(folded.functions) == list(model.functions)
    assert list(folded.graph.input) == list(model.graph.input)
    assert list(folded.graph.output) == list(model.graph.output)
    assert [v.name for v in folded.graph.value_info] == ["bn_out"]  # conv_out is gone
    assert_same_function(model, folded)
    onnx.checker.check_model(folded, full_check=True)


def test_dead_parameters_are_removed_and_only_them():
    model = conv_bn_model()
    model.graph.initializer.append(helper.make_tensor("unrelated_unused", TensorProto.FLOAT, [1], [1.0]))
    folded = bnfold.fold(model).model
    names = {t.name for t in folded.graph.initializer}
    assert names == {"W_bnfold", "B_bnfold", "unrelated_unused"}


def test_the_callers_model_is_not_modified():
    model = decorated_model()
    before = model.SerializeToString(deterministic=True)
    result = bnfold.fold(model)
    assert result.report.folded == 1
    assert model.SerializeToString(deterministic=True) == before


def test_fresh_names_do_not_collide_with_existing_ones():
    model = conv_bn_model()
    # a tensor already named like the folded weight would be, used by a node
    model.graph.initializer.append(helper.make_tensor("W_bnfold", TensorProto.FLOAT, [1], [2.0]))
    model.graph.node.append(helper.make_node("Mul", ["y", "W_bnfold"], ["y3"], name="mul"))
    model.graph.output.append(helper.make_tensor_value_info("y3", TensorProto.FLOAT, [2, 6, 5, 5]))
    folded = bnfold.fold(model).model
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert conv.input[1] == "W_bnfold_1"
    assert_same_function(model, folded)


def test_a_folded_model_says_what_made_it_the_same_way_every_time(tmp_path):
    # Issue 32: nothing in the written model said what made it; the entry holds no time, so the
    # same input gives the same bytes, and a model bnfold did not change gets none
    model = decorated_model()
    first, second = (bnfold.fold(model).model.SerializeToString(deterministic=True) for _ in range(2))
    assert first == second
    again = bnfold.fold(bnfold.fold(model).model)
    assert not again.report.changed and [e.key for e in again.model.metadata_props].count("bnfold") == 1
