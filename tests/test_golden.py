"""Golden data (issue 22): inputs and outputs stored by other tools feed `--inputs`,
`--calibration` and `verify --load-outputs`: bnfold's own sample .npz (in.NAME beside out.NAME),
files Polygraphy itself saved (tests/data/polygraphy), and onnx test-data folders."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_verdict import folded, mistaken

import bnfold
from bnfold.verification.golden import verify_against_outputs

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
SAMPLE = SAMPLES / "resnet_tiny.onnx"
POLYGRAPHY = Path(__file__).parent / "data" / "polygraphy"


def bnfold_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnfold", *map(str, args)], capture_output=True, text=True)


def test_a_sample_npz_of_inputs_and_outputs_feeds_inputs_and_calibration(tmp_path):
    report = bnfold.verify(SAMPLE, SAMPLE, inputs=[SAMPLES / "resnet_tiny.npz"])
    assert report and report.trials == 1
    fp16 = SAMPLES / "resnet_tiny_fp16io.onnx"
    assert bnfold.fold(fp16, calibration=SAMPLES / "resnet_tiny_fp16io.npz").report.folded == 9


def test_polygraphy_saved_inputs_are_one_trial_per_iteration():
    report = bnfold.verify(SAMPLE, SAMPLE, inputs=[POLYGRAPHY / "inputs.json"])
    assert report and report.trials == 1 and report.outputs[0].shape == [2, 10]


@pytest.mark.parametrize(
    "stored, inputs",
    [
        (SAMPLES / "resnet_tiny.npz", ()),  # PyTorch's outputs, with their inputs
        (POLYGRAPHY / "outputs.json", (POLYGRAPHY / "inputs.json",)),  # Polygraphy's onnxruntime run
    ],
)
def test_a_fold_passes_against_stored_outputs_and_its_mistake_fails(stored, inputs, tmp_path):
    candidate = folded(SAMPLE, tmp_path)
    assert verify_against_outputs(SAMPLE, stored, inputs=inputs)
    assert verify_against_outputs(candidate, stored, inputs=inputs)
    broken, _ = mistaken(candidate, tmp_path)
    wrong = verify_against_outputs(broken, stored, inputs=inputs)
    assert not wrong.equivalent and wrong.outputs[0].needed_atol > wrong.outputs[0].atol


def test_stored_outputs_of_a_float32_network_judge_its_float16_model_as_float16():
    report = verify_against_outputs(SAMPLES / "resnet_tiny_fp16io.onnx", SAMPLES / "resnet_tiny_fp16io.npz")
    assert report and report.outputs[0].precision == "float16"


def test_outputs_saved_by_verify_replay_as_stored_outputs(tmp_path):
    assert bnfold.verify(SAMPLE, SAMPLE, trials=2, save_inputs=tmp_path / "in", save_outputs=tmp_path / "out")
    report = verify_against_outputs(SAMPLE, tmp_path / "out", inputs=[tmp_path / "in"])
    assert report and report.trials == 2


def test_the_cli_takes_one_model_with_load_outputs(tmp_path):
    ok = bnfold_cli(
        "verify", SAMPLE, "--load-outputs", POLYGRAPHY / "outputs.json", "--inputs", POLYGRAPHY / "inputs.json"
    )
    assert ok.returncode == 0 and "equivalent" in ok.stderr
    report = json.loads(bnfold_cli("verify", SAMPLE, "--load-outputs", SAMPLES / "resnet_tiny.npz", "--json").stdout)
    assert report["exit_code"] == 0 and report["equivalent"] and report["reference"].endswith("resnet_tiny.npz")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--load-outputs", POLYGRAPHY / "outputs.json"], "holds no inputs; give the inputs they were computed on"),
        ([SAMPLE, "--load-outputs", SAMPLES / "resnet_tiny.npz"], "give one model"),
        ([], "verify needs two models, or one with --load-outputs"),
        (["--load-outputs", POLYGRAPHY / "inputs.json"], "not Polygraphy outputs"),
        (["--load-outputs", SAMPLES / "resnet_tiny.npz", "--localize"], "--localize: not with --load-outputs"),
        (["--load-outputs", POLYGRAPHY / "outputs.json", "--inputs", SAMPLES / "resnet_tiny.npz",
          "--inputs", SAMPLES / "resnet_tiny.npz"], "2 input sets for 1 sets of stored outputs"),
    ],
)  # fmt: skip
def test_stored_outputs_that_cannot_be_used_are_one_line_and_exit_2(args, message):
    result = bnfold_cli("verify", SAMPLE, *args)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr and "Traceback" not in result.stderr


def test_older_polygraphy_files_mark_arrays_with_a_legacy_key(tmp_path):
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    data = io.BytesIO()
    np.save(data, x, allow_pickle=False)
    array = {"array": base64.b64encode(data.getvalue()).decode(), "__polygraphy_encoded_ndarray": "x"}
    (tmp_path / "inputs.json").write_text(json.dumps([{"input": array}]))
    report = bnfold.verify(SAMPLE, SAMPLE, inputs=[tmp_path / "inputs.json"])
    assert report and report.trials == 1


# ---- hostile stored files: one line, exit 2 (issue 32) ------------------------------------------------
def _polygraphy_inputs(array_bytes: bytes) -> str:
    array = {"array": base64.b64encode(array_bytes).decode(), "polygraphy_class": "ndarray"}
    return json.dumps([{"input": array}])


def _npy_header_only(shape) -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return header.getvalue()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("nested", "nested too deeply"),
        ("huge", "its header claims shape"),
        ("empty_npz", "holds no array"),
        ("member", "is not a .npy array"),
        ("torn_header", "numpy cannot read"),
    ],
)
def test_a_hostile_stored_file_is_one_line_and_exit_2(tmp_path, kind, message):
    if kind == "nested":  # RecursionError
        (tmp_path / "inputs.json").write_text("[" * 100000)
    elif kind == "huge":  # MemoryError: a header that claims 4 PB
        (tmp_path / "inputs.json").write_text(_polygraphy_inputs(_npy_header_only((10**9, 10**6))))
    elif kind == "torn_header":  # tokenize.TokenError: a header cut in the middle (bench/fuzz.py found it)
        header = _npy_header_only((1, 3, 32, 32))
        (tmp_path / "inputs.json").write_text(_polygraphy_inputs(header.replace(b"}", b"(")))
    elif kind == "empty_npz":  # StopIteration: an old file's .npz payload with nothing in it
        empty = io.BytesIO()
        np.savez(empty)
        (tmp_path / "inputs.json").write_text(_polygraphy_inputs(empty.getvalue()))
    if kind == "member":  # AttributeError: an .npz member that is not .npy
        import zipfile

        with zipfile.ZipFile(tmp_path / "outputs.npz", "w") as archive:
            archive.writestr("out.output.txt", "not an array")
        run = bnfold_cli(
            "verify", SAMPLE, "--load-outputs", tmp_path / "outputs.npz", "--inputs", SAMPLES / "resnet_tiny.npz"
        )
    else:
        run = bnfold_cli("verify", SAMPLE, SAMPLE, "--inputs", tmp_path / "inputs.json")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr
