"""Models with custom operators (issue 22): onnxruntime loads their ops from a shared library
(`SessionOptions.register_custom_ops_library`), which `--custom-lib` / `custom_ops=` hand to every
session verification makes. The library here is onnxruntime-extensions' (a test dependency); its
`ai.onnx.contrib::NegPos` splits a tensor into its negative and positive parts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import bn_parameters, make_model
from onnx import TensorProto, helper, numpy_helper

import bnfold

extensions = pytest.importorskip("onnxruntime_extensions")
LIBRARY = extensions.get_library_path()


def custom_op_model(path: Path) -> Path:
    """x → Conv → BatchNormalization → NegPos (ai.onnx.contrib) → negative, positive."""
    rng = np.random.default_rng(0)
    p = bn_parameters(rng, 4)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(p[k].astype(np.float32), k) for k in ("gamma", "beta", "mean", "var")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"]),
        helper.make_node("NegPos", ["b"], ["negative", "positive"], domain="ai.onnx.contrib"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8, 8]) for n in ("negative", "positive")]
    graph = helper.make_graph(nodes, "custom", [x], outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.contrib", 1)]
    onnx.save(make_model(graph, opset_imports=opsets), str(path))
    return path


def bnfold_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnfold", *map(str, args)], capture_output=True, text=True)


def test_a_model_with_a_custom_op_folds_and_verifies_with_its_library(tmp_path):
    model = custom_op_model(tmp_path / "m.onnx")
    without = bnfold_cli("optimize", model, "-o", tmp_path / "a.onnx")
    assert without.returncode == 2 and "NegPos" in without.stderr and not (tmp_path / "a.onnx").exists()
    result = bnfold_cli("optimize", model, "-o", tmp_path / "f.onnx", "--custom-lib", LIBRARY)
    assert result.returncode == 0, result.stderr
    folded = onnx.load(str(tmp_path / "f.onnx"))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "NegPos"]  # BN gone, the custom op kept
    report = bnfold.verify(model, tmp_path / "f.onnx", custom_ops=[LIBRARY])
    assert report and {o.name for o in report.outputs} == {"negative", "positive"}


def test_a_custom_op_library_that_is_missing_or_not_one_is_one_line(tmp_path):
    model = custom_op_model(tmp_path / "m.onnx")
    (tmp_path / "junk.so").write_bytes(b"not a library")
    for library, message in ((tmp_path / "none.so", "no such file"), (tmp_path / "junk.so", "onnxruntime cannot load")):
        result = bnfold_cli("verify", model, model, "--custom-lib", library)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_calibration_sessions_register_the_library_too(tmp_path):
    # --calibration runs the original model to measure each conv's input statistics
    model = custom_op_model(tmp_path / "m.onnx")
    np.savez(tmp_path / "calibration.npz", x=np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32))
    args = ("optimize", model, "--calibration", tmp_path / "calibration.npz", "--no-verify")
    without = bnfold_cli(*args, "-o", tmp_path / "a.onnx")
    assert without.returncode == 2 and "NegPos" in without.stderr and not (tmp_path / "a.onnx").exists()
    result = bnfold_cli(*args, "-o", tmp_path / "f.onnx", "--custom-lib", LIBRARY)
    assert result.returncode == 0, result.stderr
    assert [n.op_type for n in onnx.load(str(tmp_path / "f.onnx")).graph.node] == ["Conv", "NegPos"]
    folded = bnfold.fold(model, calibration=tmp_path / "calibration.npz", custom_ops=[LIBRARY])
    assert folded.report.folded == 1


def test_a_relative_library_path_is_the_file_there_not_a_system_library(tmp_path):
    # str(Path("./libx.so")) is "libx.so", a bare name the dynamic loader looks for in the system's
    # paths: `--custom-lib ./libc.so.6` loaded the system libc, and a user's own ./libmyops.so
    # was "cannot open shared object file" although it was there.
    import shutil

    custom_op_model(tmp_path / "m.onnx")  # verified by its relative name, from tmp_path
    shutil.copy(LIBRARY, tmp_path / "libmyops.so")
    (tmp_path / "libc.so.6").write_bytes(b"not the system's libc")

    def verify_with(library: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "bnfold", "verify", "m.onnx", "m.onnx", "--custom-lib", library]
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)

    ok = verify_with("./libmyops.so")
    assert ok.returncode == 0, ok.stderr
    local = verify_with("./libc.so.6")
    assert local.returncode == 2 and "onnxruntime cannot load" in local.stderr, local.stderr
