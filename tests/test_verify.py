"""bnfold verify: equivalent pairs pass, real folding mistakes fail, bad input is exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import bn_parameters, conv_bn_model, make_model
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import bnfold
import bnfold.folding.affine
import bnfold.folding.sources
from bnfold.cli import app
from bnfold.verification.tolerance import compare

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


# ---- the tolerance policy -----------------------------------------------------------------------
def test_errors_are_judged_against_the_output_scale():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1000, 100).astype(np.float32)  # large outputs: 1e-3 is rounding
    assert compare("logits", logits, logits + np.float32(1e-3)).passed
    probabilities = rng.dirichlet(np.ones(100)).astype(np.float32)  # small outputs: 1e-3 is real
    result = compare("p", probabilities, probabilities + np.float32(1e-3))
    assert not result.passed and result.mismatched == 100


def test_needed_atol_is_the_threshold():
    rng = np.random.default_rng(1)
    want = rng.normal(0, 3, 50).astype(np.float32)
    got = want + rng.normal(0, 1e-3, 50).astype(np.float32)
    needed = compare("y", want, got).needed_atol
    assert compare("y", want, got, atol=needed * 1.0001).passed
    assert not compare("y", want, got, atol=needed * 0.99).passed


def test_nan_and_inf_must_sit_at_the_same_positions():
    want = np.array([1.0, np.nan, np.inf, -2.0], dtype=np.float32)
    assert compare("y", want, want.copy()).passed
    moved = np.array([1.0, 5.0, np.inf, np.nan], dtype=np.float32)
    result = compare("y", want, moved)
    assert not result.passed and result.reason == "NaN/Inf at 2 different positions"
    flipped = np.array([1.0, np.nan, -np.inf, -2.0], dtype=np.float32)
    assert not compare("y", want, flipped).passed


def test_integer_outputs_must_match_exactly_and_shapes_and_dtypes_too():
    ids = np.array([3, 1, 4], dtype=np.int64)
    assert compare("ids", ids, ids.copy()).passed
    assert not compare("ids", ids, ids + np.array([0, 0, 1])).passed
    assert not compare("ids", ids, ids.astype(np.int32)).passed
    assert not compare("ids", ids, ids[:2]).passed


def test_metrics():
    want = np.array([1.0, 2.0, -2.0, 0.0], dtype=np.float32)
    got = np.array([1.0, 2.0, -2.0, 0.5], dtype=np.float32)
    r = compare("y", want, got)
    assert (r.max_abs_error, r.scale, r.mismatched, r.elements) == (0.5, 2.0, 1, 4)
    assert r.rel_l2_error == pytest.approx(0.5 / 3.0)
    assert r.cosine_similarity == pytest.approx(9.0 / (3.0 * np.sqrt(9.25)))
    assert r.needed_atol == pytest.approx(0.25)


# ---- equivalent pairs pass --------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.stem for p in SAMPLES.glob("*.onnx")))
def test_folded_samples_verify(name, tmp_path):
    original = SAMPLES / f"{name}.onnx"
    folded = save(bnfold.fold(original).model, tmp_path / "folded.onnx")
    result = invoke("verify", original, folded, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["equivalent"] is True and report["trials"] == 3
    # well inside the policy: a tenth of it, or a quarter for an output judged as float16, whose own
    # rounding (2^-11 per op) moves a 10-logit output of 12 to 18 float16 layers by 1e-3 to 2e-3
    # of its scale (mobilenet_tiny_fp16io, efficientnet_tiny_fp16io)
    margin = {"float16": 4}
    assert all(o["passed"] and o["needed_atol"] < o["atol"] / margin.get(o["precision"], 10) for o in report["outputs"])


def multi_io_model() -> onnx.ModelProto:
    """Conv→BN on an image, an embedding lookup on int64 token ids, a bool mask: two outputs."""
    model = conv_bn_model()
    graph = model.graph
    graph.initializer.append(
        numpy_helper.from_array(np.random.default_rng(2).normal(size=(10, 4)).astype(np.float32), "table")
    )
    graph.input.extend(
        [
            helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", "seq"]),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Gather", ["table", "tokens"], ["embedded"], name="embed"),
            helper.make_node("Unsqueeze", ["mask", "axis"], ["mask3"], name="unsqueeze"),
            helper.make_node("Where", ["mask3", "embedded", "zero"], ["masked"], name="where"),
        ]
    )
    graph.initializer.extend(
        [numpy_helper.from_array(np.array([2], np.int64), "axis"), numpy_helper.from_array(np.float32(0), "zero")]
    )
    graph.output.append(helper.make_tensor_value_info("masked", TensorProto.FLOAT, ["batch", "seq", 4]))
    return model


def test_multi_input_multi_output_with_integer_and_bool_inputs(tmp_path):
    original = save(multi_io_model(), tmp_path / "multi.onnx")
    folded = save(bnfold.fold(original).model, tmp_path / "folded.onnx")
    report = bnfold.verify(original, folded)
    assert report.equivalent and [o.name for o in report.outputs] == ["y", "masked"]
    assert "note: input 'tokens' axis 0 is batch: used 1 and 2" in report.notes
    assert "note: input 'tokens' axis 1 is seq: used 16, 17 and 32" in report.notes
    # symbols shared between inputs get one size, so the mask lines up with the tokens
    assert {i["name"]: i["shape"] for i in report.inputs}["mask"] == [1, 16]


def test_integer_range_too_large_for_the_table_is_exit_2(tmp_path):
    original = save(multi_io_model(), tmp_path / "multi.onnx")
    result = invoke("verify", original, original, "--int-range", "0:1000")
    assert result.exit_code == 2 and "could not run" in result.stderr


def test_dynamic_batch_with_an_explicit_shape(tmp_path):
    original = SAMPLES / "resnet_tiny.onnx"
    folded = save(bnfold.fold(original).model, tmp_path / "folded.onnx")
    result = invoke("verify", original, folded, "--input-shape", "input:4x3x32x32", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["inputs"][0]["shape"] == [4, 3, 32, 32] and report["notes"] == []
    assert report["outputs"][0]["shape"] == [4, 10]


def test_inputs_from_npz_and_from_a_test_data_folder(tmp_path):
    original = SAMPLES / "resnet_tiny.onnx"
    folded = save(bnfold.fold(original).model, tmp_path / "folded.onnx")
    x = np.load(SAMPLES / "resnet_tiny.npz")["in.input"]
    np.savez(tmp_path / "data.npz", input=x)
    data_set = tmp_path / "model_dir" / "test_data_set_0"
    data_set.mkdir(parents=True)
    (data_set / "input_0.pb").write_bytes(numpy_helper.from_array(x, "input").SerializeToString())
    for source in (tmp_path / "data.npz", tmp_path / "model_dir", data_set):
        report = bnfold.verify(original, folded, inputs=[source])
        assert report.equivalent and report.trials == 1


def test_bfloat16_inputs_are_generated(tmp_path):
    model = conv_bn_model()
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.BFLOAT16
    model.graph.node.insert(0, helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT))
    model.graph.node[1].input[0] = "x32"
    model.opset_import[0].version = 21
    original = save(model, tmp_path / "bf16.onnx")
    folded = save(bnfold.fold(original).model, tmp_path / "folded.onnx")
    assert bnfold.verify(original, folded).equivalent


# ---- seeded mutations: real folding bugs must fail --------------------------------------------
def mutate(monkeypatch, mistake: str) -> None:
    fold_scale_shift, fold_bias, scale_weights = (
        bnfold.folding.affine.fold_scale_shift,
        bnfold.folding.affine.fold_bias,
        bnfold.folding.affine.scale_weights,
    )
    if mistake == "epsilon 1e-3 for 1e-5":
        monkeypatch.setattr(bnfold.folding.sources, "epsilon", lambda bn: 1e-3)
    elif mistake == "beta dropped":
        monkeypatch.setattr(
            bnfold.folding.affine, "fold_scale_shift", lambda g, b, m, v, e: fold_scale_shift(g, 0 * b, m, v, e)
        )
    elif mistake == "conv bias dropped":
        monkeypatch.setattr(bnfold.folding.affine, "fold_bias", lambda b, s, t: fold_bias(None, s, t))
    elif mistake == "scale on the wrong axis":

        def wrong_axis(w, s, axis=0, group=1, dtype=np.float64):
            if w.shape[1] == len(s):
                return scale_weights(w, s, axis=1, dtype=dtype)
            return scale_weights(w, s, axis, group, dtype)

        monkeypatch.setattr(bnfold.folding.affine, "scale_weights", wrong_axis)


def one_bias_off(model: onnx.ModelProto) -> None:
    """One channel of one folded bias 3% off."""
    bias = next(t for t in model.graph.initializer if t.name.endswith("_bnfold") and len(t.dims) == 1)
    values = numpy_helper.to_array(bias).copy()
    values[0] *= 1.03
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))


@pytest.mark.parametrize(
    "mistake, sample",
    [
        ("epsilon 1e-3 for 1e-5", "resnet_tiny"),
        ("beta dropped", "resnet_tiny"),
        ("conv bias dropped", "audio_conv1d"),  # the sample whose convs have biases
        ("scale on the wrong axis", "resnet_tiny"),  # has convs with C_in = C_out
        ("one channel's bias 3% off", "resnet_tiny"),
        ("one channel's bias 3% off", "shared_conv_output"),  # a conv whose output has two readers
    ],
)
def test_seeded_folding_mistakes_are_not_equivalent(mistake, sample, monkeypatch, tmp_path):
    original = SAMPLES / f"{sample}.onnx"
    with monkeypatch.context() as patch:
        mutate(patch, mistake)
        broken = bnfold.fold(original).model
    if mistake.startswith("one channel"):
        one_bias_off(broken)
    assert broken.SerializeToString() != bnfold.fold(original).model.SerializeToString()
    result = invoke("verify", original, save(broken, tmp_path / "broken.onnx"), "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["equivalent"] is False
    assert [o["name"] for o in report["outputs"] if not o["passed"]] == ["output"]
    assert "NOT equivalent" in result.stderr


def test_optimize_writes_nothing_when_verification_fails(monkeypatch, tmp_path):
    model = tmp_path / "net.onnx"
    shutil.copy(SAMPLES / "resnet_tiny.onnx", model)
    monkeypatch.setattr(bnfold.folding.sources, "epsilon", lambda bn: 1e-3)
    result = invoke("optimize", model, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["written"] is False and report["verification"]["equivalent"] is False
    assert "the folded model is not equivalent to the original; nothing was written" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]


def test_models_with_different_outputs_are_not_equivalent(tmp_path):
    a = save(conv_bn_model(), tmp_path / "a.onnx")
    other = conv_bn_model()
    other.graph.output[0].name = "renamed"
    other.graph.node[2].output[0] = "renamed"
    result = invoke("verify", a, save(other, tmp_path / "b.onnx"), "--json")
    assert result.exit_code == 1
    outputs = {o["name"]: o for o in json.loads(result.stdout)["outputs"]}
    assert outputs["y"]["reason"] == "missing from the candidate" and outputs["y"]["max_abs_error"] is None
    assert outputs["renamed"]["reason"] == "only in the candidate"
    assert "missing from the candidate" in result.stderr


# ---- could not run: exit 2, one line ------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--input-shape", "input:1x3xbig"], "--input-shape 'input:1x3xbig': expected NAME:DIMS"),
        (["--input-shape", "nope:1x3x32x32"], "--input-shape names no input of the model: nope"),
        (["--input-shape", "input:3x32x32"], "rank 3, the model declares rank 4"),
        (["--input-shape", "input:100000x3x224x224"], "need more than 1 GiB"),
        (["--int-range", "5:5"], "--int-range 5:5 is empty"),
        (["--int-range", "a:b"], "expected LOW:HIGH"),
        (["--trials", "0"], "--trials must be at least 1"),
        (["--provider", "NoSuchExecutionProvider"], "provider NoSuchExecutionProvider is not available"),
        (["--inputs", "/nonexistent/data.npz"], "no such input file or folder"),
    ],
)
def test_bad_options_are_exit_2(args, message):
    sample = SAMPLES / "resnet_tiny.onnx"
    result = invoke("verify", sample, sample, *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_a_file_that_is_not_a_model_is_exit_2(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model")
    for args in ((junk, SAMPLES / "resnet_tiny.onnx"), (SAMPLES / "resnet_tiny.onnx", tmp_path / "missing.onnx")):
        result = invoke("verify", *args)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output


def test_npz_without_the_input_is_exit_2(tmp_path):
    np.savez(tmp_path / "data.npz", other=np.zeros(3))
    sample = SAMPLES / "resnet_tiny.onnx"
    result = invoke("verify", sample, sample, "--inputs", tmp_path / "data.npz")
    assert result.exit_code == 2 and "no array for input 'input'" in result.stderr


# ---- noisy models: a correct fold beyond the policy, within the model's own float32 noise ----------
def cancelling_model(big: float = 5e3) -> onnx.ModelProto:
    """Conv with a bias near `big` that BN's mean takes away again: in float32 the unfolded model
    rounds the conv output at `big` (an ulp of ~big·1e-7) before the subtraction, so any correct
    fold differs from it by ~1e-4 of the output scale at 5e3."""
    model = conv_bn_model(seed=21)
    rng = np.random.default_rng(21)
    offsets = rng.normal(0, 1, 6)
    for name, values in (
        ("B", big + offsets),
        ("mean", big + offsets + rng.normal(0, 0.1, 6)),
        ("var", np.full(6, 0.5)),
    ):
        tensor = next(t for t in model.graph.initializer if t.name == name)
        tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), name))
    return model


def test_a_fold_within_the_models_own_float32_noise_is_equivalent(tmp_path):
    original = save(cancelling_model(), tmp_path / "noisy.onnx")
    folded = save(bnfold.fold(original).model, tmp_path / "folded.onnx")
    report = bnfold.verify(original, folded)
    (site,) = report.sites  # the BN's output, now made by the Conv
    assert site.name == "bn_out" and site.needed_atol > site.atol  # the policy alone would fail it…
    assert report.equivalent and site.noise is not None  # …but it is this model's float32 noise
    assert site.needed_atol <= 4 * site.noise
    assert "within 4× this model's float32 noise" in report.table()


@pytest.mark.parametrize("big", [1e4, 3e4])
def test_a_fold_within_large_float32_noise_passes_and_its_mistakes_fail_by_their_channels(big, tmp_path):
    # Issue 31: at 1e4 and beyond the reference's own rounding needs more than 4× the atol, and
    # the old cap refused the correct fold as "too noisy". A site whose channels are judged has
    # no cap: a mistake moves or scales a whole channel, which rounding does not.
    original = save(cancelling_model(big), tmp_path / "noisy.onnx")
    folded = bnfold.fold(original).model
    report = bnfold.verify(original, save(folded, tmp_path / "folded.onnx"))
    (site,) = report.sites
    assert site.needed_atol > 4 * site.atol and site.noise is not None  # past the old cap…
    assert report.equivalent and site.rule == "noise", report.table()  # …within this model's noise
    # The mistakes are sized by the output (its channels' RMS is about 1): 3% of this folded bias
    # (0.029) would be 8.6e-4, under one ulp of the original's bias at 1e4 (9.8e-4), which the
    # original cannot tell either.
    bias, weight = (
        next(t for t in folded.graph.initializer if t.name == n) for n in folded.graph.node[0].input[2:0:-1]
    )
    for tensor, wrong in ((bias, lambda b: b + 0.03), (weight, lambda w: w * 1.01)):
        mistaken = onnx.ModelProto()
        mistaken.CopyFrom(folded)
        target = next(t for t in mistaken.graph.initializer if t.name == tensor.name)
        values = numpy_helper.to_array(target).copy()
        values[2] = wrong(values[2])
        target.CopyFrom(numpy_helper.from_array(values, target.name))
        wrong_report = bnfold.verify(original, save(mistaken, tmp_path / "mistaken.onnx"))
        (wrong_site,) = wrong_report.sites
        assert not wrong_report.equivalent and not wrong_site.passed, wrong_report.table()
        assert wrong_site.rule in ("noise", "channel") and wrong_site.reason.startswith("FAIL: ")


def test_an_explicit_atol_is_taken_literally(tmp_path):
    original = save(cancelling_model(), tmp_path / "noisy.onnx")
    folded = save(bnfold.fold(original).model, tmp_path / "folded.onnx")
    report = bnfold.verify(original, folded, atol=5e-5)
    assert not report.equivalent and report.sites[0].noise is None


def test_a_real_mistake_in_a_noisy_model_still_fails(monkeypatch, tmp_path):
    original = save(cancelling_model(), tmp_path / "noisy.onnx")
    mutate(monkeypatch, "epsilon 1e-3 for 1e-5")
    broken = save(bnfold.fold(original).model, tmp_path / "broken.onnx")
    report = bnfold.verify(original, broken)
    (site,) = report.sites
    assert not report.equivalent and not site.passed and site.noise is not None
    assert site.needed_atol > 4 * site.atol  # the mistake, not the cap, decides
    assert report.first_divergence is not None and report.first_divergence.tensor == "bn_out"


# ---- the precision an output is computed in --------------------------------------------------------
FLOAT16_INSIDE = ["resnet_tiny_fp16io", "mobilenet_tiny_fp16io", "efficientnet_tiny_fp16io", "inception_tiny_fp16io"]


@pytest.mark.parametrize("name", FLOAT16_INSIDE)
def test_float16_models_with_float32_outputs_are_judged_as_float16(name, tmp_path):
    # onnxconverter-common's keep_io_types=True: float16 inside, float32 at the edges.
    result = invoke("optimize", SAMPLES / f"{name}.onnx", "-o", tmp_path / "out.onnx", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["summary"]["folded"] == report["summary"]["batch_normalization_nodes"] > 0
    (output,) = report["verification"]["outputs"]
    assert output["dtype"] == "float32" and output["precision"] == "float16" and output["passed"]
    linear = sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in onnx.load(str(SAMPLES / f"{name}.onnx")).graph.node)
    note = f"note: output 'output' is judged as float16: float16 inside: {linear} of {linear} linear ops"
    assert any(n.startswith(note) for n in report["verification"]["notes"]), report["verification"]["notes"]


@pytest.mark.parametrize(
    "mistake, sample",
    [
        ("beta dropped", "resnet_tiny_fp16io"),
        ("beta dropped", "mobilenet_tiny_fp16io"),
        ("beta dropped", "efficientnet_tiny_fp16io"),
        ("scale on the wrong axis", "resnet_tiny_fp16io"),
        ("scale on the wrong axis", "efficientnet_tiny_fp16io"),  # (the others have no square convs)
    ],
)
def test_seeded_mistakes_in_float16_models_still_fail(mistake, sample, monkeypatch, tmp_path):
    model = tmp_path / "net.onnx"
    shutil.copy(SAMPLES / f"{sample}.onnx", model)
    mutate(monkeypatch, mistake)
    result = invoke("optimize", model, "--json")
    assert result.exit_code == 1, result.output
    (output,) = json.loads(result.stdout)["verification"]["outputs"]
    assert output["precision"] == "float16" and not output["passed"]


def test_an_output_with_one_huge_element_does_not_hide_errors_elsewhere():
    want = np.random.default_rng(3).normal(0, 1, 101).astype(np.float32)
    want[50] = 1e6
    got = want + np.float32(10)
    got[50] = want[50]
    result = compare("y", want, got)
    assert not result.passed and result.mismatched == 100 and result.scale < 5


def qdq_model(layers: int = 6) -> onnx.ModelProto:
    """Conv → BN → Relu layers with QuantizeLinear/DequantizeLinear activations (float weights,
    as a model quantized for activations only): every output lies on a grid of step 0.05."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def constant(name, values):
        inits.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def qdq(x, i):
        scale, zero = constant(f"s{i}", np.float32(0.05)), constant(f"z{i}", np.int8(0))
        nodes.append(helper.make_node("QuantizeLinear", [x, scale, zero], [f"q{i}"], name=f"quantize{i}"))
        nodes.append(helper.make_node("DequantizeLinear", [f"q{i}", scale, zero], [f"dq{i}"]))
        return f"dq{i}"

    h, cin = qdq("input", 0), 3
    for i in range(layers):
        w = constant(f"W{i}", (rng.normal(0, 1, (8, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32))
        params = [constant(f"{k}{i}", v.astype(np.float32)) for k, v in bn_parameters(rng, 8).items()]
        nodes.append(helper.make_node("Conv", [h, w], [f"conv{i}"], pads=[1] * 4))
        nodes.append(helper.make_node("BatchNormalization", [f"conv{i}", *params], [f"bn{i}"], name=f"bn{i}"))
        nodes.append(helper.make_node("Relu", [f"bn{i}"], [f"relu{i}"]))
        h, cin = qdq(f"relu{i}", i + 1), 8
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info(h, TensorProto.FLOAT, [1, 8, 16, 16])],
        inits,
    )
    return make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("trials", [3, 10, 30])
def test_a_correct_fold_of_a_quantized_model_passes_at_any_number_of_trials(trials, tmp_path):
    # At 30 trials the fold flips a few elements across a rounding boundary: one step each.
    original = save(qdq_model(), tmp_path / "qdq.onnx")
    folded = save(bnfold.fold(original).model, tmp_path / "folded.onnx")
    report = bnfold.verify(original, folded, trials=trials)
    (output,) = report.outputs
    assert report.equivalent and output.precision == "quantized" and round(output.steps) <= 1
    assert "on the grid of QuantizeLinear 'quantize6' (step 0.05)" in "\n".join(report.notes)


@pytest.mark.parametrize("mistake", ["beta dropped", "epsilon 1e-3 for 1e-5"])
def test_a_folding_mistake_in_a_quantized_model_fails(mistake, monkeypatch, tmp_path):
    original = save(qdq_model(), tmp_path / "qdq.onnx")
    mutate(monkeypatch, mistake)
    broken = save(bnfold.fold(original).model, tmp_path / "broken.onnx")
    for trials in (3, 30):
        assert not bnfold.verify(original, broken, trials=trials).equivalent


def two_outputs(first: str, second: str, swap: bool = False) -> onnx.ModelProto:
    """Outputs A and B, one Relu(x) and one Neg(x), listed in either order."""
    nodes = [helper.make_node("Relu", ["x"], [first]), helper.make_node("Neg", ["x"], [second])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("A", "B")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph(nodes, "two", [x], outputs[::-1] if swap else outputs)
    return make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_outputs_are_paired_by_name_not_by_position(tmp_path):
    reference = save(two_outputs("A", "B"), tmp_path / "ref.onnx")
    listed_otherwise = save(two_outputs("A", "B", swap=True), tmp_path / "same.onnx")
    assert bnfold.verify(reference, listed_otherwise).equivalent
    functions_swapped = save(two_outputs("B", "A", swap=True), tmp_path / "swapped.onnx")
    report = bnfold.verify(reference, functions_swapped)
    assert not report.equivalent and {o.name for o in report.failed} == {"A", "B"}


def sequence_model(negate: bool = False) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Neg" if negate else "Identity", ["x"], ["a"]),
        helper.make_node("Relu", ["x"], ["b"]),
        helper.make_node("SequenceConstruct", ["a", "b"], ["seq"]),
    ]
    output = helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])], [output])
    return make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sequence_outputs_are_compared_element_by_element(tmp_path):
    reference = save(sequence_model(), tmp_path / "ref.onnx")
    report = bnfold.verify(reference, save(sequence_model(), tmp_path / "same.onnx"))
    assert report.equivalent and [o.name for o in report.outputs] == ["seq[0]", "seq[1]"]
    result = invoke("verify", reference, save(sequence_model(negate=True), tmp_path / "neg.onnx"))
    assert result.exit_code == 1 and "seq[0]" in result.stderr and "Traceback" not in result.output


def test_a_map_output_is_one_line_and_exit_2(tmp_path):
    nodes = [helper.make_node("ZipMap", ["x"], ["m"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2])]
    probabilities = helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    graph = helper.make_graph(
        nodes,
        "map",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_value_info("m", helper.make_sequence_type_proto(probabilities))],
    )
    model = make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    path = save(model, tmp_path / "map.onnx")
    result = invoke("verify", path, path)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "is a sequence of maps: bnfold cannot compare it" in result.stderr


# ---- localization: which fold broke it -------------------------------------------------------------
def break_the_fifth_fold(monkeypatch) -> None:
    """One fold (the fifth BN, in graph order) gets a bias 1.0 off; the others stay right."""
    original, calls = bnfold.folding.affine.fold_bias, []

    def fifth_wrong(bias, scale, shift):
        calls.append(1)
        folded = original(bias, scale, shift)
        return folded + 1.0 if len(calls) == 5 else folded

    monkeypatch.setattr(bnfold.folding.affine, "fold_bias", fifth_wrong)


def test_optimize_names_the_fold_that_broke_the_model(monkeypatch, tmp_path):
    model = tmp_path / "net.onnx"
    shutil.copy(SAMPLES / "resnet_tiny.onnx", model)  # 9 BNs
    break_the_fifth_fold(monkeypatch)
    result = invoke("optimize", model, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    fifth = report["batch_normalizations"][4]
    divergence = report["verification"]["first_divergence"]
    assert divergence["tensor"] == fifth["output"]
    assert divergence["fold"] == f"BatchNormalization '{fifth['node']}'"
    assert divergence["candidate_node"] == f"Conv '{fifth['folded_into']}'"
    assert f"first divergence at '{fifth['output']}'" in result.stderr


def test_verify_localize_finds_the_first_tensor_that_differs(monkeypatch, tmp_path):
    original = SAMPLES / "mobilenet_tiny.onnx"  # 11 BNs, depthwise
    with monkeypatch.context() as patch:
        break_the_fifth_fold(patch)
        broken = save(bnfold.fold(original).model, tmp_path / "broken.onnx")
    fifth = bnfold.fold(original).report.batch_norms[4]
    report = bnfold.verify(original, broken, localize=True)
    assert not report and report.first_divergence.tensor == fifth.output
    assert report.first_divergence.reference_node == f"BatchNormalization '{fifth.node}'"
    quiet = invoke("verify", original, broken, "--localize", "-q")  # -q still shows what failed
    assert quiet.exit_code == 1 and f"first divergence at '{fifth.output}'" in quiet.stderr
    assert "output" in quiet.stderr and "NOT equivalent" in quiet.stderr
    # A failing fold site is localized without asking: the isolated copy already holds it.
    assert bnfold.verify(original, broken).first_divergence.tensor == fifth.output


def test_a_report_is_true_when_equivalent(tmp_path):
    original = SAMPLES / "resnet_tiny.onnx"
    assert bnfold.verify(original, original)


# ---- evidence: what was run can be saved and replayed --------------------------------------------
def test_saved_inputs_replay_the_same_verdict(monkeypatch, tmp_path):
    original = SAMPLES / "resnet_tiny.onnx"
    with monkeypatch.context() as patch:
        break_the_fifth_fold(patch)
        broken = save(bnfold.fold(original).model, tmp_path / "broken.onnx")
    first = bnfold.verify(original, broken, save_inputs=tmp_path / "in", save_outputs=tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == [f"test_data_set_{t}" for t in range(3)]
    assert (tmp_path / "out" / "candidate" / "test_data_set_2" / "output_0.pb").is_file()
    replay = bnfold.verify(original, broken, inputs=[tmp_path / "in"])
    assert replay.trials == 3 and not replay
    assert [o.needed_atol for o in replay.outputs] == [o.needed_atol for o in first.outputs]
    assert "note: input 'input' axis 0 is batch: used 1 and 2" in replay.notes  # the shapes run
    expected = onnx.TensorProto()
    expected.ParseFromString((tmp_path / "out" / "test_data_set_1" / "output_0.pb").read_bytes())
    assert expected.name == "output" and list(expected.dims) == [2, 10]


def test_saving_never_writes_into_a_folder_that_holds_files(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    sample = SAMPLES / "resnet_tiny.onnx"
    result = invoke("verify", sample, sample, "--save-inputs", tmp_path / "busy")
    assert result.exit_code == 2 and "exists and is not an empty folder" in result.stderr
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]


def test_inputs_that_name_no_model_input_say_what_they_hold(tmp_path):
    np.savez(tmp_path / "data.npz", image=np.zeros((1, 3, 32, 32), np.float32))
    sample = SAMPLES / "resnet_tiny.onnx"
    result = invoke("verify", sample, sample, "--inputs", tmp_path / "data.npz")
    assert result.exit_code == 2
    assert "no array for input 'input' (found 'image'; the model takes 'input')" in result.stderr


def test_onnxruntimes_whole_message_is_kept(tmp_path):
    np.savez(tmp_path / "data.npz", input=np.zeros((1, 3, 64, 64), np.float32))
    model = conv_bn_model()  # a static 1x2x6x6 input (or so): 64x64 is refused at run time
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 32
    path = save(model, tmp_path / "static.onnx")
    np.savez(tmp_path / "wrong.npz", **{model.graph.input[0].name: np.zeros((1, 2, 64, 6), np.float32)})
    result = invoke("verify", path, path, "--inputs", tmp_path / "wrong.npz")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "Got: 64 Expected: 32" in result.stderr


def test_a_rewrite_that_only_holds_at_batch_1_is_caught(tmp_path):
    def model(batch_mean: bool) -> onnx.ModelProto:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
        if batch_mean:  # the mean over the batch: the row itself at batch 1, not at batch 2
            nodes = [
                helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
                helper.make_node("Shape", ["x"], ["s"]),
                helper.make_node("Expand", ["m", "s"], ["e"]),
                helper.make_node("Relu", ["e"], ["y"]),
            ]
        else:
            nodes = [helper.make_node("Relu", ["x"], ["y"])]
        graph = helper.make_graph(nodes, "batch", [x], [y])
        return make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    reference, candidate = save(model(False), tmp_path / "r.onnx"), save(model(True), tmp_path / "c.onnx")
    assert bnfold.verify(reference, candidate, trials=1)  # batch 1 alone cannot tell them apart
    assert not bnfold.verify(reference, candidate, trials=2)


def test_a_mixed_precision_output_is_judged_by_the_arithmetic_on_its_path():
    from bnfold.verification.precision import output_precisions

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float16), "w16")
    nodes = [
        helper.make_node("Cast", ["x"], ["half"], to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["half", "w16"], ["m"]),
        helper.make_node("Cast", ["m"], ["narrow"], to=TensorProto.FLOAT),
        helper.make_node("Sigmoid", ["x"], ["wide"]),
        helper.make_node("Add", ["narrow", "wide"], ["both"]),
        helper.make_node("Sigmoid", ["half"], ["s16"]),  # no linear op: the other arithmetic counts
        helper.make_node("Cast", ["s16"], ["sigmoid16"], to=TensorProto.FLOAT),
        helper.make_node("Relu", ["half"], ["r16"]),  # float16 passes through, nothing computes in it
        helper.make_node("Cast", ["r16"], ["through16"], to=TensorProto.FLOAT),
    ]
    names = ("wide", "both", "sigmoid16", "through16")
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in names]
    model = make_model(helper.make_graph(nodes, "mixed", [x], outputs, [weight]))
    precisions = output_precisions(model)
    assert precisions["wide"].dtype == "float32" and precisions["both"].dtype == "float16"
    assert precisions["both"].why == "float16 inside: 1 of 1 linear ops compute in float16"
    assert precisions["sigmoid16"].why == "float16 inside: computed by float16 arithmetic"
    assert precisions["through16"].dtype == "float32"
