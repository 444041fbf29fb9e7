"""What a pipeline reads: the versioned JSON report of every command and outcome, the version,
and the CI check mode with its pre-commit hook."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import jsonschema
import onnx
import pytest
from builders import make_model

import bnfold

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
SCHEMA = json.loads(files("bnfold").joinpath("report.schema.json").read_text())


def bnfold_cli(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "bnfold", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)


def report_of(result: subprocess.CompletedProcess) -> dict:
    report = json.loads(result.stdout)
    jsonschema.validate(report, SCHEMA)
    assert report["exit_code"] == result.returncode
    assert report["schema_version"] == 1 and report["bnfold_version"] == bnfold.__version__
    return report


def test_every_report_kind_follows_the_schema(tmp_path):
    shutil.copy(SAMPLES / "resnet_tiny.onnx", tmp_path / "a.onnx")
    shutil.copy(SAMPLES / "mobilenet_tiny.onnx", tmp_path / "b.onnx")
    x, y = (onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 4]) for n in ("x", "y"))
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    onnx.save(make_model(graph), str(tmp_path / "relu.onnx"))
    runs = {
        "optimize, nothing to fold": bnfold_cli("optimize", tmp_path / "relu.onnx", "--json"),
        "optimize": bnfold_cli("optimize", tmp_path / "a.onnx", "-o", tmp_path / "a.out.onnx", "--json"),
        "optimize, no verification": bnfold_cli("optimize", tmp_path / "a.onnx", "--no-verify", "--json"),
        "optimize, a batch": bnfold_cli(
            "optimize", tmp_path / "a.onnx", tmp_path / "b.onnx", "-o", tmp_path / "out", "--json"
        ),
        "optimize, exit 2": bnfold_cli("optimize", tmp_path / "missing.onnx", "--json"),
        "verify": bnfold_cli("verify", tmp_path / "a.onnx", tmp_path / "a.out.onnx", "--json"),
        "verify, exit 2": bnfold_cli("verify", tmp_path / "a.onnx", tmp_path / "missing.onnx", "--json"),
        "inspect": bnfold_cli("inspect", tmp_path / "a.onnx", "--json"),
        "inspect, several": bnfold_cli("inspect", tmp_path / "a.onnx", tmp_path / "b.onnx", "--json"),
        "inspect, exit 2": bnfold_cli("inspect", tmp_path / "a.onnx", tmp_path / "missing.onnx", "--json"),
        "bench": bnfold_cli("bench", tmp_path / "a.onnx", "--runs", "2", "--warmup", "0", "--json"),
    }
    for kind, result in runs.items():
        report = report_of(result)
        several = "models" in report  # a batch: each model's error is its own
        assert several or (report["error"] is None) == (result.returncode == 0), kind
    assert runs["optimize, exit 2"].returncode == 2 and "no such file" in report_of(runs["optimize, exit 2"])["error"]
    assert report_of(runs["optimize, a batch"])["summary"]["written"] == 2
    nothing = report_of(runs["optimize, nothing to fold"])
    assert nothing["unchanged"] and nothing["written"] and nothing["verification"] is None
    assert report_of(runs["verify"])["sites"]  # the folds, each judged where it acts


def test_a_not_equivalent_fold_has_a_report_with_exit_code_1(monkeypatch, tmp_path):
    shutil.copy(SAMPLES / "resnet_tiny.onnx", tmp_path / "a.onnx")
    script = (
        "import sys; import bnfold.folding.sources as s; s.epsilon = lambda bn: 1e-3; "
        "from bnfold.cli import main; sys.argv[0] = 'bnfold'; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "optimize", str(tmp_path / "a.onnx"), "--json"], capture_output=True, text=True
    )
    report = report_of(result)
    assert report["exit_code"] == 1 and report["written"] is False and report["verification"]["equivalent"] is False


def test_progress_says_writing_only_once_the_model_is_verified(tmp_path):
    stages = []
    result = bnfold.optimize(SAMPLES / "resnet_tiny.onnx", tmp_path / "out.onnx", progress=stages.append)
    assert result.written
    kinds = [stage.split()[0] for stage in stages]
    assert kinds.index("staging") < kinds.index("verifying") < kinds.index("writing") == len(kinds) - 1, stages


def test_version():
    result = bnfold_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"bnfold {bnfold.__version__}"


# ---- the CI check ------------------------------------------------------------------------------------
def test_check_fails_a_model_that_still_holds_foldable_batch_norms(tmp_path):
    result = bnfold_cli("inspect", "--check", SAMPLES / "resnet_tiny.onnx")
    assert result.returncode == 4
    assert "bnfold: unfolded: " in result.stderr and "folded 9 of 9" in result.stderr


def test_check_passes_models_with_nothing_left_to_fold(tmp_path):
    # A folded model, and one whose remaining BN cannot fold (its conv also feeds a Sigmoid).
    for name in ("resnet_tiny", "shared_conv_output"):
        out = tmp_path / f"{name}.folded.onnx"
        assert bnfold_cli("optimize", SAMPLES / f"{name}.onnx", "-o", out, "-q").returncode == 0
        result = bnfold_cli("inspect", "--check", "-q", out)
        assert result.returncode == 0 and result.stderr == "", result.stderr


def test_the_pre_commit_hook_runs_as_pre_commit_would(tmp_path):
    # pre-commit runs `entry` with the staged files matching `files` appended.
    hook_file = (ROOT / ".pre-commit-hooks.yaml").read_text()
    for line in hook_file.splitlines():  # YAML: a plain scalar may not hold ": " (pre-commit refused one)
        key, _, value = line.lstrip("- ").partition(": ")
        if value and not line.lstrip().startswith("#"):
            assert ": " not in value or value[0] in "'\"", line
    entry = next(line.split(":", 1)[1].strip() for line in hook_file.splitlines() if line.strip().startswith("entry:"))
    assert entry == "bnfold inspect --check"
    assert bnfold_cli("optimize", SAMPLES / "resnet_tiny.onnx", "-o", tmp_path / "folded.onnx", "-q").returncode == 0
    shutil.copy(SAMPLES / "mobilenet_tiny.onnx", tmp_path / "raw.onnx")
    args = shlex.split(entry)[1:]
    clean = bnfold_cli(*args, tmp_path / "folded.onnx")
    dirty = bnfold_cli(*args, tmp_path / "folded.onnx", tmp_path / "raw.onnx")
    assert clean.returncode == 0
    assert dirty.returncode == 4 and str(tmp_path / "raw.onnx") in dirty.stderr
    assert str(tmp_path / "folded.onnx") not in dirty.stderr


def test_the_report_counts_each_op_type_that_changed():
    result = bnfold_cli("inspect", SAMPLES / "repvgg_tiny.onnx", "--json")
    changed = report_of(result)["op_counts"]["changed"]
    assert changed == {
        "Add": {"before": 7, "after": 0},
        "BatchNormalization": {"before": 12, "after": 0},
        "Conv": {"before": 9, "after": 5},
    }
    assert "ops: Add 7 → 0, BatchNormalization 12 → 0, Conv 9 → 5" in result.stderr


# ---- the Python API takes models where users have them ----------------------------------------------
def test_fold_and_verify_take_onnx_ir_models_programs_and_arrays():
    import numpy as np
    import onnx
    import onnx_ir

    proto = onnx.load(str(SAMPLES / "resnet_tiny.onnx"))
    ir_model = onnx_ir.from_proto(proto)  # what torch.onnx.export(..., dynamo=True).model is

    class Program:  # torch.onnx.ONNXProgram's interface, without torch
        model_proto = proto

    from_ir, from_program = bnfold.fold(ir_model), bnfold.fold(Program())
    assert from_ir.report.folded == from_program.report.folded == 9
    assert from_program.model == bnfold.fold(proto).model  # onnx_ir's round trip adds value_info
    assert isinstance(from_ir.model, onnx_ir.Model)  # what came in goes out
    assert [n.op_type for n in from_ir.model.graph] == [n.op_type for n in from_program.model.graph.node]
    x = np.load(SAMPLES / "resnet_tiny.npz")["in.input"]
    report = bnfold.verify(ir_model, from_program.model, inputs=[{"input": x}, {"input": x[:1]}])
    assert report and report.trials == 2 and report.inputs[0]["source"] == "arrays, arrays"
    with pytest.raises(TypeError, match="expected an ONNX model"):
        bnfold.fold(42)


@pytest.mark.parametrize("given", ["proto", "ir"])
def test_optimize_given_a_model_in_memory_says_so_in_one_sentence(given):
    import onnx
    import onnx_ir

    proto = onnx.load(str(SAMPLES / "resnet_tiny.onnx"))
    with pytest.raises(bnfold.BnfoldError, match=r"reads and writes model files.*bnfold\.fold\(\)"):
        bnfold.optimize(proto if given == "proto" else onnx_ir.from_proto(proto))


def test_dir_lists_the_public_names():
    assert set(bnfold.__all__) <= set(dir(bnfold))
