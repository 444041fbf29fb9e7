"""The sample models (real PyTorch and Keras networks exported with BN kept), against their own outputs.

The .npz files hold PyTorch eval-mode outputs, so these tests compare with an independent
reference and need no torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import assert_same_function, op_types, run

import bnfold

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"

# model: (BatchNormalization nodes, how many bnfold folds, Mul/Add/Sub/Div nodes it folds)
EXPECTED = {
    "resnet_tiny": (9, 9, 0),
    "mobilenet_tiny": (11, 11, 0),
    "audio_conv1d": (4, 4, 0),
    "video_conv3d": (4, 4, 0),
    "shared_conv_output": (3, 2, 0),
    "efficientnet_tiny": (11, 11, 0),
    "inception_tiny": (13, 13, 0),
    "repvgg_tiny": (12, 12, 0),  # the identity-branch BNs merge with the conv branches beside them
    "resnet_tiny_fp16": (9, 9, 0),
    # onnxconverter-common, keep_io_types=True: float16 inside, float32 inputs and outputs
    "resnet_tiny_fp16io": (9, 9, 0),
    "mobilenet_tiny_fp16io": (11, 11, 0),
    "efficientnet_tiny_fp16io": (11, 11, 0),
    "inception_tiny_fp16io": (13, 13, 0),
    "decoder_convtranspose_fp16io": (2, 2, 0),
    "preact_input_bn_fp16io": (2, 1, 0),
    "decoder_convtranspose": (2, 2, 0),  # ConvTranspose, one of them grouped
    "mlp_batchnorm1d": (2, 2, 0),  # Linear → BatchNorm1d: a Gemm, and a bias-less Linear's MatMul
    "frozen_bn_backbone": (0, 0, 6),  # FrozenBatchNorm2d: x·scale + shift, computed constants
    "preact_input_bn": (2, 1, 0),  # the input BN folds forward into the unpadded stem
    "resnet_tiny_dynamo": (9, 9, 0),  # dynamo exporter: biases built by Shape/Expand/CastLike
    "decoder_convtranspose_dynamo": (2, 2, 0),
    "mlp_batchnorm1d_dynamo": (2, 2, 0),
    "frozen_bn_backbone_dynamo": (0, 0, 6),
    "preact_input_bn_dynamo": (2, 1, 0),
    "token_mlp_batchnorm1d": (2, 2, 0),  # BatchNorm1d over tokens, via transpose and via reshape
    # re-parameterizable networks: every BN folds or merges (tests/test_reparam.py has the rest)
    "repvgg_grouped": (9, 9, 0),
    "mobileone_tiny": (19, 19, 0),
    "repmixer_tiny": (8, 8, 0),
    # folded only with the fixed point, a new bias, a constant leaf or shape readers allowed
    "levit_tiny": (6, 6, 0),  # bias-less Linear → BatchNorm1d over tokens, beside a Shape of it
    "levit_tiny_dynamo": (6, 6, 0),
    # BN after a sum of branches: folds once the sum is one Conv; the TorchScript GELU's final
    # Mul by 0.5 folds forward into the Conv after it
    "repvit_tiny": (5, 5, 1),
    "repvit_tiny_dynamo": (5, 5, 0),
    "fastvit_tiny": (6, 6, 3),  # Add(BN(x), 0) beside a conv; Conv → Mul(γ) → BN; two GELUs' Mul by 0.5
    "fastvit_tiny_dynamo": (6, 6, 1),
    # a YOLOv8-style detector (C2f blocks, SiLU, sigmoid scores), symbolic batch, H and W
    "yolo_tiny": (22, 22, 0),
    "yolo_tiny_dynamo": (22, 22, 0),
    # Keras through tf2onnx: BatchNormalization as Mul and Add, through Squeeze (Conv1D); the
    # channels-last CNN's other BNs tf2onnx fused itself
    "keras_conv1d": (0, 0, 4),
    "keras_channels_last": (0, 0, 2),
    # PyTorch eager QAT, exported before convert: each BN behind a Div by its scale factor, the
    # weights fake-quantized; both fold into the weights' DequantizeLinear scale
    "qat_resnet_tiny": (5, 5, 5),
    # the same in torch.ao's FX graph mode (prepare_qat_fx), a strided block with a 1×1 shortcut:
    # six Divs and the stem's conv bias (an Add after its Div) fold too
    "fx_qat_resnet_tiny": (6, 6, 7),
    # eager QAT with an observer after each conv (no ConvBn fusion): Conv → Q → DQ → BN, not exact,
    # so nothing by default; both with --requantize (test below)
    "qat_observer_tiny": (2, 0, 0),
}
QUANTIZED = ("qat_resnet_tiny", "fx_qat_resnet_tiny")  # outputs on a grid: judged in its steps, not against 1e-5
REQUANTIZED = ("qat_observer_tiny",)  # folds only across its quantizers, with --requantize


def load(name: str):
    model = onnx.load(str(SAMPLES / f"{name}.onnx"))
    reference = np.load(SAMPLES / f"{name}.npz")
    return model, {"input": reference["in.input"]}, reference["out.output"]


def onnxruntime_folded(model: onnx.ModelProto, tmp_path: Path) -> onnx.ModelProto:
    """onnxruntime's own offline Conv+BN fusion (BASIC level), saved and read back."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


def test_every_sample_is_listed():
    assert {p.stem for p in SAMPLES.glob("*.onnx")} == set(EXPECTED)


@pytest.mark.parametrize("name", [n for n in EXPECTED if "fp16" not in n and n not in (*QUANTIZED, *REQUANTIZED)])
def test_float32_sample_folds_and_matches_pytorch(name):
    model, feeds, torch_output = load(name)
    total, folded_count, affines = EXPECTED[name]
    result = bnfold.fold(model)
    assert op_types(model).count("BatchNormalization") == total
    assert result.report.folded == folded_count
    assert len(result.report.channel_affines) == affines
    assert op_types(result.model).count("BatchNormalization") == total - folded_count
    (got,) = run(result.model, feeds)
    scale = np.abs(torch_output).max()
    assert np.abs(got - torch_output).max() <= 1e-5 * scale
    assert_same_function(model, result.model, feeds)
    onnx.checker.check_model(result.model, full_check=True)


def test_conv_output_with_two_readers_is_skipped_with_its_reason():
    model, _, _ = load("shared_conv_output")
    (skipped,) = [o for o in bnfold.fold(model).report.outcomes if not o.folded]
    assert skipped.node == "/bn/BatchNormalization"
    assert (
        skipped.reason == "Conv '/conv/Conv' output also feeds Sigmoid '/Sigmoid'; "
        "nor forward: it feeds Relu '/Relu', not a Conv, ConvTranspose, Gemm or MatMul"
    )


def test_identity_branch_batch_norms_are_explained_without_reparameterization():
    model, _, _ = load("repvgg_tiny")
    reasons = {o.reason for o in bnfold.fold(model, reparam=False).report.outcomes if not o.folded}
    folds_into = "bnfold folds into Conv, ConvTranspose, Gemm, MatMul"
    linear = "not a Conv, ConvTranspose, Gemm or MatMul"
    assert reasons == {
        f"its input comes from Relu '{source}'; {folds_into}; nor forward: it feeds Add '{add}', {linear}"
        for source, add in (
            ("/stem/stem.2/Relu", "/blocks/blocks.0/Add_1"),
            ("/blocks/blocks.0/Relu", "/blocks/blocks.1/Add_1"),
            ("/blocks/blocks.2/Relu", "/blocks/blocks.3/Add_1"),
        )
    }


def test_patterns_beyond_conv_fold_where_onnxruntime_does_not():
    outcomes = {name: bnfold.fold(load(name)[0]).report.outcomes for name in ("mlp_batchnorm1d", "preact_input_bn")}
    assert [o.folded_into_op for o in outcomes["mlp_batchnorm1d"]] == ["Gemm", "MatMul"]
    stem, block = outcomes["preact_input_bn"]
    assert stem.forward and stem.folded_into == "/stem/Conv"
    assert block.reason == (
        "Conv '/stem/Conv' output also feeds Add '/Add'; "
        "nor forward: Relu '/block/block.1/Relu' stands between it and Conv '/block/block.2/Conv'"
    )


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantized_sample_folds_into_its_weight_scales_and_runs_as_integer_kernels(name, tmp_path):
    model, feeds, torch_output = load(name)
    total, folded_count, affines = EXPECTED[name]
    result = bnfold.fold(model)
    assert (result.report.folded, len(result.report.channel_affines)) == (folded_count, affines)
    assert op_types(result.model).count("BatchNormalization") == total - folded_count
    onnx.checker.check_model(result.model, full_check=True)
    (want,), (got,) = run(model, feeds), run(result.model, feeds)
    step = float(np.min(np.diff(np.unique(want))))  # the output grid's step (its values are multiples)
    assert np.abs(got - want).max() <= step * 1.01  # a value at a rounding boundary may flip one step
    assert np.abs(got - torch_output).max() <= step * 1.01  # as onnxruntime's original differs from PyTorch
    optimized = {}
    for label, m in (("original", model), ("folded", result.model)):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(tmp_path / f"{label}.onnx")
        options.log_severity_level = 3
        try:
            ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except ort.capi.onnxruntime_pybind11_state.Fail as exc:  # 1.20's QLinearAdd wants a scalar scale
            pytest.skip(f"onnxruntime {ort.__version__} cannot optimize {name} ({label}) itself: {exc}")
        optimized[label] = op_types(onnx.load(options.optimized_model_filepath))
    assert optimized["original"].count("QLinearConv") == 0 and optimized["original"].count("BatchNormalization")
    assert optimized["folded"].count("QLinearConv") >= 3 and optimized["folded"].count("BatchNormalization") == 0


@pytest.mark.parametrize("name", REQUANTIZED)
def test_a_qat_export_with_observers_folds_only_with_requantize(name, tmp_path):
    model, feeds, torch_output = load(name)
    total, _, _ = EXPECTED[name]
    kept = bnfold.fold(model)
    assert kept.report.folded == 0 and kept.model.SerializeToString() == model.SerializeToString()
    assert all("fold with --requantize" in o.reason for o in kept.report.batch_norms)
    result = bnfold.fold(model, requantize=True)
    assert result.report.folded == total and "BatchNormalization" not in op_types(result.model)
    onnx.checker.check_model(result.model, full_check=True)
    onnx.save(model, tmp_path / "model.onnx")
    onnx.save(result.model, tmp_path / "folded.onnx")
    report = bnfold.verify(tmp_path / "model.onnx", tmp_path / "folded.onnx", requantize=True)
    assert report.equivalent and len(report.sites) == total, report.table()
    (want,), (got,) = run(model, feeds), run(result.model, feeds)
    step = float(np.min(np.diff(np.unique(want))))  # the output grid's step
    assert np.abs(got - torch_output).max() <= 2.01 * step  # the removed quantizers' rounding, then the grid's


@pytest.mark.parametrize("name", list(EXPECTED))
def test_bnfold_folds_every_batch_norm_onnxruntime_folds(name, tmp_path):
    model, _, _ = load(name)
    try:
        theirs = onnxruntime_folded(model, tmp_path)
    except ort.capi.onnxruntime_pybind11_state.Fail as exc:  # onnxruntime 1.20's MatMul+BN fusion on LeViT
        pytest.skip(f"onnxruntime {ort.__version__} cannot optimize {name} itself: {exc}")
    kept_by_onnxruntime = {  # on CPU a float16 BN runs in float32 between casts, its output renamed
        n.output[0].removeprefix("InsertedPrecisionFreeCast_")
        for n in theirs.graph.node
        if n.op_type == "BatchNormalization"
    }
    kept_by_bnfold = {o.output for o in bnfold.fold(model).report.outcomes if not o.folded}
    assert kept_by_bnfold <= kept_by_onnxruntime


def test_float16_fold_is_as_close_to_the_float32_network_as_the_unfolded_model(tmp_path):
    """Against PyTorch's float32 network (32 reference rows): bnfold's float16 fold deviates
    within 1.3× of the unfolded float16 model (measured 0.96×) and less than onnxruntime's own
    fusion, which computes in float16 (measured 2.2×)."""
    model, feeds, torch_output = load("resnet_tiny_fp16")
    folded = bnfold.fold(model).model
    assert {t.data_type for t in folded.graph.initializer} == {onnx.TensorProto.FLOAT16}
    onnx.checker.check_model(folded, full_check=True)

    def deviation(candidate: onnx.ModelProto) -> float:
        error = run(candidate, feeds)[0].astype(np.float64) - torch_output
        return float(np.sqrt((error**2).mean() / (torch_output.astype(np.float64) ** 2).mean()))

    unfolded, ours = deviation(model), deviation(folded)
    theirs = deviation(onnxruntime_folded(model, tmp_path))
    assert ours <= 1.3 * unfolded
    assert ours < theirs
