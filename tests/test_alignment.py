"""Issue 31, item 1: `verify` finds the sites of a candidate that other tools renamed and
restructured (bnfold.verification.align), so a mistake is judged where it is made, not only at
outputs that may hide it (a saturated sigmoid)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import make_model
from onnx import TensorProto, helper, numpy_helper
from test_rules import with_tensor
from test_verdict import Net, float_input, folded, save

import bnfold
from bnfold.verification.align import align

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def renamed(path: Path, tmp_path: Path, file: str = "renamed.onnx") -> Path:
    """The model with every tensor but its inputs and outputs under a new name, as simplifiers
    and exporters leave them."""
    model = onnx.load(str(path))
    graph = model.graph
    keep = {v.name for v in [*graph.input, *graph.output]}
    new = {}
    for i, name in enumerate([t.name for t in graph.initializer] + [o for n in graph.node for o in n.output]):
        if name and name not in keep:
            new[name] = f"t{i}"
    for tensor in graph.initializer:
        tensor.name = new.get(tensor.name, tensor.name)
    for node in graph.node:
        node.input[:] = [new.get(n, n) for n in node.input]
        node.output[:] = [new.get(n, n) for n in node.output]
        node.name = ""
    del graph.value_info[:]
    return save(model, tmp_path / file)


def saturating(tmp_path: Path) -> Path:
    """Conv → BN → ReLU → Conv → BN → sigmoid of a large multiple: on random inputs nearly every
    output is 0 or 1, so a mistake shows only where it is made."""
    net = Net(seed=31)
    x = net.node("Relu", [net.conv_bn("x", 3, 8)])
    y = net.conv_bn(x, 8, 4)
    out = net.node("Sigmoid", [net.node("Mul", [y, net.const(np.array(200.0))])], out="map")
    return save(net.model([float_input("x", [1, 3, 16, 16])], [out]), tmp_path / "saturating.onnx")


def bias_mistake(path: Path, tmp_path: Path, index: int = 0) -> Path:
    """The candidate with its `index`-th Conv's bias 3% off in its loudest channel."""
    conv = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"][index]
    return with_tensor(path, conv.input[2], lambda b: b + np.where(np.abs(b) == np.abs(b).max(), 0.03 * b + 1e-2, 0),
                       tmp_path, "mistaken_renamed.onnx")  # fmt: skip


def test_a_renamed_candidate_is_judged_at_its_sites(tmp_path):
    original = saturating(tmp_path)
    candidate = renamed(folded(original, tmp_path), tmp_path)
    report = bnfold.verify(original, candidate)
    assert report.equivalent and len(report.sites) == 2, report.table()
    broken = bias_mistake(candidate, tmp_path)
    report = bnfold.verify(original, broken)
    assert not report.equivalent, report.table()
    assert [s.passed for s in report.sites] == [False, True]  # the first fold's site, under its reference name
    assert report.first_divergence.tensor == report.sites[0].name


def test_a_renamed_softmax_head_is_not_too_large_to_tell(tmp_path):
    # Gemm → BN → Softmax over 4096 classes: renamed, the output was the only site ("too large to tell").
    net = Net(seed=32)
    w = net.const(net.rng.normal(0, 0.2, (64, 4096)))
    gemm = net.node("Gemm", ["x", w, net.const(net.rng.normal(0, 0.1, 4096))])
    p = {k: net.const(v) for k, v in _bn(net.rng, 4096).items()}
    bn = net.node("BatchNormalization", [gemm, p["gamma"], p["beta"], p["mean"], p["var"]])
    original = save(net.model([float_input("x", [2, 64])], [net.node("Softmax", [bn], axis=-1)]), tmp_path / "h.onnx")
    candidate = renamed(folded(original, tmp_path), tmp_path)
    report = bnfold.verify(original, candidate)
    assert report.equivalent and [s.name for s in report.sites] == [bn], report.table()


def _bn(rng, channels):
    return {
        "gamma": rng.uniform(0.5, 1.5, channels),
        "beta": rng.normal(0, 0.1, channels),
        "mean": rng.normal(0, 0.1, channels),
        "var": rng.uniform(0.5, 1.5, channels),
    }


def exported(tmp_path: Path) -> Path:
    """An export as exporters write it: weights as Constant nodes, an Identity after each BN, and a
    Reshape whose shape is computed from the input's; the output a saturating sigmoid."""
    net = Net(seed=33)
    x = net.node("Relu", [net.node("Identity", [net.conv_bn("x", 3, 8)])])
    y = net.node("Identity", [net.conv_bn(x, 8, 4)])
    batch = net.node("Gather", [net.node("Shape", ["x"]), net.const(np.array([0]), np.int64)], axis=0)
    shape = net.node("Concat", [batch, net.const(np.array([-1]), np.int64)], axis=0)
    flat = net.node("Reshape", [net.node("Mul", [y, net.const(np.array(200.0))]), shape])
    out = net.node("Sigmoid", [flat], out="map")
    model = net.model([float_input("x", [1, 3, 16, 16])], [out])
    constants = {t.name: t for t in model.graph.initializer}
    nodes = [helper.make_node("Constant", [], [name], value=tensor) for name, tensor in constants.items()]
    nodes += model.graph.node
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return save(model, tmp_path / "exported.onnx")


def simplifier(path: Path, tmp_path: Path) -> Path:
    """The export as a simplifier leaves it: Constant nodes become initializers under new names,
    Identity nodes go, the computed shape becomes a constant; every other tensor keeps its name."""
    model = onnx.load(str(path))
    graph = model.graph
    new = {}
    initializers, nodes = [], []
    for node in graph.node:
        if node.op_type == "Constant":
            new[node.output[0]] = "init_" + node.output[0]
            initializers.append(
                numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t), new[node.output[0]])
            )
        elif node.op_type == "Identity":
            new[node.output[0]] = new.get(node.input[0], node.input[0])
        elif node.op_type in ("Shape", "Gather", "Concat"):
            new[node.output[0]] = "shape_constant"
        else:
            nodes.append(node)
    initializers.append(numpy_helper.from_array(np.array([1, -1], np.int64), "shape_constant"))
    for node in nodes:
        node.input[:] = [new.get(n, n) for n in node.input]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    return save(model, tmp_path / "simplified.onnx")


@pytest.mark.parametrize("fold_first", [False, True])
def test_a_simplified_export_is_judged_at_its_sites(tmp_path, fold_first):
    original = exported(tmp_path)
    candidate = simplifier(original, tmp_path)
    if fold_first:  # export → bnfold → simplifier, against the export
        candidate = simplifier(folded(original, tmp_path), tmp_path)
    report = bnfold.verify(original, candidate)
    assert report.equivalent, report.table()
    if fold_first:
        # the first fold's BN output, and the Reshape whose shape became a constant (the second
        # fold, BN and Mul into the Conv, lies just before it)
        assert [s.name for s in report.sites] == ["batchnormalization8", "reshape27"]
        broken = bias_mistake(candidate, tmp_path)
        report = bnfold.verify(original, broken)
        assert not report.equivalent and not report.sites[0].passed, report.table()


def test_a_fold_under_the_convs_own_name_is_judged_as_the_bn_output(tmp_path):
    # onnxsim's fusion keeps the Conv's output name: the candidate's `conv` holds what the
    # reference's BN output holds, and the reference's `conv` is another tensor.
    original = saturating(tmp_path)
    candidate = onnx.load(str(folded(original, tmp_path)))
    reference = onnx.load(str(original))
    bn_inputs = {n.output[0]: n.input[0] for n in reference.graph.node if n.op_type == "BatchNormalization"}
    new = {bn_out: conv_out for bn_out, conv_out in bn_inputs.items()}
    for node in candidate.graph.node:
        node.input[:] = [new.get(n, n) for n in node.input]
        node.output[:] = [new.get(n, n) for n in node.output]
    candidate = save(candidate, tmp_path / "conv_named.onnx")
    report = bnfold.verify(original, candidate)
    first_bn = next(iter(bn_inputs))  # the second BN and the Mul after it fold into one Conv, as `mul`
    assert report.equivalent and [s.name for s in report.sites] == [first_bn, "mul19"], report.table()
    report = bnfold.verify(original, bias_mistake(candidate, tmp_path, index=1))
    assert not report.equivalent and [s.passed for s in report.sites] == [True, False], report.table()


def offline_optimized(path: Path, tmp_path: Path) -> Path:
    """onnxruntime's own offline optimization at its basic level (it fuses Conv and BN itself)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "offline.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return tmp_path / "offline.onnx"


def test_onnxruntimes_offline_optimization_is_judged_at_its_sites(tmp_path):
    original = SAMPLES / "resnet_tiny.onnx"
    candidate = offline_optimized(original, tmp_path)
    domains = {o.domain for o in onnx.load(str(candidate)).opset_import}
    assert "com.microsoft" in domains  # it imports opsets the export does not
    report = bnfold.verify(original, candidate)
    assert report.equivalent and report.sites, report.table()
    report = bnfold.verify(original, bias_mistake(candidate, tmp_path, index=3))
    assert not report.equivalent and any(not s.passed for s in report.sites), report.table()


def test_a_float16_model_that_onnxruntime_turned_into_float32_is_judged_at_its_sites(tmp_path):
    # onnxruntime's CPU optimizer computes a float16 model in float32 (Casts on every weight) and
    # keeps the float16 value_info of names it no longer has; folded by bnfold after that, the
    # sites are compared in the reference's float16, across Casts in the probe
    original = SAMPLES / "preact_input_bn_fp16io.onnx"
    candidate = folded(offline_optimized(original, tmp_path), tmp_path)
    model = onnx.load(str(candidate))
    weights = {t.name: t.data_type for t in model.graph.initializer}
    assert TensorProto.FLOAT in {weights.get(n.input[1]) for n in model.graph.node if n.op_type == "Conv"}
    report = bnfold.verify(original, candidate)
    assert report.equivalent and report.sites, report.table()
    stem = next(n for n in model.graph.node if n.op_type == "Conv")  # the input BN folded into it
    loudest_up = lambda b: b + np.where(np.abs(b) == np.abs(b).max(), 0.03 * np.abs(b), 0)  # noqa: E731
    report = bnfold.verify(original, with_tensor(candidate, stem.input[2], loudest_up, tmp_path))
    assert not report.equivalent and not report.sites[0].passed, report.table()


def test_align_names_each_candidate_tensor_after_the_reference_tensor_it_is(tmp_path):
    original = exported(tmp_path)
    reference = onnx.load(str(original))
    alignment = align(reference, onnx.load(str(renamed(simplifier(original, tmp_path), tmp_path))))
    assert [list(n.input) for n in alignment.candidate.graph.node if n.op_type == "Conv"] == [
        list(n.input) for n in reference.graph.node if n.op_type == "Conv"
    ]  # Constant nodes and initializers of one value, and the tensors between them
    assert len(alignment.same) == len(alignment.constants) + 7  # x, the convs, BNs, ReLU and Mul: the same computation

    candidate = renamed(simplifier(folded(original, tmp_path), tmp_path), tmp_path)
    alignment = align(reference, onnx.load(str(candidate)))
    ours = {n.op_type: list(n.output) for n in reference.graph.node}
    theirs = {n.op_type: list(n.output) for n in alignment.candidate.graph.node}
    assert theirs["Relu"] == ours["Relu"] and theirs["Reshape"] == ours["Reshape"] and "Mul" not in theirs
    first_bn = next(n.output[0] for n in reference.graph.node if n.op_type == "BatchNormalization")
    convs = [n.output[0] for n in alignment.candidate.graph.node if n.op_type == "Conv"]
    assert convs == [first_bn, ours["Mul"][0]]  # each fold's result is what it replaces: BN, and BN → Mul


def test_a_tensor_the_reference_names_otherwise_gets_a_name_of_its_own():
    def model(ops):
        nodes = [helper.make_node(op, [i], [o]) for op, i, o in ops]
        graph = helper.make_graph(nodes, "g", [float_input("x", [2])], [float_input("y", [2])])
        return make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    reference = model([("Relu", "x", "a"), ("Neg", "a", "y")])
    candidate = model([("Sigmoid", "x", "b"), ("Abs", "b", "a"), ("Neg", "a", "y")])
    names = [list(n.output) for n in align(reference, candidate).candidate.graph.node]
    # Neg makes y in both: what it reads is the reference's `a`; Sigmoid's output is only the candidate's
    assert names[2] == ["y"] and names[1] == ["a"] and names[0][0] not in ("a", "x", "y")


def test_dtype_of_constants_counts():
    # one value, two types: not the same constant
    reference = make_model(
        helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"])], "g", [float_input("x", [2])],
                          [float_input("y", [2])], [numpy_helper.from_array(np.ones(2, np.float32), "c")]),
        opset_imports=[helper.make_opsetid("", 17)],
    )  # fmt: skip
    candidate = onnx.ModelProto()
    candidate.CopyFrom(reference)
    candidate.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones(2, np.float64).astype(np.float16), "c"))
    assert "c" not in align(reference, candidate).constants
    assert TensorProto.FLOAT16 == candidate.graph.initializer[0].data_type


# ---- issue 31, item 4: symbolic sizes that are no power of two -----------------------------------
def same_upper(pads=None) -> onnx.ModelProto:
    """A stride-2 3×3 Conv over symbolic H and W: SAME_UPPER padding, or fixed `pads`."""
    attrs = {"pads": pads} if pads else {"auto_pad": "SAME_UPPER"}
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2], kernel_shape=[3, 3], **attrs)
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "h", "w"])
    graph = helper.make_graph([node], "g", [float_input("x", [1, 3, "H", "W"])], [output], [weight])
    return make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fixed_pads_for_same_upper_are_caught_at_an_odd_size(tmp_path):
    # SAME_UPPER at stride 2 pads (0, 1) at even sizes and (1, 1) at odd ones: pads written for 16 are wrong at 17.
    reference = save(same_upper(), tmp_path / "same.onnx")
    candidate = save(same_upper(pads=[0, 0, 1, 1]), tmp_path / "fixed.onnx")
    assert bnfold.verify(reference, candidate, trials=2).equivalent  # 16 and 32 cannot tell them apart
    report = bnfold.verify(reference, candidate)
    assert not report.equivalent and "note: input 'x' axis 2 is H: used 16, 17 and 32" in report.notes


def test_an_if_whose_condition_the_candidate_computes_under_its_own_name_is_judged_at_its_sites(tmp_path):
    # onnxslim on silero VAD: the candidate's If reads a condition tensor the reference does not
    # have; exposing it in the probe made onnxruntime refuse the probe, and a mistake passed.
    from test_subgraphs import if_model

    model = if_model()
    original = save(model, tmp_path / "if.onnx")
    candidate = bnfold.fold(model).model
    branch = candidate.graph.node[0]
    branch.input[0] = "cond_again"
    not_nodes = [helper.make_node("Not", ["cond"], ["not_cond"]), helper.make_node("Not", ["not_cond"], ["cond_again"])]
    nodes = [*not_nodes, *candidate.graph.node]
    del candidate.graph.node[:]
    candidate.graph.node.extend(nodes)
    candidate = save(candidate, tmp_path / "if_folded.onnx")
    x = np.random.default_rng(0).normal(size=(1, 4, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "then.npz", x=x, cond=np.array(True))
    report = bnfold.verify(original, candidate, inputs=[tmp_path / "then.npz"])
    assert report.equivalent and report.sites and not any("cannot be judged" in n for n in report.notes), report.notes


# ---- the yardstick at outputs: a rewrite that reads no float parameter -------------------------------
def thirds(divide: bool) -> onnx.ModelProto:
    """y = sin(1000 · Σ (x·W)/3), the third as Div by 3 or as Mul by float32(1/3): they differ by
    an ulp in a third of the elements, and the sine makes that 1e-3."""
    net = Net(seed=34)
    h = net.node("MatMul", ["x", net.const(net.rng.normal(0, 1, (64, 64)))])
    third = (
        net.node("Div", [h, net.const(np.array(3.0))]) if divide else net.node("Mul", [h, net.const(np.array(1 / 3))])
    )
    total = net.node("ReduceSum", [third, net.const(np.array([1]), np.int64)], keepdims=1)
    out = net.node("Sin", [net.node("Mul", [total, net.const(np.array(1000.0))])], out="y")
    return net.model([float_input("x", [1, 64])], [out])


def test_outputs_of_a_rewrite_that_reads_only_whole_numbers_are_judged_by_every_parameters_noise(tmp_path):
    # onnxslim on silero VAD rewrote only nodes whose parameters are whole numbers: rounding those
    # the other way moved nothing, the output's noise was 0, and a 1-ulp difference amplified by
    # the model failed "beyond 4× this model's own float32 noise (0.0e+00)".
    reference = save(thirds(divide=True), tmp_path / "div.onnx")
    candidate = save(thirds(divide=False), tmp_path / "mul.onnx")
    x = np.random.default_rng(3).normal(0, 1, (1, 64)).astype(np.float32)  # one where they differ
    np.savez(tmp_path / "x.npz", x=x)
    report = bnfold.verify(reference, candidate, inputs=[tmp_path / "x.npz"])
    (output,) = report.outputs
    assert output.needed_atol > output.atol and output.noise, report.table()  # the policy alone would fail it
    assert report.equivalent, report.table()


# ---- a model that runs at batch 1 only (issue 31, item 4) ------------------------------------------
@pytest.mark.parametrize("free", [False, True])
def test_a_model_that_runs_at_batch_1_only_is_verified_there_with_a_note(tmp_path, free):
    # A wheel-shipped token tagger declares a symbolic batch but squeezes it away: at batch 2
    # onnxruntime refuses, and `verify M M` was exit 2.
    shape = ["N", 8, "T"] if free else ["N", 8, 16]
    nodes = [
        helper.make_node("Squeeze", ["x", "zero"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "tagger", [float_input("x", shape)], [float_input("y", shape[1:])],
        [numpy_helper.from_array(np.array([0], np.int64), "zero")],
    )  # fmt: skip
    model = save(make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "tagger.onnx")
    report = bnfold.verify(model, model)
    assert report.equivalent and report.trials == 3, report.notes
    assert any(n.startswith("note: onnxruntime does not run the reference at batch 2") for n in report.notes)
    assert "note: input 'x' axis 0 is N: used 1" in report.notes
    if free:
        assert "note: input 'x' axis 2 is T: used 16, 17 and 32" in report.notes


# ---- saturated outputs say so (issue 31, item 4) ------------------------------------------------------
def test_an_output_saturated_by_the_generated_inputs_says_so(tmp_path):
    original = saturating(tmp_path)
    report = bnfold.verify(original, folded(original, tmp_path))
    note = next(n for n in report.notes if n.startswith("note: output 'map' is saturated on the generated inputs"))
    assert "--inputs" in note, note
    x = np.random.default_rng(0).normal(0, 1, (1, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    report = bnfold.verify(original, folded(original, tmp_path), inputs=[tmp_path / "x.npz"])
    assert not any("saturated" in n for n in report.notes)  # the user's own inputs: their business


def test_an_output_that_is_not_saturated_has_no_such_note(tmp_path):
    net = Net(seed=37)
    y = net.node("Sigmoid", [net.node("Relu", [net.conv_bn("x", 3, 4)])], out="map")
    original = save(net.model([float_input("x", [1, 3, 16, 16])], [y]), tmp_path / "soft.onnx")
    report = bnfold.verify(original, folded(original, tmp_path))
    assert report.equivalent and not any("saturated" in n for n in report.notes), report.notes


def test_another_output_shape_at_a_symbolic_size_is_exit_1_without_a_traceback(tmp_path):
    # Issue 32: the first divergence had no numbers to print (`needed atol` None): a TypeError
    import subprocess
    import sys

    reference = save(same_upper(), tmp_path / "same.onnx")
    candidate = save(same_upper(pads=[0, 0, 1, 1]), tmp_path / "fixed.onnx")
    run = subprocess.run([sys.executable, "-m", "bnfold", "verify", str(reference), str(candidate)],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "first divergence at 'y'" in run.stderr and "candidate gives shape" in run.stderr


def _forward_into_the_head(gelu_half: bool) -> onnx.ModelProto:
    """x → Conv → BN → Relu → (BN | Mul by 0.5) → GlobalAveragePool → Flatten → Gemm: the last
    map folds forward into the head through the pooling, after an earlier fold changed the conv
    (StarNet's last BN; the TorchScript GELU's Mul by 0.5 before FastViT's head)."""
    rng = np.random.default_rng(3)
    inits = []

    def const(value, name):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    for prefix in ("a", "b"):
        const(rng.uniform(0.5, 1.5, 6), f"{prefix}_gamma"), const(rng.normal(0, 0.3, 6), f"{prefix}_beta")
        const(rng.normal(0, 0.3, 6), f"{prefix}_mean"), const(rng.uniform(0.5, 1.5, 6), f"{prefix}_var")
    last = (
        helper.make_node("Mul", ["r", const(0.5, "half")], ["m"], name="half")
        if gelu_half
        else helper.make_node("BatchNormalization", ["r", "b_gamma", "b_beta", "b_mean", "b_var"], ["m"], name="bn2")
    )
    nodes = [
        helper.make_node("Conv", ["x", const(rng.normal(size=(6, 3, 3, 3)), "w"), const(rng.normal(size=6), "cb")],
                         ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "a_gamma", "a_beta", "a_mean", "a_var"], ["bn1"], name="bn1"),
        helper.make_node("Relu", ["bn1"], ["r"], name="relu"),
        last,
        helper.make_node("GlobalAveragePool", ["m"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", const(rng.normal(size=(4, 6)), "W"), const(rng.normal(size=4), "B")], ["y"],
                         name="head", transB=1),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits,
    )  # fmt: skip
    return make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("gelu_half", [False, True], ids=["BN", "Mul by 0.5"])
def test_a_map_folded_forward_through_the_pooling_is_judged_at_the_head(tmp_path, gelu_half):
    # The names and the lone ops around the pooling (GlobalAveragePool, Flatten: one of each on
    # both sides) used to pair the candidate's ReLU output with the reference's BN output: a
    # correct fold refused (timm's StarNet, both exporters; FastViT's TorchScript export)
    model = _forward_into_the_head(gelu_half)
    result = bnfold.fold(model)
    assert (result.report.folded, len(result.report.channel_affines)) == ((1, 1) if gelu_half else (2, 0))
    assert not {"BatchNormalization", "Mul"} & {n.op_type for n in result.model.graph.node}
    save(model, tmp_path / "m.onnx")
    save(result.model, tmp_path / "f.onnx")
    report = bnfold.verify(tmp_path / "m.onnx", tmp_path / "f.onnx")
    assert report.equivalent, report.table()
    assert {s.name for s in report.sites} >= {"y"} and all(s.passed for s in report.sites)
    wrong = result.model
    bias = next(
        t
        for t in wrong.graph.initializer
        if t.name == next(n for n in wrong.graph.node if n.op_type == "Gemm").input[2]
    )
    values = numpy_helper.to_array(bias).copy()
    values[np.argmax(np.abs(values))] *= 1.03
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    save(wrong, tmp_path / "wrong.onnx")
    assert not bnfold.verify(tmp_path / "m.onnx", tmp_path / "wrong.onnx").equivalent
