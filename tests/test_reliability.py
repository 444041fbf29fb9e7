"""Reliability, round three (issue 21): no crash on real architectures, every outcome's exit code
and report true, durability. CLI cases run `python -m bnfold` in a subprocess, as a user does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import bn_parameters, conv_bn_model, make_model
from onnx import TensorProto, helper, numpy_helper

import bnfold
import bnfold.graph.constants
from bnfold.verification.tolerance import compare

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
SAMPLE = SAMPLES / "resnet_tiny.onnx"


def bnfold_cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bnfold", *map(str, args)], capture_output=True, text=True, timeout=180, **kwargs
    )


# ---- crashes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bound", [0, 4, 64])
def test_every_sample_folds_whatever_the_constant_evaluation_bound(bound, monkeypatch):
    # Every caller of constant evaluation must see the bound as "not a constant", not crash.
    monkeypatch.setattr(bnfold.graph.constants, "MAX_EVALUATED_ELEMENTS", bound)
    for sample in sorted(SAMPLES.glob("*.onnx")):
        result = bnfold.fold(sample)  # raises on a crash
        assert len(result.report.batch_norms) >= result.report.folded, sample.name


def attention_bias_model() -> onnx.ModelProto:
    """LeViT's attention bias in one node: a table of 18 M elements built from a scalar, added
    beside a Conv → BN branch (the branch merge asks whether it is a constant leaf)."""
    rng = np.random.default_rng(0)
    p = bn_parameters(rng, 4)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 1, 1)).astype(np.float32), "W"),
        *(numpy_helper.from_array(p[k].astype(np.float32), k) for k in ("gamma", "beta", "mean", "var")),
        numpy_helper.from_array(np.array(0.5, np.float32), "bias_value"),
        numpy_helper.from_array(np.array([1, 4, 4096, 1100], np.int64), "bias_shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], name="bn"),
        helper.make_node("Expand", ["bias_value", "bias_shape"], ["table"], name="table"),
        helper.make_node("Add", ["b", "table"], ["y"], name="add"),
    ]
    shape = [1, 4, 4096, 1100]
    graph = helper.make_graph(
        nodes, "attention_bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4096, 1100])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits,
    )  # fmt: skip
    return make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_constant_too_large_to_evaluate_beside_a_branch_is_not_a_crash():
    result = bnfold.fold(attention_bias_model())
    assert result.report.folded == 1 and not any(n.op_type == "BatchNormalization" for n in result.model.graph.node)
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Expand", "Add"]  # the table stays


def test_comparing_a_large_exact_output_never_widens_it_whole():
    want = np.zeros(64 << 20, np.bool_)  # 64 MiB of bools: widened to float64, 512 MiB
    got = want.copy()
    got[123] = True
    tracemalloc.start()
    result = compare("mask", want, got)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert result.mismatched == 1 and result.max_abs_error == 1.0 and not result.passed
    assert peak < 2 * want.nbytes
    ints = np.arange(10_000_000, dtype=np.int32)
    assert compare("ids", ints, ints + (ints == 7)).max_abs_error == 1.0


PEAK_OF_VERIFY = """
import resource, sys
import onnx
from onnx import TensorProto, helper
import bnfold

size = int(sys.argv[1])
value = helper.make_tensor_value_info("x", TensorProto.BOOL, [size])
out = helper.make_tensor_value_info("y", TensorProto.BOOL, [size])
graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [value], [out])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
onnx.save(model, sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert bnfold.verify(sys.argv[2], sys.argv[2]).equivalent
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / size)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in kilobytes on Linux")
def test_verify_keeps_no_copy_per_trial_of_a_large_exact_output(tmp_path):
    # An Identity passing a 128 MiB bool input, verified against itself in a process of its own:
    # its peak grows by 7.2 × the input (three trials' inputs, one trial's outputs and what
    # onnxruntime holds while it runs). Each trial's reference output was kept too, though the
    # yardsticks read float tensors only: 8.3 × (7.2 GiB for 1 GiB of bools).
    size = 128 << 20
    run = subprocess.run(
        [sys.executable, "-c", PEAK_OF_VERIFY, str(size), str(tmp_path / "m.onnx")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert float(run.stdout) < 7.75, run.stdout


# ---- files ---------------------------------------------------------------------------------------
def test_a_data_file_of_the_outputs_name_with_other_bytes_is_never_replaced(tmp_path):
    shutil.copy(SAMPLE, tmp_path / "model.onnx")
    first = bnfold_cli("optimize", tmp_path / "model.onnx", "-o", tmp_path / "out.onnx", "--external-data", "always")
    assert first.returncode == 0, first.stderr
    shutil.copy(tmp_path / "out.onnx", tmp_path / "keep.onnx")  # reads the same data file
    (data,) = tmp_path.glob("out.onnx.*.data")
    edited = bytearray(data.read_bytes())
    edited[-1] ^= 0xFF  # edited in place: the name no longer says what it holds
    data.write_bytes(bytes(edited))
    again = bnfold_cli("optimize", tmp_path / "model.onnx", "-o", tmp_path / "out.onnx", "--external-data", "always")
    assert again.returncode == 2 and "exists with other bytes than its name says" in again.stderr
    assert data.read_bytes() == bytes(edited)  # keep.onnx's data, as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.onnx", "out.onnx", "keep.onnx", data.name])


def test_an_output_in_a_missing_folder_gets_the_folder(tmp_path):
    shutil.copy(SAMPLE, tmp_path / "model.onnx")
    result = bnfold_cli("optimize", tmp_path / "model.onnx", "-o", tmp_path / "new" / "deeper" / "x.onnx", "-q")
    assert result.returncode == 0, result.stderr
    onnx.checker.check_model(str(tmp_path / "new" / "deeper" / "x.onnx"), full_check=True)


@pytest.mark.parametrize("external", ["never", "always"])
def test_the_staged_files_reach_the_disk_before_the_rename_and_the_folder_after(external, monkeypatch, tmp_path):
    # Durability: a power loss after the rename must find the whole model (and its data) there.
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(Path(dst).resolve())))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    dest = tmp_path / "out.onnx"
    bnfold.optimize(SAMPLE, dest, verify=False, external_data=external)
    commit = events.index(("replace", str(dest.resolve())))
    synced_before = {path for kind, path in events[:commit] if kind == "fsync"}
    staged = [p for p in synced_before if Path(p).name.startswith(".out.onnx.")]
    assert staged, events  # the staged model (and data file) synced before the rename…
    if external == "always":
        (data,) = tmp_path.glob("out.onnx.*.data")
        data_rename = events.index(("replace", str(data.resolve())))
        assert data_rename < commit and len(staged) >= 2, events
    assert ("fsync", str(tmp_path.resolve())) in events[commit:], events  # …the folder after it


# ---- exit codes and messages ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, code",
    [
        (["verify", SAMPLE, SAMPLE], 0),
        (["verify", SAMPLE, "missing.onnx"], 2),
        (["optimize", SAMPLE, "-o", "{tmp}/out.onnx"], 0),
    ],
)
def test_a_reader_that_leaves_early_does_not_change_the_exit_code(args, code, tmp_path):
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    process = subprocess.Popen(
        [sys.executable, "-m", "bnfold", *args, "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    process.stdout.close()  # `| head -c0`
    assert process.wait(timeout=180) == code
    if args[0] == "optimize":
        assert (tmp_path / "out.onnx").is_file()


def test_calibration_arrays_of_the_wrong_shape_are_refused(tmp_path):
    model = conv_bn_model(dtype=np.float16)  # a 16-bit model: calibration decides its roundings
    onnx.save(model, str(tmp_path / "m.onnx"))
    (name, (_, channels, *spatial)) = (
        model.graph.input[0].name,
        [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim],
    )
    for shape in ((1, channels + 1, *spatial), (channels, *spatial)):
        np.savez(tmp_path / "calib.npz", **{name: np.zeros(shape, np.float16)})
        result = bnfold_cli(
            "optimize", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--calibration", tmp_path / "calib.npz"
        )
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert f"--calibration: input '{name}' is {'x'.join(map(str, shape))} in the data" in result.stderr
        assert not (tmp_path / "o.onnx").exists()


def test_batch_lines_say_what_happened_even_with_quiet(tmp_path):
    folder = tmp_path / "mix"
    folder.mkdir()
    shutil.copy(SAMPLES / "frozen_bn_backbone.onnx", folder / "affine.onnx")  # six Mul/Add folds, no BN
    (folder / "bad.onnx").write_bytes(b"not a model")
    quiet = bnfold_cli("optimize", folder, "-o", tmp_path / "out", "-q")
    assert quiet.returncode == 2 and quiet.stderr.count("bad.onnx") == 1, quiet.stderr
    assert quiet.stderr.startswith(f"FAIL  {folder / 'bad.onnx'}: ")
    loud = bnfold_cli("optimize", folder, "-o", tmp_path / "out2")
    assert "(folded 0 of 0 BatchNormalization nodes and 6 Mul/Add/Sub/Div)" in loud.stderr, loud.stderr


@pytest.mark.parametrize("jobs", ["0", "-3"])
def test_jobs_below_one_are_refused(jobs, tmp_path):
    result = bnfold_cli("optimize", SAMPLE, "-o", tmp_path / "o.onnx", "--jobs", jobs)
    assert result.returncode == 2 and f"--jobs {jobs}: must be at least 1" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_workers_are_never_more_than_the_models(monkeypatch, tmp_path):
    import bnfold.batch

    started = []
    real = bnfold.batch._in_processes
    monkeypatch.setattr(
        bnfold.batch, "_in_processes", lambda tasks, jobs, *a, **k: started.append(jobs) or real(tasks, jobs, *a, **k)
    )
    models = [shutil.copy(SAMPLE, tmp_path / f"{n}.onnx") for n in ("a", "b")]
    items = bnfold.batch.optimize_many([Path(m) for m in models], tmp_path / "out", jobs=1000, verify=False)
    assert all(item.exit_code == 0 for item in items) and started == [min(2, os.cpu_count() or 1)]


def test_bench_with_a_missing_provider_says_so_without_a_verify_hint():
    result = bnfold_cli("bench", SAMPLE, "--provider", "NoSuchExecutionProvider", "--runs", "1")
    assert result.returncode == 2 and "provider NoSuchExecutionProvider is not available" in result.stderr
    assert "--no-verify" not in result.stderr


def test_models_whose_inputs_differ_say_so_not_zero_of_zero(tmp_path):
    for dtype, name in ((TensorProto.FLOAT, "f32"), (TensorProto.FLOAT16, "f16")):
        x, y = (helper.make_tensor_value_info(n, dtype, [1, 4]) for n in ("x", "y"))
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
        onnx.save(make_model(graph), str(tmp_path / f"{name}.onnx"))
    result = bnfold_cli("verify", tmp_path / "f32.onnx", tmp_path / "f16.onnx")
    assert result.returncode == 1 and "the models' inputs differ" in result.stderr
    assert "0 of 0" not in result.stderr and "over 0 trials" not in result.stderr


@pytest.mark.parametrize(
    "reference, candidate, code",
    [
        ("resnet_tiny", "resnet_tiny_fp16", 1),  # float16 inputs: the inputs differ
        ("resnet_tiny_fp16io", "resnet_tiny", 0),  # float16 inside, judged as float16
        ("resnet_tiny", "resnet_tiny_fp16io", 1),  # judged as the float32 reference computes
    ],
)
def test_a_float32_model_against_its_float16_conversion_gets_a_verdict(reference, candidate, code):
    # The probe (the reference with the candidate's rewrite spliced in) mixes float16 nodes with
    # float32 tensors: Casts bridge them, and each site is judged in the narrower type.
    result = bnfold_cli("verify", SAMPLES / f"{reference}.onnx", SAMPLES / f"{candidate}.onnx")
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and "bnfold-session" not in result.stderr
    if "fp16io" not in candidate + reference:
        assert "the models' inputs differ" in result.stderr
    elif code == 0:
        assert "10 rewritten tensors agree where they are made" in result.stderr
    else:  # the float32 reference's every BN output moves by float16's rounding: a channel fails
        assert "cannot be judged where it acts" not in result.stderr and "FAIL: channel" in result.stderr


# ---- one JSON report for every outcome -----------------------------------------------------------
@pytest.mark.parametrize(
    "args, code",
    [
        (["inspect", SAMPLE, SAMPLE], 0),
        (["inspect", "--check", SAMPLE, SAMPLE], 4),
        (["inspect", SAMPLE, "missing.onnx"], 2),
        (["optimize", SAMPLE, "--bogus"], 2),
        (["verify", SAMPLE, SAMPLE, "--trials", "x"], 2),
    ],
)
def test_every_outcome_prints_one_json_report(args, code):
    result = bnfold_cli(*args, "--json")
    assert result.returncode == code, result.stderr
    report = json.loads(result.stdout)
    assert report["exit_code"] == code and report["command"] == args[0]
    if args[0] == "inspect":
        assert len(report["models"]) == 2 and report["summary"]["failed"] == (code == 2)
    else:
        assert report["error"] and "Usage" not in result.stdout


@pytest.mark.parametrize(
    "candidate, code",
    [
        ("missing.onnx", 2),  # refused before verification starts
        (SAMPLES / "audio_conv1d.onnx", 2),  # another input rank: fails in the first run, after both sessions load
    ],
)
def test_a_verify_that_runs_nothing_leaves_no_evidence_folder(candidate, code, tmp_path):
    saved = tmp_path / "saved"
    result = bnfold_cli(
        "verify", SAMPLE, tmp_path / candidate, "--save-inputs", saved, "--save-outputs", tmp_path / "o"
    )
    assert result.returncode == code and not saved.exists() and not (tmp_path / "o").exists()


def test_an_ir3_model_whose_initializers_are_not_inputs_is_repaired_with_a_note(tmp_path):
    # Issue 32: eight of onnxruntime's own fusion test models (IR < 4) were exit 2 "not a valid
    # ONNX model: X in initializer but not in graph input"; onnxruntime runs them.
    import json
    import subprocess
    import sys

    from builders import conv_bn_model

    model = conv_bn_model()
    model.ir_version = 3
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", 8))
    assert any(t.name not in {v.name for v in model.graph.input} for t in model.graph.initializer)
    onnx.save(model, str(tmp_path / "ir3.onnx"))
    with pytest.raises(onnx.checker.ValidationError, match="not in graph input"):
        onnx.checker.check_model(model)
    command = ["optimize", str(tmp_path / "ir3.onnx"), "-o", str(tmp_path / "out.onnx"), "--json"]
    run = subprocess.run([sys.executable, "-m", "bnfold", *command], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    notes = json.loads(run.stdout)["notes"]
    assert any(n.startswith("IR version 3 requires every initializer to be a graph input") for n in notes), notes
    folded = onnx.load(str(tmp_path / "out.onnx"))
    assert folded.ir_version == 4 and "BatchNormalization" not in {n.op_type for n in folded.graph.node}
    onnx.checker.check_model(folded, full_check=True)


# onnxruntime-gpu 1.31.1 without CUDA's libraries, asked for CUDAExecutionProvider: its log lines
CUDA_LOG = [
    "2026-12-07 16:12:44.302526588 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
    "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:2043 onnxruntime::Provider& "
    "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
    "/venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so with error: "
    "libcublasLt.so.13: cannot open shared object file: No such file or directory",
    "2026-12-07 16:12:44.302567599 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1295 "
    "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 13.*.",
]


def test_a_gpu_provider_that_cannot_start_names_the_missing_library():
    from bnfold.verification.runtime import missing_library

    assert missing_library(CUDA_LOG) == "libcublasLt.so.13"  # not the provider's own library
    windows = 'LoadLibrary failed with error 126 "" when trying to load "C:\\ort\\onnxruntime_providers_cuda.dll"'
    assert missing_library([windows]) == "C:\\ort\\onnxruntime_providers_cuda.dll"
    assert missing_library(CUDA_LOG[1:]) is None


def test_onnxruntimes_log_lines_of_a_gpu_provider_stay_out_of_stderr(capfd):
    from bnfold.verification.runtime import _provider_log

    with _provider_log(["ROCMExecutionProvider"]) as log:
        os.write(2, ("\x1b[1;31m" + CUDA_LOG[0] + "\x1b[m\n").encode())
    assert log == [CUDA_LOG[0]] and capfd.readouterr().err == ""  # captured, without its colour
    with _provider_log(["CPUExecutionProvider"]) as log:  # the CPU's sessions leave stderr alone
        os.write(2, b"a line of someone else's\n")
    assert log == [] and capfd.readouterr().err == "a line of someone else's\n"


def test_bench_times_what_a_deployment_runs_onnxruntimes_default_level():
    # every optimization, as an InferenceSession without options runs: its QDQ fusions make the
    # integer kernels a folded QAT model gains (the basic level has none of them)
    import onnxruntime as ort

    from bnfold.verification.runtime import make_session

    level = make_session(conv_bn_model(), optimize=True).get_session_options().graph_optimization_level
    assert level == ort.SessionOptions().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
