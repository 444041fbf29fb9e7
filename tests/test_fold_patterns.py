"""Patterns beyond Conv → BatchNormalization (issue 4): ConvTranspose, Gemm, inference no-ops in
between, per-channel Mul/Add/Sub/Div, constant subgraphs, BN folded forward into the next op.

Positive cases: structure, numbers (onnxruntime, optimizations off, against the original),
onnx.checker. Negative cases: the model comes back unchanged, with the reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import (
    MIXED_KERNELS,
    add_chain_model,
    add_initializer,
    assert_refused,
    assert_same_function,
    bn_before,
    bn_parameters,
    bn_then,
    bn_unsqueeze_conv,
    concat_bn_model,
    conv_bn_model,
    conv_then,
    insert_between_conv_and_bn,
    keras_model,
    linear_bn_model,
    make_model,
    matmul_model,
    op_types,
    token_model,
)
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.graph.protos import node_label


def assert_folds(model: onnx.ModelProto, remaining: list[str]) -> bnfold.FoldResult:
    result = bnfold.fold(model)
    assert op_types(result.model) == remaining
    assert_same_function(model, result.model)
    onnx.checker.check_model(result.model, full_check=True)
    return result


# ---- ConvTranspose → BN -------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("group", [1, 2, 4, "depthwise"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_any_rank_and_group(rank, group, bias):
    rng = np.random.default_rng(rank)
    c_in, per_group = (8, 1) if group == "depthwise" else (8, 3)
    groups = 8 if group == "depthwise" else group
    weight = rng.normal(0, 0.5, (c_in, per_group) + (3,) * rank)
    b = rng.normal(0, 0.5, per_group * groups) if bias else None
    attrs = {"group": groups, "strides": [2] * rank, "output_padding": [1] * rank, "dilations": [1] * rank}
    spatial = [5] * rank if rank < 3 else [4] * rank
    model = linear_bn_model("ConvTranspose", weight=weight, bias=b, x_shape=[2, c_in, *spatial], attrs=attrs)
    result = assert_folds(model, ["ConvTranspose"])
    assert result.report.folded == 1


def test_conv_transpose_with_dilations_and_pads():
    weight = np.random.default_rng(9).normal(0, 0.5, (4, 6, 3, 3))
    attrs = {"dilations": [2, 1], "pads": [1, 0, 2, 1], "strides": [1, 2]}
    assert_folds(
        linear_bn_model("ConvTranspose", weight=weight, bias=None, x_shape=[1, 4, 6, 7], attrs=attrs), ["ConvTranspose"]
    )


# ---- Gemm → BN (Linear + BatchNorm1d) -----------------------------------------------------------
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(
    "bias_shape", [None, [6], [1, 6], [3, 6], [3, 1], []], ids=["no-C", "N", "1xN", "MxN", "Mx1", "scalar"]
)
def test_gemm_respects_trans_b_alpha_beta_and_broadcast_c(trans_b, bias_shape):
    rng = np.random.default_rng(4)
    weight = rng.normal(0, 0.5, (6, 5) if trans_b else (5, 6))
    bias = None if bias_shape is None else rng.normal(0, 0.5, bias_shape)
    attrs = {"transB": trans_b, "alpha": 0.7, "beta": 1.3}
    model = linear_bn_model("Gemm", weight=weight, bias=bias, x_shape=[3, 5], attrs=attrs)
    result = assert_folds(model, ["Gemm"])
    gemm = result.model.graph.node[0]
    assert next(a.f for a in gemm.attribute if a.name == "beta") == 1.0  # the folded C holds β
    assert next(a.f for a in gemm.attribute if a.name == "alpha") == pytest.approx(0.7)


def test_gemm_whose_b_is_the_activation_is_refused():
    model = linear_bn_model("Gemm", weight=np.ones((5, 6)), bias=None, x_shape=[3, 5])
    gemm = model.graph.node[0]
    gemm.input[1] = "x2"
    model.graph.input.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, [5, 6]))
    assert_refused(model, "Gemm weight is not constant: 'x2' is a graph input")


# ---- inference no-ops in between ------------------------------------------------------------------


def test_identity_and_inference_dropout_do_not_block_a_fold():
    model = conv_bn_model(opset=13)
    insert_between_conv_and_bn(
        model,
        helper.make_node("Identity", ["?"], ["id_out"], name="id"),
        helper.make_node("Dropout", ["?"], ["drop_out"], name="drop"),
    )
    result = assert_folds(model, ["Conv", "Relu"])
    assert result.report.outcomes[0].folded_into == "conv"


def test_dropout_in_training_mode_blocks_a_fold():
    model = conv_bn_model(opset=13)
    model.graph.initializer.extend(
        [numpy_helper.from_array(np.float32(0.5), "ratio"), numpy_helper.from_array(np.array(True), "training")]
    )
    insert_between_conv_and_bn(
        model, helper.make_node("Dropout", ["?", "ratio", "training"], ["drop_out"], name="drop")
    )
    assert_refused(model, "its input comes from Dropout 'drop'")


def test_a_no_op_whose_output_is_also_read_elsewhere_blocks_a_fold():
    model = conv_bn_model()
    insert_between_conv_and_bn(model, helper.make_node("Identity", ["?"], ["id_out"], name="id"))
    model.graph.output.append(helper.make_tensor_value_info("id_out", TensorProto.FLOAT, [2, 6, 5, 5]))
    assert_refused(model, "Identity 'id' in between also feeds other nodes")


def test_a_no_op_that_another_node_reads_blocks_a_fold():
    # the Identity's second reader (not a graph output): the conv may not absorb the BN
    model = conv_bn_model()
    insert_between_conv_and_bn(model, helper.make_node("Identity", ["?"], ["id_out"], name="id"))
    model.graph.node.append(helper.make_node("Sigmoid", ["id_out"], ["gate"], name="gate"))
    model.graph.output.append(helper.make_tensor_value_info("gate", TensorProto.FLOAT, [2, 6, 5, 5]))
    assert_refused(model, "Identity 'id' in between also feeds other nodes")


# ---- per-channel Mul/Add/Sub/Div after a linear op ---------------------------------------------------


PER_CHANNEL = np.random.default_rng(2).uniform(0.5, 1.5, (6, 1, 1))


@pytest.mark.parametrize(
    "ops",
    [
        [("Add", "bias", PER_CHANNEL)],  # a plain bias after a bias-less conv
        [("Mul", "gamma", PER_CHANNEL.reshape(1, 6, 1, 1)), ("Add", "beta", PER_CHANNEL[::-1])],
        [("Sub", "m", PER_CHANNEL), ("Div", "std", PER_CHANNEL + 1), ("Mul", "g", 2.0), ("Add", "b", [0.5])],
    ],
    ids=["bias-add", "mul-add", "keras-style"],
)
def test_per_channel_affine_chains_fold(ops):
    result = assert_folds(conv_then(ops), ["Conv"])
    assert [o.op for o in result.report.channel_affines] == [op for op, _, _ in ops]
    assert f"and {len(ops)} Mul/Add/Sub/Div" in result.report.summary()


def test_constant_minus_tensor_folds_with_a_negative_scale():
    assert_folds(conv_then([("Sub", "c", PER_CHANNEL)], data_first=False), ["Conv"])


@pytest.mark.parametrize(
    "op, value, data_first",
    [
        ("Mul", np.arange(1, 6, dtype=np.float32), True),  # [5] lines up with the last axis
        ("Add", np.ones((2, 6, 1, 1)), True),  # would broadcast the batch axis
        ("Div", PER_CHANNEL, False),  # c / x is not affine
        ("Div", np.zeros((6, 1, 1)), True),  # division by zero
    ],
    ids=["last-axis", "batch-axis", "constant-over-tensor", "zero-divisor"],
)
def test_elementwise_ops_that_are_not_per_channel_affine_stay(op, value, data_first):
    model = conv_then([(op, "c", value)], data_first=data_first)
    if op == "Add":
        model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2
    assert_refused(model)


# ---- constant subgraphs -----------------------------------------------------------------------------
def test_dynamo_style_computed_zero_bias_is_evaluated():
    """PyTorch's dynamo exporter gives a bias-less conv the bias Expand(CastLike(0, x), Shape(W)[:1])."""
    model = conv_bn_model(bias=False)
    graph = model.graph
    graph.node.insert(0, helper.make_node("Shape", ["W"], ["w_shape"], start=0, end=1))
    graph.node.insert(1, helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0))))
    graph.node.insert(2, helper.make_node("CastLike", ["zero", "x"], ["zero_like"]))
    graph.node.insert(3, helper.make_node("Expand", ["zero_like", "w_shape"], ["computed_bias"]))
    next(n for n in graph.node if n.name == "conv").input.append("computed_bias")
    assert_folds(model, ["Conv", "Relu"])  # Shape, Constant, CastLike and Expand are swept


def test_frozen_batch_norm_computed_from_its_buffers_folds():
    """FrozenBatchNorm2d: scale = γ·rsqrt(var + eps), shift = β − mean·scale, then x·scale + shift."""
    model = conv_then([])
    rng = np.random.default_rng(3)
    params = bn_parameters(rng, 6)
    for key in ("gamma", "beta", "mean", "var"):
        add_initializer(model, key, params[key].reshape(1, 6, 1, 1))
    add_initializer(model, "eps", 1e-5)
    graph = model.graph
    graph.node.extend(
        [
            helper.make_node("Add", ["var", "eps"], ["v_eps"]),
            helper.make_node("Sqrt", ["v_eps"], ["std"]),
            helper.make_node("Reciprocal", ["std"], ["inv_std"]),
            helper.make_node("Mul", ["gamma", "inv_std"], ["scale"]),
            helper.make_node("Mul", ["mean", "scale"], ["mean_scaled"]),
            helper.make_node("Sub", ["beta", "mean_scaled"], ["shift"]),
            helper.make_node("Mul", ["t0", "scale"], ["scaled"], name="frozen_mul"),
            helper.make_node("Add", ["scaled", "shift"], ["t1"], name="frozen_add"),
        ]
    )
    graph.output[0].name = "t1"
    result = assert_folds(model, ["Conv"])
    assert [o.node for o in result.report.channel_affines] == ["frozen_mul", "frozen_add"]
    assert {t.name for t in result.model.graph.initializer} == {"W_bnfold_1", "W_bias_bnfold_1"}  # buffers swept


@pytest.mark.parametrize("opset", [9, 11])
def test_caffe2_style_affine_through_unsqueeze_with_an_axes_attribute_folds(opset):
    """Caffe2 exports (onnx's DenseNet-121, Inception-v2) write the affine after a conv as Mul and
    Add by [C] constants made [C, 1, 1] by Unsqueeze with an `axes` attribute (before opset 13)."""
    model = conv_then([])
    rng = np.random.default_rng(4)
    add_initializer(model, "s", rng.uniform(0.5, 1.5, 6))
    add_initializer(model, "b", rng.normal(0, 0.5, 6))
    model.graph.node.extend(
        [
            helper.make_node("Unsqueeze", ["s"], ["s3"], axes=[1, 2]),
            helper.make_node("Unsqueeze", ["b"], ["b3"], axes=[1, 2]),
            helper.make_node("Mul", ["t0", "s3"], ["t1"], name="scale"),
            helper.make_node("Add", ["t1", "b3"], ["t2"], name="shift"),
        ]
    )
    model.graph.output[0].name = "t2"
    model.opset_import[0].version = opset
    result = assert_folds(model, ["Conv"])
    assert [o.node for o in result.report.channel_affines] == ["scale", "shift"]


# ---- BatchNormalization folded forward into the op it feeds --------------------------------------------


@pytest.mark.parametrize("group", [1, 2, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_batch_norm_before_an_unpadded_conv_folds_forward(group, bias):
    rng = np.random.default_rng(group)
    weight = rng.normal(0, 0.5, (8, 8 // group, 3, 3))
    model = bn_then(
        "Conv", weight, x_shape=[2, 8, 7, 7], bias=rng.normal(size=8) if bias else None, attrs={"group": group}
    )
    result = assert_folds(model, ["Conv"])
    assert result.report.outcomes[0].forward and result.report.outcomes[0].folded_into == "linear"
    assert "into the following Conv linear" in result.report.table()


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "attrs",
    [{"pads": [1, 1, 1, 1]}, {"pads": [0, 2, 1, 0], "strides": [2, 2]}, {"auto_pad": "SAME_UPPER"}],
    ids=["pads", "uneven-strided", "same"],
)
def test_batch_norm_before_a_padded_conv_takes_the_scale_and_leaves_its_shift_as_an_add(attrs, group, bias):
    # issue 23: Conv(pad(s·x + t); W) = Conv(pad(x + t/s); W·s), the border reads 0 either way
    rng = np.random.default_rng(group)
    weight = rng.normal(0, 0.5, (4, 4 // group, 3, 3))
    attrs = {**attrs, "group": group}
    model = bn_then("Conv", weight, x_shape=[2, 4, 7, 7], bias=rng.normal(size=4) if bias else None, attrs=attrs)
    result = assert_folds(model, ["Add", "Conv"])
    (outcome,) = result.report.outcomes
    assert outcome.folded and outcome.forward and outcome.via == "its shift is a new Add before the padding"
    add = result.model.graph.node[0]
    assert add.input[0] == "x" and add.output[0] == "bn_out"  # the BN's place and name
    shift = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == add.input[1]))
    assert shift.shape == (4, 1, 1)


def test_a_padded_conv_after_a_batch_norm_with_a_zero_scale_is_refused():
    model = bn_then("Conv", np.ones((4, 4, 3, 3)), x_shape=[1, 4, 6, 6], attrs={"pads": [1, 1, 1, 1]})
    next(t for t in model.graph.initializer if t.name == "gamma").CopyFrom(
        numpy_helper.from_array(np.array([1.0, 0.0, 1.0, 1.0], np.float32), "gamma")
    )
    assert_refused(model, "pads its input, and a channel's scale is 0, so its shift cannot move in front of it")


def test_a_padded_1x1_same_conv_pads_nothing_and_folds():
    model = bn_then(
        "Conv",
        np.random.default_rng(0).normal(size=(4, 4, 1, 1)),
        x_shape=[1, 4, 6, 6],
        attrs={"auto_pad": "SAME_UPPER"},
    )
    assert_folds(model, ["Conv"])


def pooled_head(pool: list[onnx.NodeProto], *, opset: int = 17, features: int = 6) -> onnx.ModelProto:
    """x → BN 'bn' → `pool` (reading 'bn_out', the last writing 'pooled') → Flatten → Gemm
    'head' → y: a classifier head behind the network's last BN (StarNet, EfficientFormerV2)."""
    rng = np.random.default_rng(9)
    params = bn_parameters(rng, 6)
    inits = [numpy_helper.from_array(params[k].astype(np.float32), k) for k in ("gamma", "beta", "mean", "var")]
    inits += [numpy_helper.from_array(rng.normal(size=(4, features)).astype(np.float32), "W"),
              numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "B")]  # fmt: skip
    nodes = [
        helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["bn_out"], name="bn"),
        *pool,
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "W", "B"], ["y"], name="head", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits,
    )  # fmt: skip
    return make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


POOLS = {
    "GlobalAveragePool": [helper.make_node("GlobalAveragePool", ["bn_out"], ["pooled"])],
    "ReduceMean, keepdims": [helper.make_node("ReduceMean", ["bn_out"], ["pooled"], axes=[2, 3])],
    "ReduceMean, no keepdims": [helper.make_node("ReduceMean", ["bn_out"], ["pooled"], axes=[-2, -1], keepdims=0)],
}


@pytest.mark.parametrize("pool", POOLS)
def test_batch_norm_before_a_spatial_mean_folds_forward_into_the_head(pool):
    result = assert_folds(pooled_head(POOLS[pool]), [POOLS[pool][0].op_type, "Flatten", "Gemm"])
    assert result.report.batch_norms[0].via.startswith(f"through {POOLS[pool][0].op_type}")


def test_batch_norm_before_a_mean_that_two_heads_read_folds_into_each():
    # EfficientFormerV2: x → BN 'norm' → ReduceMean → head and distillation head → their mean
    model = pooled_head([helper.make_node("ReduceMean", ["bn_out"], ["pooled"], axes=[2, 3], keepdims=0)])
    graph = model.graph
    flatten = next(n for n in graph.node if n.op_type == "Flatten")
    graph.node.remove(flatten)
    head = next(n for n in graph.node if n.op_type == "Gemm")
    head.input[0], head.output[0] = "pooled", "logits"
    rng = np.random.default_rng(4)
    graph.initializer.extend([numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32), "W2"),
                              numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "B2")])  # fmt: skip
    graph.node.extend([
        helper.make_node("Gemm", ["pooled", "W2", "B2"], ["distilled"], name="head_dist", transB=1),
        helper.make_node("Add", ["logits", "distilled"], ["y"], name="mean_of_heads"),
    ])  # fmt: skip
    result = assert_folds(model, ["ReduceMean", "Gemm", "Gemm", "Add"])
    (bn,) = result.report.batch_norms
    assert bn.folded and bn.forward and bn.via == "into each of its 2 readers", bn
    assert bn.folded_into == "head, head_dist"


def test_batch_norm_1d_after_a_flatten_folds_forward_into_its_linear():
    # EfficientViT-M0's head: GlobalAveragePool → Flatten → BatchNorm1d → Linear. The channel-last
    # fold's walk back through the Flatten loses the BN's axis: its refusal used to decide.
    model = pooled_head(POOLS["GlobalAveragePool"])
    graph = model.graph
    bn = next(n for n in graph.node if n.op_type == "BatchNormalization")
    pool = next(n for n in graph.node if n.op_type == "GlobalAveragePool")
    flatten = next(n for n in graph.node if n.op_type == "Flatten")
    pool.input[0], flatten.output[0] = "x", "flat_x"
    bn.input[0], bn.output[0] = "flat_x", "flat"
    graph.node.remove(bn)
    graph.node.insert(list(graph.node).index(flatten) + 1, bn)
    result = assert_folds(model, ["GlobalAveragePool", "Flatten", "Gemm"])
    assert result.report.batch_norms[0].folded and result.report.batch_norms[0].forward


def test_batch_norm_before_a_reduce_mean_whose_axes_are_inputs_folds_forward():
    axes = helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([2, 3], np.int64)))
    assert_folds(pooled_head([axes, helper.make_node("ReduceMean", ["bn_out", "axes"], ["pooled"])], opset=18),
                 ["Constant", "ReduceMean", "Flatten", "Gemm"])  # fmt: skip


@pytest.mark.parametrize("axes, features", [([1, 2, 3], 1), ([3], 30)])
def test_batch_norm_before_a_mean_over_other_axes_stays(axes, features):
    pool = [helper.make_node("ReduceMean", ["bn_out"], ["pooled"], axes=axes, keepdims=0)]
    assert_refused(pooled_head(pool, features=features), f"averages over axes {axes}, not exactly the spatial ones")


def flattened_head(flatten: onnx.NodeProto, features: int, head: str = "Gemm") -> onnx.ModelProto:
    """x [2, 6, 2, 3] → BN → `flatten` (bn_out → flat) → Gemm or MatMul 'head' [features → 4]."""
    rng = np.random.default_rng(10)
    params = bn_parameters(rng, 6)
    inits = [numpy_helper.from_array(params[k].astype(np.float32), k) for k in ("gamma", "beta", "mean", "var")]
    inits += [numpy_helper.from_array(rng.normal(size=(features, 4)).astype(np.float32), "W"),
              numpy_helper.from_array(np.array([2, -1], np.int64), "shape")]  # fmt: skip
    nodes = [
        helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["bn_out"], name="bn"),
        flatten,
        helper.make_node(head, ["flat", "W"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "flat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    model = make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.graph.output[0].CopyFrom(onnx.shape_inference.infer_shapes(model).graph.output[0])
    return model


@pytest.mark.parametrize("head", ["Gemm", "MatMul"])
@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
def test_batch_norm_before_a_flatten_folds_forward_repeated_per_block(flatten, head):
    # channel c is features 6c … 6c + 5 of the Linear's input: its scale repeats six times
    node = helper.make_node(flatten, ["bn_out", *(["shape"] if flatten == "Reshape" else [])], ["flat"])
    result = assert_folds(flattened_head(node, 36, head), [flatten, "Gemm"])
    assert result.report.batch_norms[0].via == f"through {node_label(node)}"


def test_batch_norm_before_a_flatten_that_merges_its_channels_with_the_batch_stays():
    node = helper.make_node("Flatten", ["bn_out"], ["flat"], axis=2)  # [2, 6, 2, 3] → [12, 6]
    assert_refused(flattened_head(node, 6), "does not carry its channel axis, whole, to a linear op")


def heads_model(affine: str, heads: int, *, last: str = "MatMul") -> onnx.ModelProto:
    """x [3, 8] → Relu → BN ('bn') or tf2onnx's Mul ('mul') and Add ('add') by [8] constants →
    `heads` Dense heads (MatMul, the last one `last`), each its own output: a captcha reader's
    one head per character."""
    rng = np.random.default_rng(12)
    params = bn_parameters(rng, 8)
    inits = [numpy_helper.from_array(params[k].astype(np.float32), k) for k in ("gamma", "beta", "mean", "var")]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu")]
    if affine == "bn":
        nodes.append(helper.make_node("BatchNormalization", ["r", "gamma", "beta", "mean", "var"], ["a"], name="bn"))
    else:
        scale = params["gamma"] / np.sqrt(params["var"] + 1e-3)
        shift = params["beta"] - params["mean"] * scale
        inits += [numpy_helper.from_array(v.astype(np.float32), k) for k, v in (("s", scale), ("t", shift))]
        nodes += [
            helper.make_node("Mul", ["r", "s"], ["m"], name="mul"),
            helper.make_node("Add", ["m", "t"], ["a"], name="add"),
        ]
    outputs = []
    for k in range(heads):
        op = last if k == heads - 1 else "MatMul"
        if op == "MatMul":
            inits.append(numpy_helper.from_array(rng.normal(size=(8, 5)).astype(np.float32), f"W{k}"))
            nodes.append(helper.make_node("MatMul", ["a", f"W{k}"], [f"y{k}"], name=f"head{k}"))
        else:
            nodes.append(helper.make_node(op, ["a"], [f"y{k}"], name=f"head{k}"))
        outputs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                              outputs, inits)  # fmt: skip
    model = make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(model).graph.output}
    for output in model.graph.output:
        output.CopyFrom(inferred[output.name])
    return model


@pytest.mark.parametrize("affine", ["bn", "mul_add"])
def test_an_affine_map_read_by_several_heads_folds_into_each(affine):
    result = assert_folds(heads_model(affine, 5), ["Relu", *["Gemm"] * 5])
    folded = result.report.batch_norms if affine == "bn" else result.report.channel_affines
    assert [o.folded_into.count(",") for o in folded] == [4] * len(folded)  # five heads each
    assert all(o.forward and o.via == "into each of its 5 readers" for o in folded)


def test_an_affine_map_one_of_whose_readers_is_not_linear_stays():
    model = heads_model("bn", 3, last="Sigmoid")
    assert_refused(model, "it feeds Sigmoid 'head2', not a Conv, ConvTranspose, Gemm or MatMul")
    assert_refused(heads_model("mul_add", 3, last="Sigmoid"))  # a Mul/Add that stays is not listed


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [None, [3], [2, 3]], ids=["no-C", "N", "MxN"])
def test_batch_norm_before_a_gemm_folds_forward(trans_b, bias):
    rng = np.random.default_rng(8)
    weight = rng.normal(size=(3, 5) if trans_b else (5, 3))
    c = None if bias is None else rng.normal(size=bias)
    model = bn_then("Gemm", weight, x_shape=[2, 5], bias=c, attrs={"transB": trans_b, "alpha": 0.5, "beta": 2.0})
    assert_folds(model, ["Gemm"])


def test_pre_activation_batch_norm_is_explained():
    # BN → Relu → Conv: neither direction is exact, and the reason names what stands between.
    model = bn_then("Conv", np.ones((4, 4, 1, 1)), x_shape=[1, 4, 6, 6])
    graph = model.graph
    graph.node.insert(1, helper.make_node("Relu", ["bn_out"], ["act"], name="relu"))
    graph.node[2].input[0] = "act"
    assert_refused(
        model,
        "its input 'x' is a graph input; nothing to fold into; "
        "nor forward: Relu 'relu' stands between it and Conv 'linear'",
    )


# ---- MatMul (+ Add) → BN: a Linear layer, exported without Gemm --------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_2d_matmul_with_its_bias_becomes_one_gemm(bias):
    result = assert_folds(matmul_model([3, 5], bias=bias), ["Gemm"])
    assert result.report.folded == 1 and len(result.report.channel_affines) == int(bias)
    # In graph order: the bias Add folds first and makes the MatMul a Gemm; the BN follows.
    first = result.report.outcomes[0]
    assert (first.op, first.folded_into_op) == ("Add" if bias else "BatchNormalization", "MatMul")
    assert result.report.batch_norms[0].folded_into_op == ("Gemm" if bias else "MatMul")


def test_matmul_over_tokens_is_refused_with_its_rank():
    # [batch, tokens, features]: BN's channel axis 1 is the tokens, not the MatMul's output axis.
    model = matmul_model([2, 6, 5], bias=False)
    assert_refused(model, "MatMul 'mm''s input has rank 3; only a 2-D MatMul becomes a Gemm")


# ---- BN after a channel Concat: split per input (mixed-kernel convs) ---------------------------------


@pytest.mark.parametrize("axis", [1, -3])
def test_batch_norm_after_concat_splits_into_each_conv(axis):
    result = assert_folds(concat_bn_model(axis=axis), ["Conv", "Conv", "Conv", "Concat"])
    (outcome,) = result.report.outcomes
    assert (outcome.folded_into, outcome.via) == ("c1, c3, c5", "split at Concat 'cat'")
    assert result.model.graph.node[-1].output[0] == "y"


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"pool_branch": True}, "BatchNormalization after Concat: input MaxPool 'pool' is not a linear op"),
        (
            {"extra_reader": "c3_out"},
            "BatchNormalization after Concat: Conv 'c3' output 'c3_out' is also a graph output",
        ),
        ({"extra_reader": "cat"}, "BatchNormalization after Concat: Concat 'cat' output 'cat' is also a graph output"),
        # One conv cannot take two different slices of the BN: folding both would keep only the last.
        (
            {"branches": MIXED_KERNELS[1:2], "repeat": True},
            "BatchNormalization after Concat: Concat 'cat' repeats an input",
        ),
    ],
    ids=["non-linear-input", "branch-read-elsewhere", "concat-read-elsewhere", "repeated-input"],
)
def test_batch_norm_after_concat_refusals(kwargs, reason):
    assert_refused(concat_bn_model(**kwargs), reason)


def test_concat_along_another_axis_is_refused():
    model = concat_bn_model(axis=2, branches=(("a", 4, 3, 1), ("b", 4, 3, 1)))
    assert_refused(model, "Concat 'cat' along axis 2, not the channel axis")


@pytest.mark.parametrize(
    "op, inputs, attrs",
    [
        ("InstanceNormalization", ["conv_out", "gamma", "beta"], {}),
        ("LayerNormalization", ["conv_out", "ln_scale"], {"axis": -1}),
        ("GroupNormalization", ["conv_out", "gamma", "beta"], {"num_groups": 2}),
    ],
)
def test_runtime_statistics_normalizations_are_never_folded_and_say_why(op, inputs, attrs):
    model = conv_bn_model(opset=21)
    graph = model.graph
    add_initializer(model, "ln_scale", np.ones(5))
    bn = next(n for n in graph.node if n.op_type == "BatchNormalization")
    graph.node.remove(bn)
    graph.node.insert(1, helper.make_node(op, inputs, ["bn_out"], name="norm", **attrs))
    result = assert_refused(model)
    (outcome,) = result.report.runtime_normalizations
    assert (outcome.op, outcome.folded) == (op, False)
    assert outcome.reason == "it normalizes with statistics of each input, computed at run time: never folded"
    assert result.report.to_dict()["runtime_normalizations"][0]["node"] == "norm"


# ---- BatchNorm1d over tokens: MatMul + bias → shape-only ops → BN --------------------------------


@pytest.mark.parametrize("kind", ["reshape", "flatten", "transpose"])
def test_batch_norm_over_tokens_folds_into_the_linear(kind):
    model = token_model(kind)
    shape_ops = [n.op_type for n in model.graph.node if n.op_type in ("Reshape", "Flatten", "Transpose")]
    result = assert_folds(model, ["MatMul", "Add", *shape_ops])
    (outcome,) = result.report.outcomes
    assert outcome.folded_into_op == "MatMul" and outcome.via.startswith("through ")


@pytest.mark.parametrize("kind", ["reshape", "flatten", "transpose"])
def test_batch_norm_over_tokens_after_a_bias_less_linear_leaves_its_shift_as_an_add(kind):
    # LeViT: Linear(bias=False) → BatchNorm1d over tokens. The scale goes into B; the BN node
    # becomes the Add of its shift, in its place, per channel on its own axis 1.
    model = token_model(kind, bias=False)
    into, back = (n.op_type for n in model.graph.node if n.op_type in ("Reshape", "Flatten", "Transpose"))
    result = assert_folds(model, ["MatMul", into, "Add", back])
    (outcome,) = result.report.outcomes
    assert outcome.folded_into_op == "MatMul" and outcome.via.endswith("its shift is a new Add")
    shift = next(t for t in result.model.graph.initializer if t.name == "beta_bnfold")
    assert list(shift.dims) == ([6] if kind != "transpose" else [6, 1])


def test_batch_norm_over_tokens_after_a_linear_read_elsewhere_is_refused():
    model = token_model("reshape", bias=False)
    model.graph.output.append(helper.make_tensor_value_info("mm", TensorProto.FLOAT, [2, 5, 6]))
    assert_refused(model, "MatMul 'mm' output 'mm' is also a graph output")


def test_a_reshape_that_splits_the_channel_axis_is_refused():
    model = token_model("reshape")
    to_2d = next(n for n in model.graph.node if n.name == "to_2d")
    to_2d.input[1] = "halves"  # [2, 5, 6] → [20, 3]: a channel of the BN is half a feature
    params = bn_parameters(np.random.default_rng(0), 3)
    for key in ("gamma", "beta", "mean", "var"):
        t = next(t for t in model.graph.initializer if t.name == key)
        t.CopyFrom(numpy_helper.from_array(params[key].astype(np.float32), key))
    model.graph.node[-1].input[1] = "tokens"
    assert_refused(model, "Reshape 'to_2d' between it and the linear op does not carry the channel axis over whole")


# ---- robustness of the constant walk --------------------------------------------------------------


def test_a_long_non_constant_chain_is_walked_once_without_deep_recursion():
    # Each Add asks whether its other operand is constant; 3000 deep must neither recurse past
    # Python's limit nor re-walk the chain per Add.
    result = bnfold.fold(add_chain_model(3000), check=False)
    assert result.report.outcomes == []


def test_a_cycle_does_not_hang_the_constant_walk():
    result = bnfold.fold(add_chain_model(5, cycle=True), check=False)
    assert result.report.outcomes == []


# ---- forward folds into MatMul and ConvTranspose --------------------------------------------------


def test_a_bn_before_a_2d_matmul_folds_forward_and_the_matmul_becomes_a_gemm():
    result = assert_folds(bn_before("MatMul"), ["Gemm"])
    (outcome,) = result.report.outcomes
    assert outcome.forward and outcome.folded_into_op == "MatMul"


def test_a_bn_before_a_3d_matmul_is_refused():
    assert_refused(bn_before("MatMul", rank=3), "only a 2-D MatMul becomes a Gemm")


@pytest.mark.parametrize("group", [1, 2])
def test_a_bn_before_a_cropping_stride_1_conv_transpose_folds_forward(group):
    # pads of (3 − 1) on every border: every output position receives every tap
    result = assert_folds(bn_before("ConvTranspose", pads=[2, 2, 2, 2], group=group), ["ConvTranspose"])
    assert result.report.outcomes[0].forward


@pytest.mark.parametrize(
    "attrs",
    [
        {"strides": [2, 2], "pads": [2, 2, 2, 2]},
        {"pads": [1, 1, 1, 1]},
        {"pads": [2, 2, 2, 2], "output_padding": [0, 0]},
    ],
)
@pytest.mark.parametrize("group", [1, 2])
def test_a_bn_before_a_conv_transpose_whose_borders_miss_taps_takes_the_scale_and_leaves_an_add(attrs, group):
    # an EEG spindle detector's decoder: the shift cannot be one bias, but moves in front as t/s
    if "output_padding" in attrs:
        attrs = {"pads": [2, 2, 2, 2], "strides": [2, 2], "output_padding": [1, 1]}
    result = assert_folds(bn_before("ConvTranspose", group=group, **attrs), ["Add", "ConvTranspose"])
    assert result.report.outcomes[0].forward and "its shift is a new Add" in result.report.outcomes[0].via


def test_a_conv_transpose_whose_borders_miss_taps_after_a_bn_with_a_zero_scale_is_refused():
    model = bn_before("ConvTranspose", strides=[2, 2], pads=[2, 2, 2, 2])
    gamma = next(t for t in model.graph.initializer if t.name == "gamma")
    values = numpy_helper.to_array(gamma).copy()
    values[1] = 0
    gamma.CopyFrom(numpy_helper.from_array(values, "gamma"))
    assert_refused(model, "has border outputs that miss some taps, and a channel's scale is 0")


def test_a_bn_between_dequantize_and_quantize_says_fold_before_quantizing():
    model = bn_before("MatMul", rank=3)
    graph = model.graph
    graph.initializer.extend([numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.int8(0), "z")])
    graph.node.insert(0, helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]))
    graph.node.insert(1, helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]))
    graph.node[2].input[0] = "dq"
    assert_refused(model, "quantized before folding")


# ---- through shape ops: TensorFlow/Keras exports (tf2onnx) -----------------------------------------


@pytest.mark.parametrize("layout", ["conv1d", "channels_last"])
def test_a_keras_batch_norm_as_mul_and_add_folds_through_the_shape_ops(layout):
    model = keras_model(layout)
    remaining = (
        ["Unsqueeze", "Conv", "Squeeze", "Relu"] if layout == "conv1d" else ["Transpose", "Conv", "Transpose", "Relu"]
    )
    result = assert_folds(model, remaining)
    assert [(o.op, o.folded_into_op) for o in result.report.channel_affines] == [("Mul", "Conv"), ("Add", "Conv")]
    assert all(o.via.startswith("through ") for o in result.report.channel_affines)


def test_a_batch_norm_after_a_squeeze_folds_into_the_conv():
    result = assert_folds(keras_model("conv1d", affine="bn"), ["Unsqueeze", "Conv", "Squeeze", "Relu"])
    (outcome,) = result.report.batch_norms
    assert outcome.folded_into == "conv" and outcome.via == "through Squeeze 'squeeze'"


def test_a_reshape_that_merges_the_channels_with_another_axis_stops_the_fold():
    result = assert_refused(keras_model("merged"))  # the model comes back byte-identical
    assert not result.report.channel_affines


def test_a_concat_input_behind_an_identity_is_looked_through():
    model = concat_bn_model()
    conv = next(n for n in model.graph.node if n.name == "c3")
    conv.output[0] = "c3_raw"
    model.graph.node.insert(
        list(model.graph.node).index(conv) + 1, helper.make_node("Identity", ["c3_raw"], ["c3_out"])
    )
    result = assert_folds(model, ["Conv", "Conv", "Conv", "Concat"])
    assert result.report.outcomes[0].via == "split at Concat 'cat'"


def test_a_shape_reader_of_a_conv_that_renames_its_output_still_refuses_the_fold():
    # A backward fold gives the Conv the BN's output name: a Shape of the old name would dangle.
    model = conv_bn_model()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    model.graph.node.append(helper.make_node("Shape", [conv.output[0]], ["conv_shape"]))
    model.graph.output.append(helper.make_tensor_value_info("conv_shape", TensorProto.INT64, [4]))
    assert_refused(model, "output also feeds Shape")


def test_a_bn_folds_forward_through_an_unsqueeze_into_the_conv():
    result = assert_folds(bn_unsqueeze_conv(), ["Unsqueeze", "Conv"])
    (outcome,) = result.report.outcomes
    assert outcome.forward and outcome.via == "through Unsqueeze 'unsqueeze'"


def test_a_bn_whose_channels_a_transpose_moves_off_the_conv_input_axis_is_refused():
    # [1, 4, 1, 9] → perm (0, 2, 1, 3) → [1, 1, 4, 9]: the BN's channels land on axis 2
    model = bn_unsqueeze_conv(perm=[0, 2, 1, 3])
    model.graph.initializer[-1].CopyFrom(
        numpy_helper.from_array(np.ones((6, 1, 1, 3), np.float32), "W")
    )  # one input channel now
    model = onnx.shape_inference.infer_shapes(model)
    assert_refused(model, "not the input channel axis 1")
