"""Issue 31: the verdict as a table of rules (bnfold.verification.verdict), the silent passes it
closes and the false alarms it no longer raises. Each rule of the table, removed or made to
always pass, turns one of these verdicts around (test_each_rule_decides_a_verdict)."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import make_model
from onnx import TensorProto, helper, numpy_helper
from test_verdict import Net, float_input, folded, save
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from bnfold.verification import verdict


def with_tensor(model_path: Path, name: str, change, tmp_path: Path, file: str = "mistaken.onnx") -> Path:
    """The model with initializer `name` changed by `change` (on a float64 copy of its values)."""
    model = onnx.load(str(model_path))
    tensor = next(t for t in model.graph.initializer if t.name == name)
    values = numpy_helper.to_array(tensor)
    tensor.CopyFrom(numpy_helper.from_array(change(values.astype(np.float64).copy()).astype(values.dtype), name))
    return save(model, tmp_path / file)


def conv_of(model_path: Path, index: int = -1) -> onnx.NodeProto:
    return [n for n in onnx.load(str(model_path)).graph.node if n.op_type == "Conv"][index]


# ---- per channel: one S per tensor hid a quiet channel ------------------------------------------------
def loud_and_quiet(tmp_path: Path) -> Path:
    """Conv → BN whose channel 0 is 300× louder than the others."""
    net = Net(seed=11)
    y = net.conv_bn("x", 3, 8)
    gamma = next(t for t in net.inits if t.name == net.nodes[-1].input[1])
    values = numpy_helper.to_array(gamma).copy()
    values[0] *= 300
    gamma.CopyFrom(numpy_helper.from_array(values, gamma.name))
    return save(net.model([float_input("x", [1, 3, 16, 16])], [net.node("Relu", [y])]), tmp_path / "loud.onnx")


def test_a_loud_channel_does_not_hide_a_mistake_in_a_quiet_one(tmp_path):
    original = loud_and_quiet(tmp_path)
    candidate = folded(original, tmp_path)
    assert bnfold.verify(original, candidate).equivalent
    bias = conv_of(candidate).input[2]
    broken = with_tensor(candidate, bias, lambda b: b + np.where(np.arange(8) == 3, 0.03 * np.abs(b), 0), tmp_path)
    report = bnfold.verify(original, broken)
    (site,) = report.sites
    assert site.needed_atol < site.atol  # one S for the tensor: the policy passes it…
    assert not report.equivalent and site.rule == "channel" and "channel 3 " in site.reason  # …its channel does not


# ---- a systematic shift at a float32 site, under the atol --------------------------------------------
def test_a_bias_mistake_under_the_float32_atol_fails_by_its_channel_mean(tmp_path):
    # The captcha reader's class: the last conv's outputs are in the hundreds, then a ReLU, a global
    # pool and five softmax heads. Its folded bias 3% off moved the site by 4.4e-5·S (atol 5e-5·S).
    net = Net(seed=12)
    x = net.node("Relu", [net.conv_bn("x", 3, 16)])
    last = net.conv_bn(x, 16, 16, scale=40.0)
    pooled = net.node("Flatten", [net.node("GlobalAveragePool", [net.node("Relu", [last])])])
    heads = []
    for _ in range(5):
        w = net.const(net.rng.normal(0, 0.05, (16, 10)))
        heads.append(net.node("Softmax", [net.node("Gemm", [pooled, w, net.const(np.zeros(10))])], axis=-1))
    original = save(net.model([float_input("x", [1, 3, 16, 16])], heads), tmp_path / "captcha.onnx")
    candidate = folded(original, tmp_path)
    assert bnfold.verify(original, candidate).equivalent
    bias = conv_of(candidate).input[2]
    broken = with_tensor(candidate, bias, lambda b: b + np.where(np.arange(16) == 5, 0.03 * np.abs(b), 0), tmp_path)
    report = bnfold.verify(original, broken)
    site = next(s for s in report.sites if not s.passed)
    assert site.needed_atol < site.atol and site.rule == "channel", report.table()
    assert not report.equivalent and report.first_divergence.tensor == site.name


# ---- what the structural diff did not see ------------------------------------------------------------
def after_a_greater(tmp_path: Path) -> Path:
    """Conv → BN → Relu → pool → Greater(·, 0.5) → Cast → Add(·, c) → output: everything after the
    fold lies behind a discontinuity."""
    net = Net(seed=13)
    pooled = net.node("Flatten", [net.node("GlobalAveragePool", [net.node("Relu", [net.conv_bn("x", 3, 8)])])])
    flags = net.node("Cast", [net.node("Greater", [pooled, net.const(np.float32(0.5))])], to=TensorProto.FLOAT)
    net.nodes.append(helper.make_node("Add", [flags, "c"], ["out"], name="add_c"))
    values = np.zeros(8, np.float32)
    values[[1, 5]] = [2.0, 3.0]
    net.inits.append(numpy_helper.from_array(values, "c"))
    model = net.model([float_input("x", [1, 3, 8, 8])], [pooled])
    model.graph.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8]))
    return save(model, tmp_path / "greater.onnx")


def with_sparse_c(path: Path, values: list[float]) -> Path:
    """The model with its initializer `c` as a sparse initializer holding `values` at 1 and 5
    (onnx's checker types a sparse initializer apart from a dense input; onnxruntime runs it)."""
    model = onnx.load(str(path))
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "c"))
    indices = numpy_helper.from_array(np.array([1, 5], np.int64))
    model.graph.sparse_initializer.append(
        helper.make_sparse_tensor(numpy_helper.from_array(np.array(values, np.float32), "c"), indices, [8])
    )
    sparse = path.with_name(f"sparse_{'_'.join(map(str, values))}_{path.name}")
    onnx.save(model, str(sparse))
    return sparse


def test_a_changed_sparse_initializer_is_a_rewrite_not_a_near_tie(tmp_path):
    dense = after_a_greater(tmp_path)
    original, candidate = with_sparse_c(dense, [2.0, 3.0]), with_sparse_c(folded(dense, tmp_path), [2.0, 3.0])
    assert bnfold.verify(original, candidate).equivalent
    report = bnfold.verify(original, with_sparse_c(folded(dense, tmp_path), [2.0, 4.5]))
    assert not report.equivalent and not any(o.explained for o in report.outputs), report.table()
    assert report.first_divergence.tensor == "out"  # the Add that reads it is rewritten, and judged there


def shape_reader(tmp_path: Path) -> Path:
    """Two folds; the second's output is read only by Shape, which the graph returns."""
    net = Net(seed=14)
    relu = net.node("Relu", [net.conv_bn("x", 3, 4)])
    shape = net.node("Shape", [net.conv_bn("x", 3, 4)])
    return save(net.model([float_input("x", [1, 3, 8, 8])], [relu, shape]), tmp_path / "shape.onnx")


def test_a_tensor_read_only_by_shape_is_judged_by_its_shape(tmp_path):
    original = shape_reader(tmp_path)
    candidate = folded(original, tmp_path)
    report = bnfold.verify(original, candidate)
    assert report.equivalent and len(report.sites) == 2, report.table()  # the Shape-read fold is a site too
    model = onnx.load(str(candidate))
    second = [n for n in model.graph.node if n.op_type == "Conv"][1]
    second.attribute.append(helper.make_attribute("strides", [2, 2]))
    report = bnfold.verify(original, save(model, tmp_path / "strided.onnx"))
    assert not report.equivalent and report.first_divergence.tensor == second.output[0], report.table()
    assert "read by Shape" in report.first_divergence.comparison.reason


def test_sites_are_judged_on_every_input_set_whose_outputs_differ(tmp_path):
    # Two input sets of one shape: zeros, on which a weight mistake shows nothing, then numbers.
    # The sites were judged on the first set of each shape only; the second now runs the probe too.
    net = Net(seed=15)
    relu = net.node("Relu", [net.conv_bn("x", 3, 8)])
    original = save(net.model([float_input("x", [1, 3, 8, 8])], [relu]), tmp_path / "net.onnx")
    candidate = folded(original, tmp_path)
    broken = with_tensor(candidate, conv_of(candidate).input[1], lambda w: w * 1.01, tmp_path)
    data = tmp_path / "inputs.json"
    sets = [np.zeros((1, 3, 8, 8), np.float32), np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)]
    for number, x in enumerate(sets):
        folder = tmp_path / "data" / f"test_data_set_{number}"
        folder.mkdir(parents=True)
        (folder / "input_0.pb").write_bytes(numpy_helper.from_array(x, "x").SerializeToString())
    report = bnfold.verify(original, broken, inputs=[tmp_path / "data"])
    assert not report.equivalent and report.first_divergence is not None, report.table()
    assert report.first_divergence.tensor == conv_of(candidate).output[0]  # at the fold, not only the output
    assert not data.exists()


# ---- inputs that cannot show a difference ------------------------------------------------------------
@pytest.mark.parametrize("content", ["[]", "nan"])
def test_inputs_that_can_show_no_difference_are_exit_2(content, tmp_path):
    net = Net(seed=16)
    original = save(net.model([float_input("x", [1, 3, 8, 8])], [net.conv_bn("x", 3, 4)]), tmp_path / "net.onnx")
    candidate = folded(original, tmp_path)
    if content == "[]":
        given = tmp_path / "inputs.json"
        given.write_text("[]")
        expected = "holds no input set"
    else:
        given = tmp_path / "inputs.npz"
        np.savez(given, x=np.full((1, 3, 8, 8), np.nan, np.float32))
        expected = "holds no finite value"
    result = CliRunner().invoke(app, ["verify", str(original), str(candidate), "--inputs", str(given)])
    assert result.exit_code == 2 and expected in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    written = tmp_path / "written.onnx"
    result = CliRunner().invoke(app, ["optimize", str(original), "-o", str(written), "--inputs", str(given)])
    assert result.exit_code == 2 and not written.exists()


# ---- stored outputs ------------------------------------------------------------------------------------
def test_saved_outputs_are_read_on_their_own_and_unnamed_outputs_pair_by_position(tmp_path):
    net = Net(seed=17)
    out = net.node("Relu", [net.conv_bn("x", 3, 4)])
    original = save(net.model([float_input("x", [1, 3, 8, 8])], [out]), tmp_path / "net.onnx")
    candidate = folded(original, tmp_path)
    saved = tmp_path / "saved"
    assert bnfold.verify(original, candidate, save_outputs=saved).equivalent
    assert bnfold.verify_against_outputs(candidate, saved).equivalent  # inputs beside outputs
    for pb in saved.glob("test_data_set_*/output_0.pb"):  # onnx's backend test data: no names
        tensor = onnx.TensorProto()
        tensor.ParseFromString(pb.read_bytes())
        tensor.name = ""
        pb.write_bytes(tensor.SerializeToString())
    assert bnfold.verify_against_outputs(candidate, saved).equivalent
    broken = with_tensor(candidate, conv_of(candidate).input[2], lambda b: b + 0.03 * np.abs(b), tmp_path)
    assert not bnfold.verify_against_outputs(broken, saved).equivalent


# ---- the table: every rule decides a verdict -----------------------------------------------------------
def _without(name: str) -> tuple:
    return tuple(r for r in verdict.RULES if r.name != name)


def _always_passing(name: str) -> tuple:
    return tuple(
        replace(r, judge=lambda m, so_far, ev, n=r.name: verdict.Judgement(True, n)) if r.name == name else r
        for r in verdict.RULES
    )


# ---- a site too small for channels: a float16 Gemm → BN1d (N, C) ---------------------------------------
def mlp16(tmp_path: Path) -> Path:
    """Gemm → BatchNormalization → ReLU in float16: its fold's site is (N, 64), one element per
    channel and trial, too few for the channel rule."""
    rng = np.random.default_rng(36)
    values = {"w": rng.normal(0, 0.2, (32, 64)), "b": rng.normal(0, 0.1, 64), "g": rng.uniform(0.5, 1.5, 64),
              "be": rng.normal(0, 0.1, 64), "m": rng.normal(0, 0.1, 64), "v": rng.uniform(0.5, 1.5, 64)}  # fmt: skip
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"]),
        helper.make_node("BatchNormalization", ["h", "g", "be", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp16", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 64])],
        [numpy_helper.from_array(v.astype(np.float16), k) for k, v in values.items()],
    )  # fmt: skip
    return save(make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "mlp16.onnx")


def one_column_off(path: Path, tmp_path: Path, rank: int = 2) -> Path:
    """The fold with one output channel's weights ×1.01: the channel `rank`-th loudest, under
    float16's atol where it is (the loudest one fails the policy itself)."""
    gemm = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "Gemm")
    weights = numpy_helper.to_array(next(t for t in onnx.load(str(path)).graph.initializer if t.name == gemm.input[1]))
    channel = int(np.argsort(-np.abs(weights.astype(np.float64)).sum(axis=0))[rank])
    return with_tensor(path, gemm.input[1], lambda w: np.where(np.arange(64) == channel, w * 1.01, w), tmp_path)


def test_a_site_too_small_for_channels_is_judged_by_its_elements(tmp_path):
    original = mlp16(tmp_path)
    candidate = folded(original, tmp_path)
    assert bnfold.verify(original, candidate).equivalent
    report = bnfold.verify(original, one_column_off(candidate, tmp_path))
    (site,) = report.sites
    assert site.needed_atol < site.atol  # float16's policy passes it…
    assert not report.equivalent and site.rule == "elements", report.table()  # …its elements do not


# ---- a site too small even for its elements: its weights against the exact fold ------------------------
SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def se_reduce_off(candidate: Path, tmp_path: Path) -> Path:
    """`candidate` (efficientnet_tiny_fp16io folded) with its second SE block's reduce conv's
    loudest output channel ×1.01: bench/chains.py's seeded mistake that passed every rule by
    numbers, its (N, 4, 1, 1) site moving as far as rounding its weights the other way does."""
    conv = next(
        n for n in onnx.load(str(candidate)).graph.node if n.name.endswith("features.2/block/block.2/reduce/Conv")
    )
    weights = numpy_helper.to_array(
        next(t for t in onnx.load(str(candidate)).graph.initializer if t.name == conv.input[1])
    )
    loud = int(np.abs(weights.astype(np.float64)).reshape(len(weights), -1).sum(axis=1).argmax())
    return with_tensor(candidate, conv.input[1], lambda w: np.where(np.arange(len(w))[:, None, None, None] == loud,
                                                                     w * 1.01, w), tmp_path)  # fmt: skip


def test_a_float16_se_block_with_one_channel_off_fails_by_its_weights(tmp_path):
    original = SAMPLES / "efficientnet_tiny_fp16io.onnx"
    candidate = folded(original, tmp_path)
    assert bnfold.verify(original, candidate).equivalent
    report = bnfold.verify(original, se_reduce_off(candidate, tmp_path))
    (site,) = [s for s in report.sites if not s.passed]
    assert "reduce" in site.name and site.needed_atol < site.atol  # float16's policy passes it…
    assert not report.equivalent and site.rule == "parameters", report.table()  # …its weights do not
    assert "channel" in site.reason and "float16 epsilons" in site.reason


def fp16_conv_bn(tmp_path: Path) -> Path:
    net = Net(seed=41)
    y = net.conv_bn("x", 8, 16)
    for tensor in net.inits:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 8, 12, 12])
    model = net.model([x], [net.node("Relu", [y])])
    return save(model, tmp_path / "conv_bn16.onnx")


def folded_in_float16_steps(original: Path, tmp_path: Path) -> Path:
    """The fold another tool makes when it computes in the weights' type, rounding every step:
    s = γ / √(σ² + ε), W·s, (b − μ)·s + β, each in float16."""
    model = onnx.load(str(original))
    conv, bn = (next(n for n in model.graph.node if n.op_type == op) for op in ("Conv", "BatchNormalization"))
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    gamma, beta, mean, var = (values[n] for n in bn.input[1:])
    epsilon = np.float16(1e-5)
    scale = gamma / np.sqrt(var + epsilon)
    weight = values[conv.input[1]] * scale[:, None, None, None]
    bias = (values[conv.input[2]] - mean) * scale + beta
    assert weight.dtype == bias.dtype == np.float16
    for name, value in ((conv.input[1], weight), (conv.input[2], bias)):
        next(t for t in model.graph.initializer if t.name == name).CopyFrom(numpy_helper.from_array(value, name))
    conv.output[0] = bn.output[0]
    model.graph.node.remove(bn)
    for name in bn.input[1:]:
        model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == name))
    return save(model, tmp_path / "folded_fp16_steps.onnx")


def test_a_fold_computed_in_float16_steps_stands_within_the_weights_rounding(tmp_path):
    from bnfold.verification.parameters import PARAMETER_FACTOR, Weights
    from bnfold.verification.sites import read_structure

    def check(candidate):
        structure = read_structure(original, candidate)
        (site,) = structure.rewrite.sites
        return Weights(structure).check(site)

    original = fp16_conv_bn(tmp_path)
    for candidate in (folded(original, tmp_path), folded_in_float16_steps(original, tmp_path)):
        result = check(candidate)
        assert 0 < result.deviation <= PARAMETER_FACTOR / 2 and result.dtype == "float16"
        assert bnfold.verify(original, candidate).equivalent
    mistaken = with_tensor(candidate, conv_of(candidate).input[1], lambda w: w * np.where(
        np.arange(16)[:, None, None, None] == 3, 1.004, 1.0), tmp_path)  # fmt: skip
    result = check(mistaken)
    assert result.channel == 3 and result.deviation > PARAMETER_FACTOR


def dead_cancelling_channel(tmp_path: Path) -> Path:
    """fp16_conv_bn with channel 0 dead (its weights and bias 0) and its BN's β nearly μ·s, as
    in timm's float16 GhostNetV2: the channel is b' = β − μ·s ≈ 1.4e-4 everywhere."""
    model = onnx.load(str(fp16_conv_bn(tmp_path)))
    conv, bn = (next(n for n in model.graph.node if n.op_type == op) for op in ("Conv", "BatchNormalization"))
    tensors = {t.name: t for t in model.graph.initializer}

    def edit(name, change):
        values = numpy_helper.to_array(tensors[name]).astype(np.float64)
        tensors[name].CopyFrom(numpy_helper.from_array(change(values).astype(np.float16), name))

    edit(conv.input[1], lambda w: np.where(np.arange(16)[:, None, None, None] == 0, 0.0, w))
    edit(conv.input[2], lambda b: np.where(np.arange(16) == 0, 0.0, b))
    gamma, var = (numpy_helper.to_array(tensors[n]).astype(np.float64) for n in (bn.input[1], bn.input[4]))
    scale = gamma[0] / np.sqrt(var[0] + 1e-5)
    edit(bn.input[2], lambda beta: np.where(np.arange(16) == 0, -0.0934, beta))
    edit(bn.input[3], lambda m: np.where(np.arange(16) == 0, (-0.0934 - 1.4e-4) / scale, m))
    return save(model, tmp_path / "dead_cancelling.onnx")


def test_a_cancelling_bias_folded_in_float16_steps_passes_and_3_percent_off_still_fails(tmp_path):
    # onnxslim and onnxscript fold a float16 model in float16 arithmetic. Where β and μ·s cancel
    # (GhostNetV2's channel 119: b' = 1.36e-4 from terms of 0.09), their bias errs by a fraction of
    # β's ulp, which can be a tenth of such a channel's RMS: each channel's mean may now move by
    # the arithmetic of its bias's terms (bias_allowance). Not so far that a bias 3% off passes.
    original = dead_cancelling_channel(tmp_path)
    candidate = folded_in_float16_steps(original, tmp_path)
    assert bnfold.verify(original, candidate).equivalent
    bias = conv_of(candidate).input[2]
    off = with_tensor(candidate, bias, lambda b: b + np.where(np.arange(16) == 0, 0.03 * np.abs(b) + 1e-3, 0), tmp_path)
    report = bnfold.verify(original, off)
    assert not report.equivalent and report.sites[0].rule == "channel"  # the seeded mistake is 3× the terms' ulp


def _cases(tmp_path: Path) -> dict:
    """Per rule: a pair whose verdict that rule decides, and that verdict."""
    from test_verdict import nudged, tied_scores_model
    from test_verify import cancelling_model

    def folder(name: str) -> Path:
        (tmp_path / name).mkdir()
        return tmp_path / name

    cases = {}
    net = Net(seed=18)
    relu = net.node("Relu", [net.conv_bn("x", 3, 4)])
    original = save(net.model([float_input("x", [1, 3, 8, 8])], [relu]), tmp_path / "plain.onnx")
    candidate = folded(original, folder("plain"))
    renamed = onnx.load(str(candidate))
    renamed.graph.output[0].name = renamed.graph.node[-1].output[0] = "other"
    cases["comparable"] = (original, save(renamed, tmp_path / "renamed_output.onnx"), False)
    # another opset: no sites, the outputs alone decide
    mistaken = onnx.load(
        str(with_tensor(candidate, conv_of(candidate).input[2], lambda b: b + 0.03 * np.abs(b), tmp_path))
    )
    mistaken.opset_import[0].version = 18
    cases["policy"] = (original, save(mistaken, tmp_path / "opset18.onnx"), False)
    noisy = save(cancelling_model(1e4), tmp_path / "noisy.onnx")
    cases["noise"] = (noisy, folded(noisy, folder("noise")), True)
    loud = loud_and_quiet(tmp_path)
    loud_candidate = folded(loud, folder("loud"))
    shifted = np.where(np.arange(8) == 3, 0.03, 0)
    mistake = with_tensor(loud_candidate, conv_of(loud_candidate).input[2], lambda b: b + shifted * np.abs(b), tmp_path)
    cases["channel"] = (loud, mistake, False)
    small = mlp16(folder("small"))
    small_candidate = folded(small, tmp_path / "small")
    gemm = next(n for n in onnx.load(str(small_candidate)).graph.node if n.op_type == "Gemm")
    # one column's bias off by 0.018 (6.5e-3 · S): its weights are right, its elements are not
    off = with_tensor(
        small_candidate, gemm.input[2], lambda b: b + np.where(np.arange(64) == 5, 0.018, 0), tmp_path, "bias_off.onnx"
    )
    cases["elements"] = (small, off, False)
    se = SAMPLES / "efficientnet_tiny_fp16io.onnx"
    cases["parameters"] = (se, se_reduce_off(folded(se, folder("se")), tmp_path / "se"), False)
    tied = tied_scores_model(folder("tied"))
    cases["discontinuity"] = (tied, nudged(folded(tied, tmp_path / "tied"), 1, 4e-6, tmp_path / "tied"), True)
    return cases


def test_each_rule_decides_a_verdict(tmp_path, monkeypatch):
    cases = _cases(tmp_path)
    assert sorted(cases) == sorted(r.name for r in verdict.RULES)  # a new rule needs a case here
    for name, (reference, candidate, expected) in cases.items():
        assert bool(bnfold.verify(reference, candidate)) is expected, name
        changed = _without(name) if expected else _always_passing(name)
        with monkeypatch.context() as patch:
            patch.setattr(verdict, "RULES", changed)
            assert bool(bnfold.verify(reference, candidate)) is not expected, name


def test_the_report_names_the_rule_that_decided(tmp_path):
    original = loud_and_quiet(tmp_path)
    candidate = folded(original, tmp_path)
    result = CliRunner().invoke(app, ["verify", str(original), str(candidate), "--json"])
    data = json.loads(result.stdout)
    assert result.exit_code == 0 and {s["rule"] for s in data["sites"]} == {"policy"}
    assert all(s["channel_shift"] is not None and s["channel_gain"] is not None for s in data["sites"])


# ---- a rewritten branch no trial takes ---------------------------------------------------------------
def test_a_rewritten_if_branch_no_trial_takes_is_said_not_exercised(tmp_path):
    from test_subgraphs import if_model

    model = if_model()
    original = save(model, tmp_path / "if.onnx")
    candidate = save(bnfold.fold(model).model, tmp_path / "if_folded.onnx")
    x = np.random.default_rng(0).normal(size=(1, 4, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "else.npz", x=x, cond=np.array(False))
    np.savez(tmp_path / "then.npz", x=x, cond=np.array(True))
    report = bnfold.verify(original, candidate, inputs=[tmp_path / "else.npz"])
    note = "note: no trial took the then_branch of If 'branch': its rewrite is not exercised"
    assert any(n.startswith(note) for n in report.notes), report.notes
    report = bnfold.verify(original, candidate, inputs=[tmp_path / "else.npz", tmp_path / "then.npz"])
    assert report.equivalent and not any("not exercised" in n for n in report.notes), report.notes


# ---- the yardstick runs on what the model computes -----------------------------------------------------
def test_rounding_the_other_way_keeps_whole_numbers_so_the_yardstick_stays_finite():
    # PaddleOCR's recognizer (rapidocr's wheel) keeps its weights as Constant nodes, among them
    # Pow's exponent 2: moved to 2.0000002 it made every negative base NaN, the whole yardstick
    # NaN, and its noise 0, so correct candidates failed "beyond 4× noise (0.0e+00)".
    from bnfold.verification import regions

    values = np.array([2.0, 0.0, -1.0, 0.3, 1e-3, 7.25], np.float32)
    moved = [
        numpy_helper.to_array(regions.reround(numpy_helper.from_array(values, "p"), np.random.default_rng(seed)))
        for seed in range(20)
    ]
    assert all((m[:3] == values[:3]).all() for m in moved)  # whole numbers stay, whatever the draw
    assert any((m[3:] != values[3:]).any() for m in moved)  # the others move, to a neighbour
    assert all(np.abs(m[3:] - values[3:]).max() <= np.spacing(values[3:]).max() for m in moved)
    from builders import run

    net = Net(seed=19)
    squared = net.node("Pow", [net.conv_bn("x", 3, 4), net.const(np.float32(2.0))])
    model = net.model([float_input("x", [1, 3, 8, 8])], [squared])
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    for seed in range(8):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        rerounded = regions.rerounded_end_to_end(copy, regions.Rewrite(whole="every parameter"), seed=seed)
        (out,) = run(rerounded, {"x": x})
        assert np.isfinite(out).all(), seed


# ---- tolerances a pipeline states: absolute and per output (issue 31, item 5) ----------------------
def two_outputs(offset: float) -> onnx.ModelProto:
    """a = x + offset (the candidate's mistake or rounding, in a's own units), b = relu(x)."""
    nodes = [
        helper.make_node("Add", ["x", "offset"], ["a"]),
        helper.make_node("Relu", ["x"], ["b"]),
    ]
    graph = helper.make_graph(
        nodes, "two", [float_input("x", [4, 64])], [float_input("a", [4, 64]), float_input("b", [4, 64])],
        [numpy_helper.from_array(np.array(offset, np.float32), "offset")],
    )  # fmt: skip
    return make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("options", "exit_code"),
    [
        ([], 1),  # the policy: 2e-3 is 40× float32's atol · S
        (["--abs-atol", "a:3e-3"], 0),  # Polygraphy's form: a's own units
        (["--abs-atol", "3e-3"], 0),  # every output
        (["--abs-atol", "a:1e-3"], 1),
        (["--abs-atol", "b:3e-3"], 1),  # another output's tolerance is not a's
        (["--atol", "a:1e-2"], 0),  # a fraction of a's S, for a alone
        (["--atol", "a:1e-2", "--atol", "b:0"], 0),
        (["--rtol", "a:1e-3"], 1),  # near zero, a fraction of each element allows nothing
    ],
)
def test_stated_tolerances_are_absolute_or_per_output(tmp_path, options, exit_code):
    reference = save(two_outputs(0.0), tmp_path / "ref.onnx")
    candidate = save(two_outputs(2e-3), tmp_path / "cand.onnx")
    result = CliRunner().invoke(app, ["verify", str(reference), str(candidate), "--json", *options])
    assert result.exit_code == exit_code, result.output
    outputs = {o["name"]: o for o in json.loads(result.stdout)["outputs"]}
    assert outputs["b"]["passed"] and outputs["a"]["passed"] is (exit_code == 0)


def test_a_stated_tolerance_is_taken_literally():
    # no yardstick relaxes it: the user's number is the bound
    reference, candidate = two_outputs(0.0), two_outputs(2e-3)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        paths = [save(m, Path(folder) / f"{i}.onnx") for i, m in enumerate((reference, candidate))]
        report = bnfold.verify(*paths, abs_atol={"a": 1e-3})
    a = next(o for o in report.outputs if o.name == "a")
    assert not a.passed and a.stated and a.rule == "policy" and a.absolute == 1e-3
    assert "abs atol 1e-03" in report.table()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--abs-atol", "a:x"], "expected VALUE or NAME:VALUE"),
        (["--abs-atol", "a:1e-3", "--abs-atol", "a:2e-3"], "output 'a' given twice"),
        (["--atol", "a:-1"], "must be a finite number ≥ 0"),
    ],
)
def test_a_stated_tolerance_that_cannot_be_read_is_one_line_and_exit_2(tmp_path, option, message):
    reference = save(two_outputs(0.0), tmp_path / "ref.onnx")
    result = CliRunner().invoke(app, ["verify", str(reference), str(reference), *option])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert message in result.stderr


# ---- stored outputs of a softmax over thousands of classes (issue 31, item 5) ------------------------
def recognizer(tmp_path: Path) -> Path:
    """Conv → BN → ReLU → Conv → BN → global pool → Gemm → a softmax over 6625 classes whose
    logits spread wide (PP-OCRv4's recognizer's class): S is tiny beside the few large values."""
    net = Net(seed=35)
    x = net.node("Relu", [net.conv_bn("x", 3, 16)])
    pooled = net.node("Flatten", [net.node("GlobalAveragePool", [net.node("Relu", [net.conv_bn(x, 16, 32)])])])
    w = net.const(net.rng.normal(0, 3.0, (32, 6625)))
    logits = net.node("Gemm", [pooled, w, net.const(np.zeros(6625))])
    out = net.node("Softmax", [logits], out="probabilities", axis=-1)
    return save(net.model([float_input("x", [1, 3, 16, 16])], [out]), tmp_path / "recognizer.onnx")


def _channel_mistake(change: str, values: np.ndarray) -> np.ndarray:
    """Channel 3 of a folded bias 3% (and 1e-3) off, or of a folded weight ×1.01."""
    mine = (np.arange(len(values)) == 3).reshape(-1, *[1] * (values.ndim - 1))
    if change == "bias":
        return values + np.where(mine, 0.03 * np.abs(values) + 1e-3, 0)
    return np.where(mine, values * 1.01, values)


def test_stored_outputs_of_a_wide_softmax_pass_a_correct_fold_and_fail_a_mistake(tmp_path):
    original = recognizer(tmp_path)
    candidate = folded(original, tmp_path)
    assert bnfold.verify(original, candidate, save_outputs=tmp_path / "stored").equivalent
    from bnfold.verification.golden import verify_against_outputs

    report = verify_against_outputs(candidate, tmp_path / "stored")
    (output,) = report.outputs
    assert report.equivalent and output.needed_atol > output.atol and output.rule == "noise", report.table()
    for index, change in ((0, "bias"), (1, "bias"), (1, "weight")):
        conv = conv_of(candidate, index)
        slot = 2 if change == "bias" else 1
        broken = with_tensor(candidate, conv.input[slot], partial(_channel_mistake, change), tmp_path,
                             f"broken_{index}_{change}.onnx")  # fmt: skip
        assert not verify_against_outputs(broken, tmp_path / "stored").equivalent, (index, change)


def test_stored_outputs_of_a_sequence_model_are_refused_in_one_line(tmp_path):
    # onnx's backend test data stores a sequence output as a SequenceProto: read as a tensor, it was garbage
    from test_verify import sequence_model

    model = save(sequence_model(), tmp_path / "seq.onnx")
    folder = tmp_path / "test_data_set_0"
    folder.mkdir()
    x = np.ones((2, 3), np.float32)
    (folder / "input_0.pb").write_bytes(numpy_helper.from_array(x, "x").SerializeToString())
    sequence = numpy_helper.from_list([x, x], "seq")
    (folder / "output_0.pb").write_bytes(sequence.SerializeToString())
    result = CliRunner().invoke(app, ["verify", str(model), "--load-outputs", str(tmp_path)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "output 'seq' is seq(tensor(float))" in result.stderr
