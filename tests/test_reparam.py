"""Structural re-parameterization (bnfold.folding.reparam): sums of branches of one tensor become one Conv.

Each merge is checked by structure (the branches and their BNs are gone, one Conv is left), by
numbers (onnxruntime, graph optimizations off, against the unmerged model) and by onnx.checker.
Each refusal shows the model exactly as the fold without re-parameterization leaves it.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from builders import BranchGraph, assert_same_function, op_types, run
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from bnfold.testing import random_inputs, widen_floats

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


# ---- PyTorch networks in training form, against their own deployment merge --------------------
@pytest.mark.parametrize("name", ["repvgg_grouped", "mobileone_tiny", "repmixer_tiny"])
def test_networks_merge_like_their_own_reparameterization(name):
    model = onnx.load(str(SAMPLES / f"{name}.onnx"))
    data = np.load(SAMPLES / f"{name}.npz")
    result = bnfold.fold(model)
    folded = result.model
    assert "BatchNormalization" not in op_types(folded)
    assert op_types(folded).count("Conv") == int(data["reparam.convs"])  # what the model's own merge leaves
    assert all(o.folded for o in result.report.outcomes)
    (got,) = run(folded, {"input": data["in.input"]})
    scale = np.abs(data["reparam.output"]).max()
    assert np.abs(got - data["reparam.output"]).max() <= 1e-5 * scale  # PyTorch's deployed network
    assert_same_function(model, folded, {"input": data["in.input"]})
    onnx.checker.check_model(folded, full_check=True)


def test_repvgg_identity_branches_merge_and_the_stride_2_block_has_none():
    model = onnx.load(str(SAMPLES / "repvgg_tiny.onnx"))
    report = bnfold.fold(model).report
    merged = [o for o in report.branch_merges if o.folded]
    assert [o.via.split(" ")[0] for o in merged] == ["3", "3", "2", "3"]  # blocks 0, 1, 2 (stride 2), 3
    assert report.folded == 12 and len(report.batch_norms) == 12


@pytest.mark.parametrize("name", ["repvgg_tiny", "mobileone_tiny", "repmixer_tiny"])
def test_no_reparam_keeps_the_branches(name):
    model = onnx.load(str(SAMPLES / f"{name}.onnx"))
    kept = bnfold.fold(model, reparam=False)
    assert op_types(kept.model).count("Conv") == op_types(model).count("Conv")
    assert not kept.report.branch_merges
    assert_same_function(model, kept.model, {"input": np.load(SAMPLES / f"{name}.npz")["in.input"]})


# ---- tiny graphs: every geometry the merge claims to handle exactly ----------------------------
def assert_merged(model: onnx.ModelProto, convs: int = 1) -> onnx.ModelProto:
    result = bnfold.fold(model)
    folded = result.model
    assert op_types(folded).count("Conv") == convs, op_types(folded)
    assert not {"BatchNormalization", "Add", "Sub", "Mul"} & set(op_types(folded)), op_types(folded)
    assert all(o.folded for o in result.report.outcomes), result.report.table()
    assert_same_function(model, folded)
    onnx.checker.check_model(folded, full_check=True)
    return folded


def assert_not_merged(model: onnx.ModelProto, reason: str | None = None) -> None:
    merged, kept = bnfold.fold(model), bnfold.fold(model, reparam=False)
    assert merged.model == kept.model
    if reason is not None:
        reasons = [o.reason for o in merged.report.branch_merges]
        assert any(reason in r for r in reasons), reasons


@pytest.mark.parametrize("stride", [1, 2])
def test_repvgg_block(stride):
    g = BranchGraph()
    branches = [g.conv(k=3, stride=stride), g.conv(k=1, stride=stride)]
    if stride == 1:
        branches.append(g.bn())  # the identity branch exists only at stride 1
    assert_merged(g.model(g.sum(*branches)))


@pytest.mark.parametrize("group", [1, 2, 4], ids=["dense", "grouped", "depthwise"])
def test_mobileone_block(group):
    g = BranchGraph()
    branches = [g.conv(k=3, group=group) for _ in range(3)] + [g.conv(k=1, group=group), g.bn()]
    assert_merged(g.model(g.sum(*branches)))


def test_pointwise_mobileone_block_with_identity():
    g = BranchGraph()
    assert_merged(g.model(g.sum(g.conv(k=1), g.conv(k=1), g.conv(k=1), g.bn())))


def test_repmixer():
    # x + γ·(BN(DWConv(x)) − BN(x)), γ a [C, 1, 1] layer scale
    g = BranchGraph()
    gamma = g.const(g.rng.uniform(0.05, 0.3, (4, 1, 1)), "gamma")
    mixed = g.op("Mul", gamma, g.op("Sub", g.conv(k=3, group=4), g.bn()))
    assert_merged(g.model(g.op("Add", "x", mixed)))


@pytest.mark.parametrize("spatial", [(11,), (9, 9), (5, 6, 7)], ids=["1d", "2d", "3d"])
def test_every_rank(spatial):
    g = BranchGraph(spatial=spatial)
    assert_merged(g.model(g.sum(g.conv(k=3), g.conv(k=1), g.bn(), "x")))


def test_larger_kernels_and_dilation():
    g = BranchGraph(spatial=(13, 13))
    branches = [g.conv(k=5, dilation=2), g.conv(k=3, dilation=2), g.conv(k=1), g.bn()]
    assert_merged(g.model(g.sum(*branches)))


def test_an_off_centre_kernel_that_lines_up():
    # A 1×1 branch beside a 3×3 padded only at the end: the 1×1 sits in the kernel's corner.
    g = BranchGraph()
    assert_merged(g.model(g.sum(g.conv(k=3, pads=[0, 0, 2, 2]), g.conv(k=1))))


def test_same_padding_at_stride_1():
    g = BranchGraph()
    branches = [g.conv(k=3, auto_pad="SAME_UPPER"), g.conv(k=2, auto_pad="SAME_LOWER"), g.bn()]
    assert_merged(g.model(g.sum(*branches)))


def test_same_padding_of_a_1x1_kernel_at_stride_2_pads_nothing_and_merges():
    # A 1-wide kernel reaches nothing beyond its input, so SAME pads 0 at any stride (Conv's
    # output is then ceil(n / stride) either way); a wider SAME kernel at stride 2 pads by the
    # input's size, which a merge does not know, and stays.
    g = BranchGraph()
    assert_merged(g.model(g.sum(g.conv(k=3, stride=2), g.conv(k=1, stride=2, auto_pad="SAME_UPPER"))))
    g = BranchGraph()
    model = g.model(g.sum(g.conv(k=3, stride=2, auto_pad="SAME_UPPER"), g.conv(k=1, stride=2)))
    assert_not_merged(model, "pads with auto_pad=SAME_UPPER at stride [2, 2]")


def test_float16():
    g = BranchGraph(dtype=np.float16)
    folded = assert_merged(g.model(g.sum(g.conv(k=3), g.conv(k=1), g.bn())))
    assert {t.data_type for t in folded.graph.initializer} == {TensorProto.FLOAT16}


def test_bfloat16_branches_merge_as_every_other_bfloat16_fold():
    # onnxruntime's CPU provider has no bfloat16 Conv: the numbers are checked on the float32-
    # widened models, up to one bfloat16 rounding of the merged weights.
    g = BranchGraph(dtype=ml_dtypes.bfloat16)
    model = g.model(g.sum(g.conv(k=3), g.conv(k=1), g.bn()), opset=22)  # Conv takes bfloat16 from 22
    result = bnfold.fold(model)
    folded = result.model
    assert op_types(folded) == ["Conv", "Relu"] and result.report.branch_merges[0].folded
    assert {t.data_type for t in folded.graph.initializer} == {TensorProto.BFLOAT16}
    onnx.checker.check_model(folded, full_check=True)
    feeds = {k: v.astype(np.float32) for k, v in random_inputs(model).items()}

    def widened(m: onnx.ModelProto) -> onnx.ModelProto:  # float32 Conv is the same from 11 to 22,
        m = widen_floats(m)  # and onnxruntime < 1.21 loads opsets up to 21
        m.opset_import[0].version = 17
        return m

    want, got = run(widened(model), feeds)[0], run(widened(folded), feeds)[0]
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()  # bfloat16 keeps 8 bits


def test_float16_merge_rounds_with_the_moments_of_its_input():
    # x → Conv → BN → Relu → RepVGG block: the merged weight's rounding knows E[x] and Var[x].
    g = BranchGraph(dtype=np.float16)
    g.nodes.append(helper.make_node("Relu", [g.conv()], ["r"]))
    model = g.model(g.sum(g.conv("r", k=3), g.conv("r", k=1), g.bn("r")))
    folded = assert_merged(model, convs=2)
    (merge,) = bnfold.fold(model, bias_correction=True).report.branch_merges
    assert (
        merge.rounding
        == "bias correction, E[x] from the statistics of BatchNormalization 'bn4' through Relu (output 'r')"
    )
    plain = bnfold.fold(model)
    assert plain.report.branch_merges[0].rounding == "sum-preserving rounding"
    assert {t.data_type for t in folded.graph.initializer} == {TensorProto.FLOAT16}


def test_a_branch_also_read_elsewhere_stays():
    g = BranchGraph()
    shared = g.conv(k=1)
    y = g.sum(g.conv(k=3), shared)
    model = g.model(g.op("Mul", y, shared))  # the 1×1 branch also feeds the Mul
    assert_not_merged(model, "output is also read outside the sum: it cannot merge away")
    assert op_types(bnfold.fold(model).model).count("Conv") == 2


def test_branches_with_different_strides_are_refused():
    # Same output size (4×4 from 8×8), different strides: no one conv computes both.
    g = BranchGraph(spatial=(8, 8))
    model = g.model(g.sum(g.conv(k=1, stride=2, pads=[0, 0, 0, 0]), g.conv(k=3, dilation=2, pads=[0, 0, 0, 0])))
    assert_not_merged(model, "branches have different strides")


def test_branches_that_do_not_line_up_are_refused():
    # Two 3×3 convs padded at opposite ends: one is shifted by two pixels against the other.
    g = BranchGraph()
    model = g.model(g.sum(g.conv(k=3, pads=[0, 0, 2, 2]), g.conv(k=3, pads=[2, 2, 0, 0])))
    assert_not_merged(model, "does not line up")


def test_an_identity_branch_with_a_channel_change_is_refused():
    # x has 1 channel and broadcasts against the 4-channel conv: not a per-channel identity.
    g = BranchGraph()
    model = g.model(g.sum(g.conv(k=3, cin=1), "x"), in_channels=1)
    assert_not_merged(model, "identity branch sits beside a 1→4-channel conv")


def test_a_sum_of_different_tensors_is_no_candidate():
    # A ResNet shortcut: conv(relu(x)) + x. Nothing to merge and nothing to report.
    g = BranchGraph()
    relu = g._name("r")
    g.nodes.append(helper.make_node("Relu", ["x"], [relu], name=relu))
    model = g.model(g.sum(g.conv(relu, k=3), "x"))
    assert_not_merged(model)
    assert not bnfold.fold(model).report.branch_merges


def test_a_layer_scale_along_the_wrong_axis_is_refused():
    # [C, 1] broadcasts against [N, C, H, W] along H, not along the channels.
    g = BranchGraph(spatial=(4, 4))
    scale = g.const(g.rng.uniform(0.5, 1.5, (4, 1)), "s")
    model = g.model(g.op("Add", "x", g.op("Mul", g.conv(k=3), scale)))
    assert_not_merged(model, "multiplies by a constant that is not one value per channel")


def test_a_subtracted_or_scaled_identity_keeps_its_sign_and_scale():
    # Found by the property test: conv − x + conv lost the minus sign of x, whose channel count
    # is only known once it meets a conv.
    g = BranchGraph()
    gamma = g.const(g.rng.uniform(0.5, 1.5, (4, 1, 1)), "gamma")
    y = g.op("Add", g.op("Sub", g.conv(k=1), "x"), g.op("Mul", "x", gamma))
    assert_merged(g.model(g.op("Add", y, g.conv(k=3))))


# ---- to a fixed point: merges that make folds possible, constants in the sum --------------------
def test_a_bn_after_the_branch_sum_folds_once_the_sum_is_one_conv():
    # RepViT: BN(conv3x3(x) + conv1x1(x) + x). The BN folds only after the merge.
    g = BranchGraph()
    total = g.sum(g.conv(k=3, bn=False), g.conv(k=1, bn=False), "x")
    model = g.model(g.bn(total))
    result = bnfold.fold(model)
    (bn,) = result.report.batch_norms
    assert bn.folded and bn.folded_into.endswith("_reparam"), result.report.table()
    assert_merged(model)


@pytest.mark.parametrize("form", ["initializer", "Constant", "Cast of a scalar", "per channel"])
def test_a_constant_leaf_in_the_sum_is_a_bias_term(form):
    # FastViT MobileOne with a 1×1 kernel: `scale_out = 0; out = scale_out + identity(x)` exports
    # as Add(BN(x), 0); then + conv(x). The constant used to stop the merge.
    g = BranchGraph()
    if form == "initializer":
        zero = g.const(0.0, "zero")
    elif form == "Constant":
        zero = "zero"
        g.nodes.append(
            helper.make_node("Constant", [], [zero], value=numpy_helper.from_array(np.array(0.0, np.float32)))
        )
    elif form == "Cast of a scalar":
        zero = "zero_cast"
        g.inits.append(numpy_helper.from_array(np.array(0, np.int64), "zero_int"))
        g.nodes.append(helper.make_node("Cast", ["zero_int"], [zero], to=TensorProto.FLOAT))
    else:
        zero = g.const(g.rng.normal(0, 0.3, (1, 4, 1, 1)), "offsets")
    assert_merged(g.model(g.sum(g.conv(k=1), g.op("Add", g.bn(), zero))))


def test_a_constant_that_is_not_one_value_per_channel_stops_the_merge():
    g = BranchGraph()
    plane = g.const(g.rng.normal(0, 0.3, (1, 1, 9, 9)), "plane")  # varies over space: not a bias
    assert_not_merged(g.model(g.sum(g.conv(k=1), g.op("Add", g.bn(), plane))), "is a constant that is not one value")


def test_merged_weights_that_overflow_are_reported():
    g = BranchGraph(dtype=np.float16)
    big = g.const(np.full((4, 1, 1), 6e4), "gamma")  # a layer scale that pushes the kernel past 65504
    model = g.model(g.sum(g.conv(k=1), g.op("Mul", big, g.conv(k=3))))
    reasons = [o.reason for o in bnfold.fold(model).report.branch_merges]
    assert any("the merged weights overflow float16" in (r or "") for r in reasons), reasons


def test_the_fixed_point_runs_until_nothing_changes_on_a_cascade_that_needs_a_round_per_level():
    # level i: BN(level i−1 + conv(x)); each BN folds one round after the sum below it merges
    g = BranchGraph()
    level = g.conv(k=1, bn=False)
    for _ in range(40):
        level = g.bn(g.sum(level, g.conv(k=1, bn=False)))
    model = g.model(level)
    result = bnfold.fold(model)
    assert result.report.folded == 40 and op_types(result.model) == ["Conv", "Relu"], result.report.table()
    assert_same_function(model, result.model)
    onnx.checker.check_model(result.model, full_check=True)


def test_a_chain_of_a_thousand_branch_sums_merges_completely():
    # issue 23: the round cap and the nesting bound left 744 of the 1000 Convs unmerged
    g = BranchGraph(channels=4, spatial=(6, 6))
    total = g.conv(k=3)
    for _ in range(999):
        total = g.sum(total, g.conv(k=3))
    model = g.model(total)
    result = bnfold.fold(model)
    assert op_types(result.model) == ["Conv", "Relu"], result.report.table()
    assert result.report.folded == 1000 and len(result.report.branch_merges) == 1
    assert_same_function(model, result.model)
    onnx.checker.check_model(result.model, full_check=True)


def test_a_sum_node_of_branches_merges_like_a_chain_of_adds():
    # tf2onnx writes TensorFlow's AddN as one Sum
    g = BranchGraph()
    branches = [g.conv(k=3), g.conv(k=1), g.bn("x")]
    out = g._name("sum")
    g.nodes.append(helper.make_node("Sum", branches, [out], name=out))
    model = g.model(out)
    result = bnfold.fold(model)
    assert op_types(result.model) == ["Conv", "Relu"], result.report.table()
    (merge,) = result.report.branch_merges
    assert merge.folded_into and "3 branches" in merge.via
    assert_same_function(model, result.model)
    onnx.checker.check_model(result.model, full_check=True)


def test_inspect_names_why_a_block_shaped_sum_stays(tmp_path):
    # A RepVGG block whose 3×3 branch pads SAME_UPPER at stride 2 (the padding depends on the input's
    # size): one row for the block, with the reason; the sums inside it are not reported again.
    g = BranchGraph()
    model = g.model(g.sum(g.conv(k=3, stride=2, auto_pad="SAME_UPPER"), g.conv(k=1, stride=2)))
    onnx.save(model, tmp_path / "block.onnx")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "block.onnx")])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stderr.splitlines() if "(branch merge)" in line]
    assert len(rows) == 1 and "skipped" in rows[0], result.stderr
    assert "Conv 'conv1' pads with auto_pad=SAME_UPPER at stride [2, 2]" in rows[0]
