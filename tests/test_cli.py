"""The command line: exit codes, JSON on stdout, people on stderr, the input never touched."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import typer
from builders import conv_bn_model, op_types
from onnx import numpy_helper
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.console import Console
from bnfold.errors import EXIT_INTERNAL_ERROR

SAMPLE = Path(__file__).resolve().parents[1] / "sample_models" / "resnet_tiny.onnx"
runner = CliRunner()


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "net.onnx"
    shutil.copy(SAMPLE, path)
    return path


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), result.stderr
    assert text in lines[0]
    assert "Traceback" not in result.output and result.stdout == ""


def test_optimize_writes_beside_the_input_and_reports_json(model_path):
    before = model_path.read_bytes()
    result = invoke("optimize", model_path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    out = model_path.with_name("net.folded.onnx")
    assert report["written"] is True and report["output"] == str(out)
    assert report["summary"]["batch_normalization_nodes"] == 9 and report["summary"]["folded"] == 9
    assert {b["status"] for b in report["batch_normalizations"]} == {"folded"}
    assert model_path.read_bytes() == before  # the input is untouched
    folded = onnx.load(str(out))
    assert "BatchNormalization" not in op_types(folded)
    onnx.checker.check_model(folded, full_check=True)
    assert "folded 9 of 9 BatchNormalization nodes" in result.stderr
    assert f"wrote {out}" in result.stderr


def external_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".data"))


def test_external_data_in_gives_external_data_out(tmp_path):
    # The dynamo exporter's default: weights in a data file beside the model.
    model = onnx.load(str(SAMPLE))
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    result = invoke("optimize", tmp_path / "ext.onnx", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verification"]["equivalent"] is True
    (data,) = [name for name in external_files(tmp_path) if name != "ext.onnx.data"]
    assert re.fullmatch(r"ext\.folded\.onnx\.[0-9a-f]{8}\.data", data)  # named after the output
    mode = (tmp_path / data).stat().st_mode & 0o777
    assert mode == (tmp_path / "ext.folded.onnx").stat().st_mode & 0o777  # the usual mode, not 0600
    folded = onnx.load(str(tmp_path / "ext.folded.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in folded.graph.initializer)
    onnx.checker.check_model(str(tmp_path / "ext.folded.onnx"), full_check=True)


def test_external_data_modes(tmp_path):
    model = onnx.load(str(SAMPLE))
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    assert (
        invoke("optimize", tmp_path / "ext.onnx", "-o", tmp_path / "one.onnx", "--external-data", "never").exit_code
        == 0
    )
    assert not any(name.startswith("one.onnx") for name in external_files(tmp_path))
    single = tmp_path / "single.onnx"
    shutil.copy(SAMPLE, single)
    assert invoke("optimize", single, "--external-data", "always").exit_code == 0
    assert any(name.startswith("single.folded.onnx.") for name in external_files(tmp_path))
    result = invoke("optimize", single, "--external-data", "sometimes")
    assert result.exit_code == 2 and "choose one of auto, always, never" in result.stderr


def test_the_same_input_and_options_give_byte_identical_outputs(tmp_path):
    # The data file is named after its content: reruns (Make, DVC) reproduce every byte.
    onnx.save(onnx.load(str(SAMPLE)), str(tmp_path / "net.onnx"), save_as_external_data=True, location="net.data")
    outputs = []
    for run in ("first", "second"):
        assert invoke("optimize", tmp_path / "net.onnx", "-o", f"{tmp_path / run}/", "-q").exit_code == 0
        outputs.append({p.name: p.read_bytes() for p in (tmp_path / run).iterdir()})
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2


def test_rewriting_an_external_output_replaces_its_data_file_and_nothing_else(tmp_path):
    model = tmp_path / "net.onnx"
    shutil.copy(SAMPLE, model)
    (tmp_path / "net.folded.onnx.unrelated.data").write_bytes(b"someone else's")
    assert invoke("optimize", model, "--external-data", "always", "-q").exit_code == 0
    first = set(external_files(tmp_path))
    assert invoke("optimize", model, "--external-data", "always", "-q").exit_code == 0
    assert set(external_files(tmp_path)) == first  # the same content: the same data file
    changed = onnx.load(str(SAMPLE))
    gamma = next(t for t in changed.graph.initializer if len(t.dims) == 1)
    gamma.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(gamma) * 2, gamma.name))
    onnx.save(changed, str(model))
    assert invoke("optimize", model, "--external-data", "always", "-q").exit_code == 0
    second = set(external_files(tmp_path))
    assert len(first) == len(second) == 2 and first != second  # a new data file, the old one gone
    assert "net.folded.onnx.unrelated.data" in second
    onnx.checker.check_model(str(tmp_path / "net.folded.onnx"), full_check=True)


def test_output_into_a_folder(model_path, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    result = invoke("optimize", model_path, "-o", folder)
    assert result.exit_code == 0, result.output
    assert (folder / "net.folded.onnx").is_file()


def test_quiet_prints_nothing_on_success(model_path, tmp_path):
    result = invoke("optimize", model_path, "-o", tmp_path / "x.onnx", "--quiet")
    assert result.exit_code == 0 and result.stderr == "" and result.stdout == ""


def test_skips_are_reported_with_their_reason(tmp_path):
    path = tmp_path / "shared.onnx"
    shutil.copy(SAMPLE.with_name("shared_conv_output.onnx"), path)
    result = invoke("optimize", path, "--json")
    assert result.exit_code == 0
    skipped = [b for b in json.loads(result.stdout)["batch_normalizations"] if b["status"] == "skipped"]
    assert skipped == [
        {
            "node": "/bn/BatchNormalization",
            "output": "/bn/BatchNormalization_output_0",
            "op": "BatchNormalization",
            "folded_into": None,
            "folded_into_op": None,
            "forward": False,
            "via": None,
            "reason": "Conv '/conv/Conv' output also feeds Sigmoid '/Sigmoid'; "
            "nor forward: it feeds Relu '/Relu', not a Conv, ConvTranspose, Gemm or MatMul",
            "rounding": None,
            "status": "skipped",
        }
    ]
    assert (
        "skipped  Conv '/conv/Conv' output also feeds Sigmoid '/Sigmoid'; "
        "nor forward: it feeds Relu '/Relu', not a Conv, ConvTranspose, Gemm or MatMul" in result.stderr
    )


def test_inspect_writes_nothing(model_path):
    result = invoke("inspect", model_path, "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["written"] is False and report["output"] is None
    assert report["summary"]["folded"] == 9
    assert sorted(p.name for p in model_path.parent.iterdir()) == ["net.onnx"]


def test_refuses_to_overwrite_the_input(model_path):
    before = model_path.read_bytes()
    result = invoke("optimize", model_path, "-o", model_path)
    assert_one_line_error(result, 2, "refusing to overwrite the input model")
    assert model_path.read_bytes() == before


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"", "not an ONNX model"),
        (b"hello, this is a text file\n", "not a readable ONNX model"),
        (bytes(range(256)) * 8, "not a readable ONNX model"),
        (SAMPLE.read_bytes()[: len(SAMPLE.read_bytes()) // 2], "not a readable ONNX model"),
    ],
    ids=["missing", "empty", "text", "random-bytes", "truncated"],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    result = invoke("optimize", path)
    assert_one_line_error(result, 2, message)
    assert not path.with_name("bad.folded.onnx").exists()


def test_an_invalid_model_is_exit_2(tmp_path):
    model = conv_bn_model()
    model.graph.node[2].input[0] = "nothing_produces_this"
    path = tmp_path / "invalid.onnx"
    onnx.save(model, str(path))
    result = invoke("optimize", path)
    assert_one_line_error(result, 2, "the input is not a valid ONNX model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["invalid.onnx"]


def test_a_model_onnxruntime_loads_only_once_folded(tmp_path):
    # onnxruntime has no BatchNormalization-6 kernel: the original cannot run, so it cannot be
    # verified (exit 2, with the way out); with --no-verify the folded Conv + Relu, which does
    # load, is written.
    path = tmp_path / "opset6.onnx"
    onnx.save(conv_bn_model(opset=6, bn_attrs={"is_test": 1}, ir_version=3), str(path))
    assert_one_line_error(invoke("optimize", path), 2, "cannot verify: onnxruntime cannot load")
    assert "--no-verify skips verification" in invoke("optimize", path).stderr
    result = invoke("optimize", path, "--no-verify")
    assert result.exit_code == 0, result.output
    assert op_types(onnx.load(str(tmp_path / "opset6.folded.onnx"))) == ["Conv", "Relu"]


def test_a_model_onnxruntime_cannot_load_is_exit_2(tmp_path):
    path = tmp_path / "custom.onnx"
    onnx.save(_custom_op_model(), str(path))
    result = invoke("optimize", path)
    assert_one_line_error(result, 2, "onnxruntime cannot load")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom.onnx"]


def test_no_verify_folds_a_model_for_another_runtime(tmp_path):
    # --no-verify runs no onnxruntime at all: a model with ops only its own runtime knows folds.
    path = tmp_path / "custom.onnx"
    onnx.save(_custom_op_model(), str(path))
    result = invoke("optimize", path, "--no-verify")
    assert result.exit_code == 0, result.output
    folded = onnx.load(str(tmp_path / "custom.folded.onnx"))
    assert op_types(folded) == ["Conv", "Relu", "Mystery"]
    onnx.checker.check_model(folded, full_check=True)


def _custom_op_model() -> onnx.ModelProto:
    model = conv_bn_model()
    model.graph.node.append(onnx.helper.make_node("Mystery", ["y"], ["z"], name="mystery", domain="example.custom"))
    model.graph.output[0].name = "z"
    model.opset_import.append(onnx.helper.make_opsetid("example.custom", 1))
    return model


def test_unwritable_output_is_exit_2_and_leaves_nothing(model_path, tmp_path):
    # a missing folder is created (tests/test_reliability.py); one under a file cannot be
    result = invoke("optimize", model_path, "-o", tmp_path / "net.onnx" / "dir" / "m.onnx")
    assert_one_line_error(result, 2, "cannot create the folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]


def test_a_folder_without_models_is_exit_2(tmp_path):
    assert_one_line_error(invoke("optimize", tmp_path), 2, "no .onnx files in")


def batch_folder(tmp_path):
    """Three models: two good, one not a model."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "a.onnx")
    shutil.copy(SAMPLE.with_name("mobilenet_tiny.onnx"), folder / "b.onnx")
    (folder / "c.onnx").write_text("not a model")
    return folder


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_folder_of_models_one_failure_does_not_stop_the_rest(tmp_path, jobs):
    folder = batch_folder(tmp_path)
    out = tmp_path / "out"
    result = invoke("optimize", folder, "-o", out, "--jobs", jobs, "--json")
    assert result.exit_code == 2, result.output  # the most severe of 0, 0, 2
    report = json.loads(result.stdout)
    assert report["summary"] == {"models": 3, "written": 2, "failed": 1}
    assert [(Path(m["input"]).name, m["exit_code"]) for m in report["models"]] == [
        ("a.onnx", 0),
        ("b.onnx", 0),
        ("c.onnx", 2),
    ]
    assert "not a readable ONNX model" in report["models"][2]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["a.folded.onnx", "b.folded.onnx"]
    assert "FAIL  " in result.stderr and "3 models: 2 written, 1 failed" in result.stderr
    assert "[#" not in result.stderr  # no progress bar when stderr is not a terminal


def test_several_files_and_a_file_as_output_folder(tmp_path):
    folder = batch_folder(tmp_path)
    result = invoke("optimize", folder / "a.onnx", folder / "b.onnx", "-q")
    assert result.exit_code == 0 and result.stderr == ""
    assert (folder / "a.folded.onnx").exists() and (folder / "b.folded.onnx").exists()
    assert_one_line_error(
        invoke("optimize", folder / "a.onnx", folder / "b.onnx", "-o", folder / "a.onnx"), 2, "-o must name a folder"
    )


def test_help_documents_exit_codes():
    for args in (["--help"], ["optimize", "--help"], ["inspect", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0
        assert "Exit codes: 0 success" in " ".join(result.stdout.split())


@pytest.mark.parametrize("command", [[], ["optimize"], ["verify"], ["inspect"], ["bench"]])
def test_dash_h_is_help_and_metavars_name_the_domain(command):
    result = runner.invoke(app, [*command, "-h"], prog_name="bnfold")
    assert (
        result.exit_code == 0 and result.stdout == runner.invoke(app, [*command, "--help"], prog_name="bnfold").stdout
    )
    text = " ".join(result.stdout.split())
    assert "Usage: bnfold" in text
    for internal in ("{models}", "{reference}", "{model}"):
        assert internal not in text, internal
    assert not re.findall(r"<(?:str|int|float|path|list\[\w+\])>", text)  # Typer's annotation labels
    if command == ["verify"]:
        usage = text.split(" Run both models")[0]  # Typer versions bracket the arguments differently
        assert "REFERENCE" in usage and "CANDIDATE" in usage
        assert "--provider NAME" in text and "--inputs FILE|DIR" in text
        assert "99th percentile" in text  # --atol says what S is


def test_unexpected_exception_is_exit_3_not_1(capsys):
    # Exit 1 means "not equivalent"; a crash must never be read as that.
    with pytest.raises(typer.Exit) as exit_info:
        Console("verify", json=False).guard(lambda: 1 / 0)
    assert exit_info.value.exit_code == EXIT_INTERNAL_ERROR
    assert "ZeroDivisionError" in capsys.readouterr().err


def test_help_and_inspect_do_not_import_onnxruntime():
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from bnfold.cli import app\n"
        "CliRunner().invoke(app, ['--help'])\n"
        "print(sorted(m for m in ('onnx', 'numpy', 'onnxruntime') if m in sys.modules))\n"
        f"CliRunner().invoke(app, ['inspect', {str(SAMPLE)!r}])\n"
        "print('onnxruntime' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "False"]


@pytest.mark.parametrize("flags", [[], ["--no-verify"]], ids=["verify", "no-verify"])
def test_a_fold_that_breaks_the_graph_is_exit_3_and_writes_nothing(model_path, monkeypatch, flags):
    # A seeded bnfold bug: the Conv no longer takes over the BatchNormalization's output name,
    # so the Relu reads a tensor nothing produces. The checker (on the skeleton) must catch it.
    from bnfold.graph.index import GraphIndex

    monkeypatch.setattr(GraphIndex, "set_output", lambda self, node, position, name: None)
    result = invoke("optimize", model_path, *flags)
    assert_one_line_error(result, EXIT_INTERNAL_ERROR, "fails onnx.checker although the input passes")
    assert sorted(p.name for p in model_path.parent.iterdir()) == [model_path.name]


def test_no_reparam_keeps_the_branches_and_inspect_shows_the_merges(tmp_path):
    sample = Path(__file__).resolve().parents[1] / "sample_models" / "repvgg_tiny.onnx"
    merged = json.loads(invoke("inspect", sample, "--json").stdout)
    assert merged["summary"]["branch_merges"] == 4 and merged["summary"]["folded"] == 12
    kept = json.loads(invoke("inspect", sample, "--no-reparam", "--json").stdout)
    assert kept["summary"]["branch_merges"] == 0 and kept["summary"]["folded"] == 9
    result = invoke("optimize", sample, "-o", tmp_path / "kept.onnx", "--no-reparam")
    assert result.exit_code == 0, result.output
    assert op_types(onnx.load(str(tmp_path / "kept.onnx"))).count("Conv") == 9


def test_brief_shows_only_what_needs_a_look(tmp_path):
    sample = Path(__file__).resolve().parents[1] / "sample_models" / "preact_input_bn.onnx"
    full = invoke("optimize", sample, "-o", tmp_path / "full.onnx")
    brief = invoke("optimize", sample, "-o", tmp_path / "brief.onnx", "--brief")
    assert full.exit_code == brief.exit_code == 0, brief.output
    assert " folded " in full.stderr and "output  dtype" in full.stderr
    assert " folded " not in brief.stderr and "output  dtype" not in brief.stderr  # every output matched
    assert "/block/block.0/BatchNormalization  skipped" in brief.stderr
    assert "folded 1 of 2 BatchNormalization nodes" in brief.stderr and "equivalent: all 1 outputs" in brief.stderr


def on_a_terminal(args, columns: int = 200, **env) -> tuple[int, str]:
    """Run `bnfold ARGS` with stderr on a pseudo-terminal `columns` wide: its exit code and what
    the terminal showed (read as it comes, so that a full terminal never blocks the command)."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    terminal, stderr = pty.openpty()
    fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    command = [sys.executable, "-m", "bnfold", *map(str, args)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, **env})
    os.close(stderr)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # the terminal's other end is closed: all read
            break
        if not chunk:
            break
        shown += chunk
    os.close(terminal)
    return process.wait(timeout=300), shown.decode(errors="replace")


@pytest.mark.parametrize("no_color", ["", "1"])
def test_a_fail_is_red_on_a_terminal_unless_no_color(tmp_path, no_color):
    sample = Path(__file__).resolve().parents[1] / "sample_models" / "preact_input_bn.onnx"
    mistaken = onnx.load(str(sample))
    bias = next(t for t in mistaken.graph.initializer if t.name == "stem.bias")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 0.1, "stem.bias"))
    onnx.save(mistaken, tmp_path / "mistaken.onnx")
    code, shown = on_a_terminal(["verify", sample, tmp_path / "mistaken.onnx"], NO_COLOR=no_color, TERM="xterm")
    assert code == 1 and "NOT equivalent" in shown
    assert ("\x1b[1;31mFAIL\x1b[0m" in shown) == (not no_color), shown


def test_tables_fit_the_terminal_and_what_needs_a_look_comes_first():
    sample = Path(__file__).resolve().parents[1] / "sample_models" / "shared_conv_output.onnx"
    code, shown = on_a_terminal(["inspect", sample], columns=100, NO_COLOR="1")
    lines = shown.replace("\r", "").splitlines()
    assert code == 0 and len(lines) > 5, shown
    assert max(map(len, lines)) <= 100, shown  # the skip's reason alone is 170 characters
    rows = [line.split()[1] for line in lines if line.startswith("/")]  # not the wrapped reason's lines
    assert rows == ["skipped", "folded", "folded"], shown  # in graph order, the skip is second
    piped = subprocess.run([sys.executable, "-m", "bnfold", "inspect", str(sample)], capture_output=True, text=True)
    assert max(map(len, piped.stderr.splitlines())) > 150  # a log keeps one row per line


def test_a_batch_on_a_terminal_shows_the_model_at_work_and_the_time(tmp_path):
    samples = Path(__file__).resolve().parents[1] / "sample_models"
    models = [samples / "resnet_tiny.onnx", samples / "mobilenet_tiny.onnx"]
    code, shown = on_a_terminal(["optimize", *models, "-o", tmp_path / "out"])
    assert code == 0, shown
    assert "0/2 models · 0:0" in shown and "now resnet_tiny.onnx" in shown, shown
    assert "1/2 models · 0:0" in shown and "left · now mobilenet_tiny.onnx" in shown, shown
    assert shown.rstrip().endswith("2 models: 2 written, 0 failed"), shown


def test_bench_times_both_models_in_both_settings():
    sample = Path(__file__).resolve().parents[1] / "sample_models" / "repvgg_tiny.onnx"
    result = invoke("bench", sample, "--runs", "3", "--warmup", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    timings = {(t["model"], t["optimizations"]): t for t in report["timings"]}
    assert set(timings) == {(m, o) for m in ("original", "folded") for o in ("disabled", "enabled")}
    assert all(t["latency_ms"] > 0 and t["session_ms"] > 0 for t in timings.values())
    assert report["inputs"] == [{"name": "input", "dtype": "float32", "shape": [1, 3, 32, 32]}]
    assert report["folded"] is None and report["fold_summary"].startswith("folded 12 of 12")  # a deleted file


def test_bench_chooses_sizes_that_run_as_verify_does(tmp_path):
    # a detector whose H and W must be multiples of 32: generated at 16 it cannot run
    from test_verdict import save, strided_model

    model = save(strided_model(batch_norm=True), tmp_path / "yolo.onnx")
    result = invoke("bench", model, "--runs", "2", "--warmup", "0", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 3, 32, 32]}]
    assert "note: onnxruntime does not run the reference with symbolic dimensions at 16" in report["notes"]


def test_bench_of_a_missing_model_is_exit_2(tmp_path):
    assert_one_line_error(invoke("bench", tmp_path / "none.onnx"), 2, "no such file")


def test_bench_with_an_input_shape_the_model_rejects_is_exit_2():
    sample = Path(__file__).resolve().parents[1] / "sample_models" / "repvgg_tiny.onnx"
    assert_one_line_error(invoke("bench", sample, "--input-shape", "input:1x3x64x64"), 2, "onnxruntime could not run")


# Plain `pip install bnfold` installs no runtime (the extras [cpu] and [gpu] choose one): run the
# CLI in a process where `import onnxruntime` fails as it does when neither build is installed.
WITHOUT_ONNXRUNTIME = "import sys; sys.modules['onnxruntime'] = None; from bnfold.cli import main; main()"


def bnfold_without_onnxruntime(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_ONNXRUNTIME, *map(str, args)], capture_output=True, text=True)


def test_without_onnxruntime_folding_works_and_verification_names_the_extra(tmp_path):
    onnx.save(conv_bn_model(), tmp_path / "m.onnx")
    folded = bnfold_without_onnxruntime("optimize", tmp_path / "m.onnx", "--no-verify", "-o", tmp_path / "f.onnx")
    assert folded.returncode == 0, folded.stderr
    assert op_types(onnx.load(tmp_path / "f.onnx")) == ["Conv", "Relu"]
    inspected = bnfold_without_onnxruntime("inspect", tmp_path / "m.onnx")
    assert inspected.returncode == 0, inspected.stderr
    optimize = ["optimize", tmp_path / "m.onnx", "-o", tmp_path / "v.onnx"]
    for args in (optimize, ["verify", tmp_path / "m.onnx", tmp_path / "f.onnx"]):
        refused = bnfold_without_onnxruntime(*args)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "onnxruntime is not installed" in refused.stderr and "pip install 'bnfold[cpu]'" in refused.stderr
    assert not (tmp_path / "v.onnx").exists()


def test_an_input_shape_in_onnxsims_comma_syntax_is_read():
    # Issue 32: `--input-shape x:1,3,48,192` (onnxsim's and onnxslim's syntax) was refused
    from bnfold.options import input_shapes

    assert input_shapes(["x:1,3,48,192", "y:1x3x8x8"]) == {"x": [1, 3, 48, 192], "y": [1, 3, 8, 8]}
    result = invoke("verify", str(SAMPLE), str(SAMPLE), "--input-shape", "input:2,3,32,32")
    assert result.exit_code == 0, result.output


def test_inspect_takes_a_folder_of_models_as_optimize_does(tmp_path):
    # Issue 32: `inspect models/` failed `is a directory`, though docs/cli.md says it takes models as optimize does
    import shutil

    for name in ("a.onnx", "b.onnx"):
        shutil.copy(SAMPLE, tmp_path / name)
    result = invoke("inspect", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    assert sorted(Path(item["input"]).name for item in json.loads(result.stdout)["models"]) == ["a.onnx", "b.onnx"]


def test_a_missing_file_is_a_file_not_found_error_in_python_and_one_line_on_the_cli(tmp_path):
    # Issue 32: Python code around bnfold.fold(path) expects FileNotFoundError
    import bnfold

    for call in (lambda: bnfold.fold(tmp_path / "nope.onnx"), lambda: bnfold.verify(tmp_path / "a.onnx", SAMPLE)):
        with pytest.raises(FileNotFoundError) as raised:
            call()
        assert isinstance(raised.value, bnfold.BnfoldError)
    assert_one_line_error(invoke("inspect", str(tmp_path / "nope.onnx")), 2, "no such file")


def _mistaken_preact(tmp_path) -> tuple[Path, Path]:
    sample = Path(__file__).resolve().parents[1] / "sample_models" / "preact_input_bn.onnx"
    mistaken = onnx.load(str(sample))
    bias = next(t for t in mistaken.graph.initializer if t.name == "stem.bias")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 0.1, "stem.bias"))
    onnx.save(mistaken, tmp_path / "mistaken.onnx")
    return sample, tmp_path / "mistaken.onnx"


def test_report_page_shows_each_site_against_its_allowance(model_path, tmp_path):
    page = tmp_path / "pages" / "net.html"  # its folder is made
    result = invoke("optimize", model_path, "-o", tmp_path / "out.onnx", "--report", page, "--json")
    assert result.exit_code == 0, result.output
    report, html = json.loads(result.stdout), page.read_text()
    sites = report["verification"]["sites"]
    assert html.count("<circle") == len(sites) == 9 and html.count("fill='#2a8a3e'") == 9  # each green
    assert "class='verdict ok'" in html and "folded 9 of 9 BatchNormalization nodes" in html
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in html and " src=" not in html  # self-contained: nothing fetched
    for b in report["batch_normalizations"]:  # what was folded where
        assert f"<td>{b['node']}</td>" in html and b["folded_into"] in html
    assert [p.name for p in page.parent.iterdir()] == ["net.html"]  # no staged file left


def test_report_page_of_a_wrong_candidate_shows_the_site_that_failed(tmp_path):
    reference, candidate = _mistaken_preact(tmp_path)
    result = invoke("verify", reference, candidate, "--report", tmp_path / "v.html")
    assert result.exit_code == 1, result.output
    html = (tmp_path / "v.html").read_text()
    assert "class='verdict fail'" in html and "NOT equivalent" in html and "fill='#c0262d'" in html  # a red mark
    assert "<ul class=bad><li>" in html and "FAIL" in html  # the failing tensor with its reason


@pytest.mark.parametrize("case", ["several models", "the input", "a device"])
def test_report_page_never_replaces_a_model_and_takes_one_model(model_path, tmp_path, case):
    other = tmp_path / "other.onnx"
    shutil.copy(model_path, other)
    before = model_path.read_bytes()
    args = {
        "several models": ("optimize", model_path, other, "-o", tmp_path / "out", "--report", tmp_path / "r.html"),
        "the input": ("optimize", model_path, "-o", tmp_path / "out.onnx", "--report", model_path),
        "a device": ("verify", model_path, other, "--report", "/dev/null"),
    }[case]
    result = invoke(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert model_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "other.onnx"]  # nothing written
