"""The verdict on the classes of real deployment models (issue 20): each class is built here in
a few lines, its correct fold must be called equivalent, and a real folding mistake in it (one
folded conv's bias 3% of its magnitude off, mid-network) must fail at that fold. Each case also
shows the relaxation it needs: the assertion that the plain policy alone would have failed it."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import bn_parameters, make_model
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from bnfold.verification.tolerance import ChannelStats, channel_stats


class Net:
    """A graph grown one layer at a time; every Conv gets a bias and a BatchNormalization."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def const(self, values, dtype=np.float32) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    def node(self, op: str, inputs: list[str], out: str = "", **attrs) -> str:
        out = out or self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv_bn(self, x: str, cin: int, cout: int, k: int = 3, scale: float = 1.0, **attrs) -> str:
        weight = self.rng.normal(0, scale / np.sqrt(cin * k * k), (cout, cin, k, k))
        conv = self.node(
            "Conv", [x, self.const(weight), self.const(self.rng.normal(0, 0.1, cout))], pads=[k // 2] * 4, **attrs
        )
        p = bn_parameters(self.rng, cout)
        return self.node("BatchNormalization", [conv, *(self.const(p[k]) for k in ("gamma", "beta", "mean", "var"))])

    def model(self, inputs, outputs: list[str], opset: int = 17) -> onnx.ModelProto:
        """The model, its outputs typed by shape inference."""
        untyped = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs]
        graph = helper.make_graph(self.nodes, "net", inputs, untyped, self.inits)
        model = make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        inferred = onnx.shape_inference.infer_shapes(model).graph
        typed = {v.name: v for v in (*inferred.value_info, *inferred.output)}
        del model.graph.output[:]
        model.graph.output.extend(typed[o] for o in outputs)
        return model


def float_input(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def folded(original: Path, tmp_path: Path, requantize: bool = False) -> Path:
    """The model bnfold folds from `original` (without verification), BN gone."""
    result = bnfold.fold(original, requantize=requantize)
    assert result.report.changed
    left = sum(n.op_type == "BatchNormalization" for n in result.model.graph.node)
    assert left == result.report.skipped  # every BN folded but those the report says it kept
    return save(result.model, tmp_path / "folded.onnx")


def mistaken(candidate: Path, tmp_path: Path) -> tuple[Path, set[str]]:
    """`candidate` with the middle folded bias 3% of its magnitude off (a Conv's or Gemm's, or the
    Add after a MatMul): a real folding mistake mid-network. Returns the model and the tensors
    the fold acts through: the biased node's output and what only moves it on (a Conv1D's
    Squeeze), one of which must be where verification finds the difference."""
    model = onnx.load(str(candidate))
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    biased = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and node.input[2:3] and node.input[2] in inits:
            biased.append((node, node.input[2]))
        elif node.op_type == "Add" and any(getattr(producer.get(i), "op_type", "") == "MatMul" for i in node.input):
            biased += [(node, i) for i in node.input if i in inits]
    node, name = biased[len(biased) // 2]
    bias = numpy_helper.to_array(inits[name])
    wrong = (bias.astype(np.float64) + 0.03 * np.abs(bias)).astype(bias.dtype)
    inits[name].CopyFrom(numpy_helper.from_array(wrong, name))
    acts_through, tensor = {node.output[0]}, node.output[0]
    while True:
        readers = [n for n in model.graph.node if tensor in n.input]
        if len(readers) != 1 or readers[0].op_type not in ("Squeeze", "Unsqueeze", "Reshape", "Transpose", "Flatten"):
            break
        tensor = readers[0].output[0]
        acts_through.add(tensor)
    return save(model, tmp_path / "mistaken.onnx"), acts_through


SAMPLES = Path(__file__).parent.parent / "sample_models"


@pytest.mark.parametrize("sample", sorted(p.stem for p in SAMPLES.glob("*.onnx")))
def test_every_sample_folds_equivalently_and_its_seeded_mistake_fails_at_its_fold(sample, tmp_path):
    # PyTorch (both exporters), Keras via tf2onnx, float16 inside, branch merges, QAT: the classes
    # the sample models stand for, each with the mistake where it acts.
    options = {"requantize": True} if sample == "qat_observer_tiny" else {}  # it folds across its quantizers only
    assert_verdicts(SAMPLES / f"{sample}.onnx", tmp_path, **options)


def assert_verdicts(original: Path, tmp_path: Path, **options) -> bnfold.VerifyReport:
    """The correct fold passes (with onnx.checker on the fold, and onnxruntime without its own
    optimizations), and the seeded mistake fails at its fold; returns the correct fold's report."""
    candidate = folded(original, tmp_path, options.get("requantize", False))
    report = bnfold.verify(original, candidate, **options)
    assert report.equivalent, report.table()
    broken, where = mistaken(candidate, tmp_path)
    wrong = bnfold.verify(original, broken, **options)
    assert not wrong.equivalent, wrong.table()
    assert wrong.first_divergence is not None and wrong.first_divergence.tensor in where, wrong.table()
    return report


# ---- float16 inside: a channel moved as a whole -----------------------------------------------------
@pytest.mark.parametrize("sample", ["decoder_convtranspose_fp16io", "preact_input_bn_fp16io"])
def test_a_float16_channel_moved_as_a_whole_fails_within_the_float16_atol(sample, tmp_path):
    # onnxconverter-common's keep_io_types conversion: the seeded bias mistake stays inside
    # float16's atol (1e-2 · S) at its site, but moves the channel's mean many times what
    # re-rounding the parameters does.
    original = SAMPLES / f"{sample}.onnx"
    broken, where = mistaken(folded(original, tmp_path), tmp_path)
    wrong = bnfold.verify(original, broken)
    site = wrong.first_divergence.comparison
    assert site.precision == "float16" and site.needed_atol < site.atol  # the plain policy passes it…
    assert not wrong.equivalent and wrong.first_divergence.tensor in where
    assert "a bias or a mean is off" in site.reason and site.channel_shift > 0  # …its channel mean fails it


def test_channel_shift_finds_a_channel_moved_as_a_whole_not_noise():
    rng = np.random.default_rng(0)
    want = rng.normal(0, 1, (2, 4, 8, 8)).astype(np.float16)
    noisy = (want + rng.normal(0, 2e-3, want.shape)).astype(np.float16)  # rounding-like noise
    shifted = noisy.copy()
    shifted[:, 2] += np.float16(4e-3)  # under the noise's largest element, but on every position
    noise = channel_stats(want, noisy).shift
    shifted_stats = channel_stats(want, shifted)
    assert shifted_stats.shift_channel == 2 and shifted_stats.shift > 5 * noise
    assert channel_stats(want, want).shift == 0.0 and channel_stats(want, want[:1]) == ChannelStats()


def test_a_channel_that_is_one_value_but_for_a_few_pixels_has_no_gain_to_judge():
    # A dead channel of a float16 timm MobileNetV3 after its fold: β − μ·s everywhere but where a
    # few inputs reach it. Those few set the slope alone, and every other difference is exactly 0,
    # so the slope looked significant: a correct fold refused as "channel 23 is scaled by 8.0e-02".
    rng = np.random.default_rng(3)
    want = rng.normal(0, 1, (1, 2, 28, 28)).astype(np.float16)
    want[0, 1] = np.float16(-0.2876)
    want[0, 1, 0, :3] = np.array([0.5, 1.5, 3.0], np.float16)
    got = want.copy()
    got[0, 1, 0, :3] += np.array([0.0, 1.0, 2.0], np.float16) * np.float16(2.0**-9)  # an ulp or two
    got[0, 0] += (rng.normal(0, 1e-3, (28, 28)) * np.abs(want[0, 0])).astype(np.float16)
    assert channel_stats(want, got).gain == 0.0
    scaled = got.copy()
    scaled[0, 0] = want[0, 0] * np.float16(1.01)  # a channel that varies everywhere still shows its gain
    stats = channel_stats(want, scaled)
    assert stats.gain_channel == 0 and abs(stats.gain - 0.01) < 1e-3


def test_a_channel_mean_moves_freely_within_its_bias_allowance_and_counts_beyond_it():
    from bnfold.verification.tolerance import bias_allowance

    want = np.full((1, 2, 8, 8), 1.36e-4, np.float32)
    want[0, 1] = np.linspace(-1, 1, 64).reshape(8, 8)
    terms = np.array([0.187, 2.0])  # |μ·s| + |β| of each channel
    allowed = bias_allowance(terms, "float16")
    assert abs(allowed[0] - 4 * 2.0**-11 * 0.187) < 1e-12 and bias_allowance(terms, "float32") is None
    within, beyond = want.copy(), want.copy()
    within[0, 0] -= 1.4e-5  # onnxslim's float16 arithmetic on GhostNetV2's channel 119: 0.1 of its RMS
    beyond[0, 0] += 1e-3  # a bias 3% off and 1e-3
    assert channel_stats(want, within).shift > 0.09 and channel_stats(want, within, allowed).shift == 0.0
    assert channel_stats(want, beyond, allowed).shift > 1.0


# ---- outputs that magnify float32 noise ------------------------------------------------------------
def test_a_softmax_over_thousands_of_classes(tmp_path):
    # An OCR recognizer's head: a few classes carry all the mass, so S (the 99th percentile of
    # |p|) is tiny and float32 noise in the logits is a large multiple of it.
    net = Net(seed=1)
    x = net.conv_bn("x", 3, 16)
    x = net.node("Relu", [x])
    x = net.conv_bn(x, 16, 16)
    x = net.node("Relu", [x])
    x = net.node("GlobalAveragePool", [x])
    x = net.node("Flatten", [x])
    logits = net.node("Gemm", [x, net.const(net.rng.normal(0, 8, (6625, 16)).T), net.const(np.zeros(6625))])
    probs = net.node("Softmax", [logits], axis=-1)
    original = save(net.model([float_input("x", [1, 3, 16, 16])], [probs]), tmp_path / "rec.onnx")
    report = assert_verdicts(original, tmp_path)
    (out,) = report.outputs
    assert out.needed_atol > 4 * out.atol  # past any capped relaxation: the sites decide
    assert out.noise is not None and out.needed_atol <= 4 * out.noise
    assert all(site.passed for site in report.sites) and len(report.sites) == 2


def test_a_sigmoid_map_that_saturates_on_random_inputs(tmp_path):
    # A DBNet-style text detector's probability map: on random inputs every value is ~1e-5.
    net = Net(seed=2)
    x = net.node("Relu", [net.conv_bn("x", 3, 8)])
    x = net.node("Relu", [net.conv_bn(x, 8, 8)])
    x = net.node("Relu", [net.conv_bn(x, 8, 8)])
    head = net.node("Conv", [x, net.const(net.rng.normal(0, 0.3, (1, 8, 1, 1))), net.const([-12.0])])
    probs = net.node("Sigmoid", [head])
    original = save(net.model([float_input("x", [1, 3, 32, 32])], [probs]), tmp_path / "det.onnx")
    report = assert_verdicts(original, tmp_path)
    (out,) = report.outputs
    assert out.needed_atol > 4 * out.atol and out.noise is not None
    assert len(report.sites) == 3 and all(site.passed for site in report.sites)


# ---- discontinuities after the fold sites ----------------------------------------------------------
def tied_scores_model(tmp_path: Path) -> Path:
    """Conv → BN → Relu → pooled scores → TopK, with channels 0 and 1 identical: their scores tie
    exactly, as a detector's near-duplicate boxes nearly do."""
    net = Net(seed=3)
    x = net.conv_bn("x", 3, 8)
    for tensor in net.inits:  # channel 1 := channel 0, in every per-channel parameter
        values = numpy_helper.to_array(tensor).copy()
        if values.shape[:1] == (8,):
            values[1] = values[0]
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    x = net.node("Flatten", [net.node("GlobalAveragePool", [net.node("Relu", [x])])])
    net.nodes.append(helper.make_node("TopK", [x, net.const([3], np.int64)], ["top", "labels"], name="topk"))
    return save(net.model([float_input("x", [1, 3, 8, 8])], ["top", "labels"]), tmp_path / "tied.onnx")


def nudged(candidate: Path, channel: int, relative: float, tmp_path: Path) -> Path:
    """`candidate` with one channel of its folded bias moved by `relative` of its magnitude: the
    size of a float32 rounding difference, enough to break an exact tie."""
    model = onnx.load(str(candidate))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    bias = next(t for t in model.graph.initializer if t.name == conv.input[2])
    values = numpy_helper.to_array(bias).copy()
    values[channel] += relative * abs(values[channel]) + 1e-6
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    return save(model, tmp_path / "nudged.onnx")


def test_labels_reordered_by_a_near_tie_at_topk_are_explained(tmp_path):
    original = tied_scores_model(tmp_path)
    candidate = nudged(folded(original, tmp_path), 1, 4e-6, tmp_path)
    report = bnfold.verify(original, candidate)
    labels = next(o for o in report.outputs if o.name == "labels")
    assert labels.mismatched > 0 and labels.max_abs_error > 0  # the order really changed…
    assert report.equivalent, report.table()  # …by a near-tie, and the report says so
    assert "after TopK 'topk', whose inputs agree within noise" in labels.explained
    assert not any("'labels'" in note for note in report.notes)  # int64: compared exactly, no precision note
    broken, where = mistaken(candidate, tmp_path)
    wrong = bnfold.verify(original, broken)
    assert not wrong.equivalent and wrong.first_divergence.tensor in where


def test_a_change_after_the_fold_sites_is_not_explained_by_a_tie(tmp_path):
    original = tied_scores_model(tmp_path)
    model = onnx.load(str(nudged(folded(original, tmp_path), 1, 4e-6, tmp_path)))
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type = "LeakyRelu"  # not a fold: a different function after the sites
    relu.attribute.append(helper.make_attribute("alpha", 0.1))
    report = bnfold.verify(original, save(model, tmp_path / "leaky.onnx"))
    assert not report.equivalent and not any(o.explained for o in report.outputs)
    assert [s.name for s in report.sites if not s.passed] == [relu.output[0]]  # every rewritten node is judged


def test_activations_quantized_inside_with_a_float_output(tmp_path):
    # quantize_static on the residual adds and pools: each BN's output goes through
    # QuantizeLinear → DequantizeLinear, and a correct fold moves a few values across a rounding
    # boundary; the one-step flips propagate through the float layers after them.
    net = Net(seed=4)
    x = net.node("Relu", [net.conv_bn("x", 3, 16)])
    step, zero = net.const(0.002), net.const(0, np.uint8)
    x = net.node("DequantizeLinear", [net.node("QuantizeLinear", [x, step, zero]), step, zero])
    x = net.node("Relu", [net.conv_bn(x, 16, 8)])
    original = save(net.model([float_input("x", [1, 3, 64, 64])], [x]), tmp_path / "qdq.onnx")
    report = assert_verdicts(original, tmp_path)
    (out,) = report.outputs
    assert out.precision == "float32" and out.needed_atol > 4 * out.atol  # flips, not float32 noise…
    assert out.explained.startswith(f"ok: {out.mismatched} of {out.elements} differ after QuantizeLinear")


# ---- inputs onnxruntime can run ------------------------------------------------------------------
def strided_model(batch_norm: bool) -> onnx.ModelProto:
    """A detector's backbone and neck: H and W halve five times and come back ×32 to be added to
    the input's features, so they must be multiples of 32 (at 16 the Add fails)."""
    net = Net(seed=5)
    skip = net.node(
        "Relu",
        [
            net.conv_bn("x", 3, 4)
            if batch_norm
            else net.node("Conv", ["x", net.const(net.rng.normal(0, 0.3, (4, 3, 1, 1)))])
        ],
    )
    x = skip
    for _ in range(5):
        x = net.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    up = net.node("Resize", [x, "", net.const([1, 1, 32, 32])], mode="nearest")
    return net.model([float_input("x", [1, 3, "H", "W"])], [net.node("Add", [skip, up])])


def test_a_detector_that_needs_h_and_w_multiples_of_32(tmp_path):
    original = save(strided_model(batch_norm=True), tmp_path / "yolo.onnx")
    report = assert_verdicts(original, tmp_path)
    assert "note: onnxruntime does not run the reference with symbolic dimensions at 16" in report.notes
    assert (
        "note: input 'x' axis 2 is H: used 32, 64 and 96" in report.notes
    )  # 33 refused: 96 is uneven after 5 halvings


def test_a_model_without_batch_norm_is_written_unchanged_without_running_it(tmp_path):
    # onnxruntime cannot run it at the sizes bnfold would try first; nothing needs running.
    original = save(strided_model(batch_norm=False), tmp_path / "nobn.onnx")
    result = CliRunner().invoke(app, ["optimize", str(original), "-o", str(tmp_path / "out.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["written"] and report["unchanged"] and report["verification"] is None
    assert "nothing to fold: written unchanged" in result.stderr
    assert filecmp.cmp(original, tmp_path / "out.onnx", shallow=False)  # byte for byte
    assert bnfold.verify(original, tmp_path / "out.onnx")  # and it does run, at 32


def audio_model() -> onnx.ModelProto:
    """A voice-activity model: samples [batch, N] reflect-padded by 256 (so N > 256), then
    Conv1D as Unsqueeze → Conv → BN → Squeeze, only at the sample rate the graph tests `sr` for
    (the other branch cannot run)."""
    net = Net(seed=6)
    padded = net.node("Pad", ["audio", net.const([0, 256, 0, 256], np.int64)], mode="reflect")
    x = net.node("Unsqueeze", [net.node("Unsqueeze", [padded, net.const([1], np.int64)]), net.const([2], np.int64)])
    x = net.node("Relu", [net.conv_bn(x, 1, 8, k=1)])
    features = net.node("Squeeze", [x, net.const([2], np.int64)])
    matches = net.node("Equal", ["sr", net.const(16000, np.int64)])
    frames = ["batch", 8, "frames"]
    then = helper.make_graph(
        [helper.make_node("Identity", [features], ["kept"])], "then", [], [float_input("kept", frames)]
    )
    bad = helper.make_tensor("bad", TensorProto.INT64, [3], [7, -1, 3])  # 7 does not divide the batch
    other = helper.make_graph(
        [helper.make_node("Reshape", [features, "bad"], ["wrong"])], "else", [], [float_input("wrong", frames)], [bad]
    )
    net.nodes.append(helper.make_node("If", [matches], ["y"], then_branch=then, else_branch=other, name="if"))
    inputs = [float_input("audio", ["batch", "samples"]), helper.make_tensor_value_info("sr", TensorProto.INT64, [])]
    graph = helper.make_graph(net.nodes, "vad", inputs, [float_input("y", frames)], net.inits)
    return make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_audio_model_with_a_sample_rate_input(tmp_path):
    original = save(audio_model(), tmp_path / "vad.onnx")
    report = assert_verdicts(original, tmp_path)
    assert "note: input 'sr' takes 16000: the values the graph compares it with" in report.notes
    # onnxruntime >= 1.25 refuses a reflect pad wider than the input, so bnfold grows N past 256;
    # 1.20 to 1.24 run it at 16
    refuses = tuple(int(part) for part in ort.__version__.split(".")[:2]) >= (1, 25)
    lengths = "512, 513 and 1024" if refuses else "16, 17 and 32"
    assert f"note: input 'audio' axis 1 is samples: used {lengths}" in report.notes


# ---- what is not the model -----------------------------------------------------------------------
def test_stale_value_info_is_dropped_and_reported_not_refused(tmp_path):
    # jax2onnx leaves channels-last shapes in value_info; onnx.checker refuses them, onnxruntime
    # runs the model.
    net = Net(seed=7)
    y = net.node("Relu", [net.conv_bn("x", 3, 8)])
    model = net.model([float_input("x", [1, 3, 8, 8])], [y])
    model.graph.value_info.append(float_input(net.nodes[0].output[0], [1, 8, 8, 8 + 1]))  # NHWC, off by one
    original = save_unchecked(model, tmp_path / "jax.onnx")
    report = folded_and_verified(original, tmp_path / "out.onnx")
    assert report["notes"][0].startswith(
        f"dropped 1 value_info annotation that contradicts the graph or has no type ('{net.nodes[0].output[0]}')"
    )
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


def test_untyped_value_info_is_dropped_with_a_note_not_refused(tmp_path):
    # onnxslim writes a second value_info with an empty type for the outputs of a com.microsoft
    # op (ddddocr's DynamicQuantizeLSTM); the Reshape after it then reads data type 0
    net = Net(seed=7)
    gelu = net.node("Gelu", [net.conv_bn("x", 3, 8)])
    y = net.node("Reshape", [gelu, net.const(np.array([1, 8, 64]), np.int64)])
    model = net.model([float_input("x", [1, 3, 8, 8])], [y])
    next(n for n in model.graph.node if n.op_type == "Gelu").domain = "com.microsoft"
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    model.graph.value_info.extend(
        [float_input(gelu, [1, 8, 8, 8]), onnx.ValueInfoProto(name=gelu, type=onnx.TypeProto())]
    )
    del model.graph.output[:]
    model.graph.output.append(float_input(y, [1, 8, 64]))
    with pytest.raises(ValueError, match="data type 0"):
        onnx.checker.check_model(model, full_check=True)
    original = save_unchecked(model, tmp_path / "slim.onnx")
    report = folded_and_verified(original, tmp_path / "out.onnx")
    assert report["notes"][0].startswith("dropped 1 value_info annotation that contradicts the graph or has no type")
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


def test_an_output_declared_twice_once_with_a_stale_shape_is_declared_as_it_is(tmp_path):
    net = Net(seed=7)
    y = net.node("Relu", [net.conv_bn("x", 3, 8)])
    model = net.model([float_input("x", [1, 3, 8, 8])], [y])
    model.graph.output.append(float_input(y, [1, 8, 4, 4]))  # onnxruntime runs it; the checker refuses it
    original = save_unchecked(model, tmp_path / "twice.onnx")
    report = folded_and_verified(original, tmp_path / "out.onnx")
    assert f"'{y} (a graph output's type)'" in report["notes"][0]
    written = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(written, full_check=True)
    assert [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in written.graph.output] == [[1, 8, 8, 8]] * 2


def test_a_model_whose_only_fault_is_onnxs_own_function_body_is_folded(tmp_path):
    # MeanVarianceNormalization-13's body holds a Constant that onnx's strict inference refuses
    net = Net(seed=7)
    y = net.node("MeanVarianceNormalization", [net.node("Relu", [net.conv_bn("x", 3, 8)])])
    model = net.model([float_input("x", [1, 3, 8, 8])], [y])
    del model.graph.output[:]
    model.graph.output.append(float_input(y, [1, 8, 8, 8]))
    with pytest.raises(Exception, match="op_type:MeanVarianceNormalization"):
        onnx.checker.check_model(model, full_check=True)
    original = save_unchecked(model, tmp_path / "mvn.onnx")
    folded_and_verified(original, tmp_path / "out.onnx")


def test_a_really_invalid_model_is_still_refused(tmp_path):
    net = Net(seed=7)
    y = net.node("Relu", [net.conv_bn("x", 3, 8)])
    model = net.model([float_input("x", [1, 3, 8, 8])], [y])
    model.graph.node[1].output[0] = model.graph.node[0].output[0]  # two tensors of one name
    original = save_unchecked(model, tmp_path / "bad.onnx")
    result = CliRunner().invoke(app, ["optimize", str(original), "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 2 and "the input is not a valid ONNX model" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def folded_and_verified(original: Path, output: Path) -> dict:
    """`bnfold optimize --json` of a model with one BN: exit 0, the BN folded and verified; the report."""
    result = CliRunner().invoke(app, ["optimize", str(original), "-o", str(output), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["summary"]["folded"] == 1 and report["verification"]["equivalent"]
    return report


def save_unchecked(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


# ---- silent passes: each mistake here is ε 1e-3 for the node's 1e-5 (≈ 7e-4 · S, 14× the atol) -----
@pytest.fixture
def epsilon_mistake(monkeypatch):
    import bnfold.folding.sources

    monkeypatch.setattr(bnfold.folding.sources, "epsilon", lambda bn: 1e-3)


def wrong_epsilon_verdict(model: onnx.ModelProto, tmp_path: Path) -> bnfold.VerifyReport:
    original = save(model, tmp_path / "model.onnx")
    candidate = save(bnfold.fold(original).model, tmp_path / "wrong.onnx")
    return bnfold.verify(original, candidate)


def test_a_float16_cast_of_a_constant_does_not_loosen_the_verdict(tmp_path, epsilon_mistake):
    net = Net(seed=8)
    x = net.node("Relu", [net.conv_bn("x", 3, 8)])
    half = net.node("Cast", [net.const(np.full((1, 8, 1, 1), 0.5))], to=TensorProto.FLOAT16)
    y = net.node("Mul", [x, net.node("Cast", [half], to=TensorProto.FLOAT)])
    report = wrong_epsilon_verdict(net.model([float_input("x", [1, 3, 8, 8])], [y]), tmp_path)
    assert not report.equivalent and report.outputs[0].precision == "float32"


def test_a_concat_of_a_grid_and_a_float_branch_is_judged_as_floats(tmp_path, epsilon_mistake):
    net = Net(seed=9)
    step, zero = net.const(0.2), net.const(0, np.int8)
    grid = net.node("DequantizeLinear", [net.node("QuantizeLinear", ["x", step, zero]), step, zero])
    branch = net.node("Relu", [net.conv_bn("x", 3, 3)])
    y = net.node("Concat", [grid, branch], axis=1)
    report = wrong_epsilon_verdict(net.model([float_input("x", [1, 3, 8, 8])], [y]), tmp_path)
    assert not report.equivalent and report.outputs[0].precision == "float32"


def test_a_per_axis_grid_is_judged_in_each_channels_own_step(tmp_path, epsilon_mistake):
    net = Net(seed=10)
    scales = net.const([1.0] + [0.002] * 7)
    zeros = net.const(np.zeros(8), np.int8)
    q = net.node("QuantizeLinear", [net.conv_bn("x", 3, 8), scales, zeros], axis=1)
    y = net.node("DequantizeLinear", [q, scales, zeros], axis=1)
    report = wrong_epsilon_verdict(net.model([float_input("x", [1, 3, 8, 8])], [y]), tmp_path)
    assert not report.equivalent and report.outputs[0].precision == "quantized"
    assert "(step 0.002–1, per channel)" in " ".join(report.notes)


def pooled(op: str) -> onnx.ModelProto:
    net = Net(seed=11)
    x = net.node("Relu", [net.conv_bn("x", 3, 4)])
    y = net.node(op, [x], "y", **({"kernel_shape": [16, 16]} if op == "AveragePool" else {}))
    return net.model([float_input("x", [1, 3, "H", "W"])], [y])


def test_symbolic_sizes_take_two_values_a_fixed_kernel_cannot_fake(tmp_path):
    # A global pool and a 16×16 average pool agree at 16×16, and only there.
    reference = save(pooled("GlobalAveragePool"), tmp_path / "global.onnx")
    candidate = save(pooled("AveragePool"), tmp_path / "fixed.onnx")
    assert bnfold.verify(reference, candidate, trials=1)  # one size cannot tell them apart
    report = bnfold.verify(reference, candidate)
    assert not report.equivalent and "note: input 'x' axis 2 is H: used 16, 17 and 32" in report.notes


# ---- options and providers tell the truth --------------------------------------------------------
@pytest.mark.parametrize("command", ["verify", "optimize"])
@pytest.mark.parametrize("option", [["--atol", "nan"], ["--rtol", "nan"], ["--atol", "-1"], ["--rtol", "inf"]])
def test_a_tolerance_that_cannot_fail_or_cannot_pass_is_refused(command, option, tmp_path):
    original = save(strided_model(batch_norm=True), tmp_path / "m.onnx")
    args = [original, original] if command == "verify" else [original, "-o", tmp_path / "out.onnx"]
    result = CliRunner().invoke(app, [command, *map(str, args), *option])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "must be a finite number ≥ 0" in result.stderr and not (tmp_path / "out.onnx").exists()


def test_a_provider_onnxruntime_did_not_start_is_an_error_not_a_report():
    # onnxruntime-gpu without CUDA falls back to the CPU; bnfold reads what the session runs on.
    from bnfold.errors import BnfoldError
    from bnfold.verification.runtime import make_session, providers_used

    session = make_session(strided_model(batch_norm=True))
    assert providers_used([session], ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(BnfoldError, match="provider CUDAExecutionProvider was asked for but onnxruntime runs on CPU"):
        providers_used([session], ["CUDAExecutionProvider"])


def test_one_box_more_after_non_max_suppression_is_explained(tmp_path):
    # An SSD's last step: a score within float32 noise of NonMaxSuppression's threshold keeps
    # its box in one model and drops it in the other, so the selected indices differ in size.
    def model(threshold: float) -> onnx.ModelProto:
        net = Net(seed=12)
        x = net.conv_bn("x", 3, 4)
        weight = next(t for t in net.inits if t.name == net.nodes[0].input[1])
        values = numpy_helper.to_array(weight).copy()
        values[2] = 0  # channel 2 scores every input alike: its score is known
        weight.CopyFrom(numpy_helper.from_array(values, weight.name))
        scores = net.node("Sigmoid", [net.node("Flatten", [net.node("GlobalAveragePool", [net.node("Relu", [x])])])])
        scores = net.node("Unsqueeze", [scores, net.const([1], np.int64)])  # [batch, classes 1, boxes 4]
        boxes = net.const([[[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5], [6, 6, 7, 7]]])
        limits = [net.const([10], np.int64), net.const([0.5]), net.const([threshold])]
        net.node("NonMaxSuppression", [boxes, scores, *limits], "selected")
        return net.model([float_input("x", [1, 3, 8, 8])], ["selected", scores])

    from builders import run

    constant = float(run(model(0.0), {"x": np.zeros((1, 3, 8, 8), np.float32)})[1][0, 0, 2])
    threshold = float(np.nextafter(np.float32(constant), np.float32(1)))  # just above it: dropped
    original = save(model(threshold), tmp_path / "ssd.onnx")
    candidate = nudged(folded(original, tmp_path), 2, 4e-6, tmp_path)  # …and just above it here
    report = bnfold.verify(original, candidate)
    selected = next(o for o in report.outputs if o.name == "selected")
    assert report.equivalent, report.table()
    assert (
        selected.explained.startswith("ok: the candidate gives shape [")
        and "after NonMaxSuppression" in selected.explained
    )
    broken, where = mistaken(candidate, tmp_path)
    wrong = bnfold.verify(original, broken)
    assert not wrong.equivalent and wrong.first_divergence.tensor in where
