"""Never lose or overwrite a file bnfold did not create in this run. Each case runs the real CLI
in a subprocess, the way a pipeline runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

SAMPLE = Path(__file__).resolve().parents[1] / "sample_models" / "resnet_tiny.onnx"


def bnfold(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bnfold", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def loads(path: Path) -> bool:
    """The model and every external data file it names load, and it passes the checker."""
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return True


def one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_a_copy_of_a_previous_output_keeps_its_data_when_folded_over_that_output(tmp_path):
    # out.onnx's data file is also copy.onnx's: replacing out.onnx must not delete it.
    shutil.copy(SAMPLE, tmp_path / "model.onnx")
    assert (
        bnfold(
            "optimize", tmp_path / "model.onnx", "-o", tmp_path / "out.onnx", "--external-data", "always", "-q"
        ).returncode
        == 0
    )
    shutil.copy(tmp_path / "out.onnx", tmp_path / "copy.onnx")
    assert bnfold("optimize", tmp_path / "copy.onnx", "-o", tmp_path / "out.onnx", "--no-verify", "-q").returncode == 0
    assert loads(tmp_path / "copy.onnx") and loads(tmp_path / "out.onnx")


def test_the_output_may_not_be_the_inputs_data_file(tmp_path):
    onnx.save(onnx.load(str(SAMPLE)), str(tmp_path / "model.onnx"), save_as_external_data=True, location="data.bin")
    before = (tmp_path / "data.bin").read_bytes()
    result = bnfold("optimize", tmp_path / "model.onnx", "-o", tmp_path / "data.bin")
    one_line_error(result, "is the input's external data file")
    assert (tmp_path / "data.bin").read_bytes() == before and loads(tmp_path / "model.onnx")


@pytest.mark.parametrize("kind", ["fifo", "device", "link to a device"])
def test_an_output_that_is_not_a_regular_file_is_never_replaced(kind, tmp_path):
    target = tmp_path / "out.onnx"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        target = Path("/dev/null")
    else:
        target.symlink_to("/dev/null")
    result = bnfold("optimize", SAMPLE, "-o", target, "--no-verify")
    one_line_error(result, "exists and is not a regular file; refusing to replace it")
    assert os.path.exists("/dev/null") and not Path("/dev/null").is_file()
    if kind == "fifo":
        assert not target.is_file() and target.exists()
    if kind == "link to a device":
        assert target.is_symlink()


def test_two_inputs_of_one_name_never_write_one_output(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(SAMPLE, tmp_path / folder / "model.onnx")
    result = bnfold("optimize", tmp_path / "a" / "model.onnx", tmp_path / "b" / "model.onnx", "-o", tmp_path / "out")
    assert result.returncode == 2 and "would both be written to" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_output_ending_in_a_slash_is_a_new_folder(tmp_path):
    result = bnfold("optimize", SAMPLE, "-o", f"{tmp_path / 'new'}/", "--no-verify", "-q")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "new").is_dir() and loads(tmp_path / "new" / "resnet_tiny.folded.onnx")


def test_several_models_into_a_new_onnx_name_is_refused(tmp_path):
    shutil.copy(SAMPLE, tmp_path / "one.onnx")
    shutil.copy(SAMPLE, tmp_path / "two.onnx")
    result = bnfold("optimize", tmp_path / "one.onnx", tmp_path / "two.onnx", "-o", tmp_path / "new.onnx")
    one_line_error(result, "with several models, -o names a folder, not a model file")
    assert not (tmp_path / "new.onnx").exists()


def test_a_run_killed_during_verification_leaves_no_visible_file(tmp_path):
    # The process dies the moment verification starts: the staged model and its data exist.
    shutil.copy(SAMPLE, tmp_path / "model.onnx")
    script = (
        "import os, signal, sys; import bnfold.pipeline as p; "
        "p._verify = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL); "
        "from bnfold.cli import main; sys.argv[0] = 'bnfold'; main()"
    )
    command = [sys.executable, "-c", script, "optimize", str(tmp_path / "model.onnx"), "--external-data", "always"]
    assert subprocess.run(command, capture_output=True).returncode == -9
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["model.onnx"]


# ---- never fold what onnxruntime reads differently -------------------------------------------------
def conv_bn(tmp_path: Path, damage: str) -> Path:
    from builders import conv_bn_model
    from onnx import numpy_helper

    model = conv_bn_model()
    weight = next(t for t in model.graph.initializer if t.name == "W")
    if damage == "two initializers named W":
        twin = numpy_helper.from_array(numpy_helper.to_array(weight) * 3, "W")
        model.graph.initializer.append(twin)
    elif damage == "an initializer and a Constant named W":
        constant = onnx.helper.make_node(
            "Constant", [], ["W"], value=numpy_helper.from_array(numpy_helper.to_array(weight) * 3)
        )
        model.graph.node.insert(0, constant)
    else:  # epsilon given twice
        bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
        bn.attribute.extend([onnx.helper.make_attribute("epsilon", 1e-3), onnx.helper.make_attribute("epsilon", 0.1)])
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize(
    "damage, message",
    [
        ("two initializers named W", "two initializers are named 'W'"),
        ("an initializer and a Constant named W", "single static assignment"),
        ("epsilon twice", "Attribute 'epsilon' appeared multiple times"),
    ],
)
def test_a_model_the_checker_refuses_is_never_folded_even_without_verification(damage, message, tmp_path):
    path = conv_bn(tmp_path, damage)
    result = bnfold("optimize", path, "--no-verify")
    one_line_error(result, message)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
