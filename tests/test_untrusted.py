"""Model files from anywhere: external data never read from outside the model's folder, hostile
files never a traceback, an interrupted run never a partial output."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import onnx
import pytest
from builders import make_model
from typer.testing import CliRunner

from bnfold.cli import app

SAMPLE = Path(__file__).resolve().parents[1] / "sample_models" / "resnet_tiny.onnx"
runner = CliRunner()


def external_model(folder: Path, location: str = "weights.bin") -> Path:
    """resnet_tiny with every initializer in `folder/weights.bin`, then its locations set to
    `location` (the data file itself stays where it is)."""
    path = folder / "model.onnx"
    onnx.save(onnx.load(str(SAMPLE)), str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    if location != "weights.bin":
        model = onnx.load(str(path), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(model, str(path))
    return path


def assert_cli_refuses(args, message: str, folder: Path) -> None:
    before = sorted(p.name for p in folder.iterdir())
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written


def test_external_data_inside_the_folder_is_read(tmp_path):
    path = external_model(tmp_path)
    result = runner.invoke(app, ["optimize", str(path), "-q"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "location, message",
    [
        ("/etc/passwd", "an absolute path"),
        ("../outside/weights.bin", "a path with '..'"),
        ("sub/../../weights.bin", "a path with '..'"),
        ("C:\\\\Windows\\\\weights.bin", "an absolute path"),
        ("", "no location"),
    ],
    ids=["absolute", "dot-dot", "nested-dot-dot", "windows-drive", "empty"],
)
def test_escaping_locations_are_refused(tmp_path, location, message):
    path = external_model(tmp_path, location)
    for command in (["optimize", path], ["verify", path, path], ["inspect", path]):
        assert_cli_refuses(command, message, tmp_path)


def test_a_symlink_leading_out_of_the_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    inside = tmp_path / "model"
    inside.mkdir()
    path = external_model(inside)
    (inside / "weights.bin").rename(outside / "weights.bin")
    (inside / "weights.bin").symlink_to(outside / "weights.bin")
    for command in (["optimize", path], ["verify", path, path]):
        assert_cli_refuses(command, "leads outside the model's folder", inside)


def test_a_hard_link_is_refused(tmp_path):
    inside = tmp_path / "model"
    inside.mkdir()
    path = external_model(inside)
    os.link(inside / "weights.bin", tmp_path / "second_name.bin")
    assert_cli_refuses(["optimize", path], "is a hard link", inside)


def test_missing_or_short_data_files_are_exit_2(tmp_path):
    path = external_model(tmp_path)
    data = tmp_path / "weights.bin"
    data.write_bytes(data.read_bytes()[:100])
    assert_cli_refuses(["optimize", path], "reaches past the end of 'weights.bin'", tmp_path)
    data.unlink()
    assert_cli_refuses(["optimize", path], "external data file 'weights.bin' is missing", tmp_path)


# ---- fuzzing: broken and hostile files -----------------------------------------------------------
FUZZ_SAMPLES = ["shared_conv_output", "token_mlp_batchnorm1d", "mlp_batchnorm1d", "decoder_convtranspose"]


@pytest.mark.parametrize("seed", range(4))
def test_mutated_model_files_exit_0_or_2_and_never_leave_a_partial_output(seed, tmp_path):
    """60 seeded mutations per seed (bit flips, truncations, inserted, deleted and swapped
    bytes): exit 0 with a valid model written, or exit 2 (or 1: a valid but numerically broken
    model whose fold does not verify) with one line and nothing written."""
    import numpy as np
    from builders import mutate

    rng = np.random.default_rng([2026, seed])
    for case in range(60):
        name = FUZZ_SAMPLES[case % len(FUZZ_SAMPLES)]
        folder = tmp_path / f"case{case}"
        folder.mkdir()
        path = folder / "m.onnx"
        path.write_bytes(mutate((SAMPLE.parent / f"{name}.onnx").read_bytes(), rng))
        result = runner.invoke(app, ["optimize", str(path), "--trials", "1"])
        written = sorted(p.name for p in folder.iterdir())
        context = f"seed {seed} case {case} ({name}): {result.output[-400:]}"
        assert result.exit_code in (0, 1, 2), context
        assert "Traceback" not in result.output, context
        if result.exit_code == 0:
            assert written == ["m.folded.onnx", "m.onnx"], context
            onnx.checker.check_model(onnx.load(str(folder / "m.folded.onnx")), full_check=True)
        else:
            assert written == ["m.onnx"], context
            if result.exit_code == 2:
                assert len(result.stderr.strip().splitlines()) == 1, context


# ---- interrupted runs ----------------------------------------------------------------------------
def big_model(path: Path) -> None:
    """A Conv → BN model with ~37 MB of weights: long enough to write that a kill can land in it."""
    import numpy as np
    from builders import linear_bn_model

    weight = np.random.default_rng(0).normal(0, 0.1, (1024, 1024, 3, 3)).astype(np.float32)
    onnx.save(linear_bn_model("Conv", weight=weight, bias=None, x_shape=[1, 1024, 3, 3]), str(path))


def run_and_kill(
    args: list[str], folder: Path, *, when_temp_appears: bool, delay: float = 0.0, descendants: list | None = None
) -> int:
    """Start `python -m bnfold …`; SIGKILL it as soon as its temporary output file exists (or
    after `delay` seconds). Returns the exit status (negative: killed by a signal). Its
    temporary folder (the supervisor's journal) is `folder`/temp, not the machine's. With
    `descendants`, the pids of its processes' children, read just before the kill, go there."""
    import signal
    import subprocess
    import sys
    import time

    (folder / "temp").mkdir(exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "bnfold", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(folder / "temp")},
    )  # fmt: skip
    start = time.monotonic()
    while process.poll() is None:
        temporary = any(p.name.endswith(".tmp") for p in folder.iterdir())
        if (when_temp_appears and temporary) or (not when_temp_appears and time.monotonic() - start >= delay):
            if descendants is not None:
                descendants += _descendants(process.pid)
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    return process.wait()


def test_a_run_killed_mid_write_leaves_no_partial_output(tmp_path):
    model = tmp_path / "big.onnx"
    big_model(model)
    before = model.read_bytes()
    out = tmp_path / "big.folded.onnx"
    status = run_and_kill(["optimize", str(model), "--no-verify", "-q"], tmp_path, when_temp_appears=True)
    assert status == -9, "the run ended before its output was being written"
    assert not out.exists()
    assert model.read_bytes() == before


def test_a_run_killed_mid_write_keeps_the_previous_output_whole(tmp_path):
    model = tmp_path / "big.onnx"
    big_model(model)
    out = tmp_path / "big.folded.onnx"
    assert runner.invoke(app, ["optimize", str(model), "--no-verify", "-q"]).exit_code == 0
    previous = out.read_bytes()
    status = run_and_kill(["optimize", str(model), "--no-verify", "-q"], tmp_path, when_temp_appears=True)
    assert status == -9
    assert out.read_bytes() == previous  # old and complete, never half-replaced


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_bnfold_killed_outright_takes_its_work_with_it_and_the_next_run_removes_what_it_left(tmp_path):
    # `kill -9 bnfold` (a CI runner's cancel, `timeout -s KILL`) runs none of bnfold's code. Its
    # child must not go on to write the output after the run was reported dead; the hidden file it
    # was writing is removed by the next bnfold run, which finds the journal no live process holds.
    import subprocess

    model = tmp_path / "big.onnx"
    big_model(model)
    work: list[int] = []
    status = run_and_kill(["optimize", str(model), "--no-verify", "-q"], tmp_path, when_temp_appears=True,
                          descendants=work)  # fmt: skip
    assert status == -9 and work
    staged = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    (journal,) = (tmp_path / "temp").iterdir()
    _wait_gone(work)  # an orphan ends only once it has written its model
    assert not (tmp_path / "big.folded.onnx").exists()
    assert staged and all(p.exists() for p in staged)  # nothing of bnfold's ran when it was killed
    sample = Path(__file__).resolve().parents[1] / "sample_models" / "resnet_tiny.onnx"
    subprocess.run([sys.executable, "-m", "bnfold", "inspect", str(sample)], capture_output=True, check=True,
                   env={**os.environ, "TMPDIR": str(tmp_path / "temp")})  # fmt: skip
    assert not any(p.exists() for p in staged) and not journal.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "temp"]


def _descendants(pid: int) -> list[int]:
    """The processes `pid` started, and theirs (Linux's /proc)."""
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return children + [d for c in children for d in _descendants(c)]


def _wait_gone(pids: list[int], seconds: float = 30.0) -> None:
    """Until every process of `pids` has ended (a zombie counts as ended), or `seconds` passed."""
    import time

    def alive(pid: int) -> bool:
        try:
            return "\tZ" not in Path(f"/proc/{pid}/status").read_text().split("State:")[1][:4]
        except (OSError, IndexError):
            return False

    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_batch_killed_outright_stops_its_workers_and_they_remove_what_they_staged(tmp_path):

    for name in ("a.onnx", "b.onnx"):
        big_model(tmp_path / name)
    args = ["optimize", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--jobs", "2", "--no-verify", "-q"]
    work: list[int] = []
    assert run_and_kill(args, tmp_path, when_temp_appears=True, descendants=work) == -9 and len(work) >= 3
    written = {p.name for p in tmp_path.iterdir() if p.name.endswith(".folded.onnx")}
    _wait_gone(work)  # the child and its workers (and their resource tracker)
    assert {p.name for p in tmp_path.iterdir() if p.name.endswith(".folded.onnx")} == written
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # each worker removed its own


def test_a_sweep_removes_only_bnfold_s_staged_names_of_journals_nobody_holds(tmp_path):
    import fcntl

    from bnfold.supervise import _sweep_abandoned

    kept, staged, held_staged = tmp_path / "model.onnx", tmp_path / ".m.onnx.0a1b2c3d.tmp", tmp_path / ".n.onnx.1.tmp"
    for path in (kept, staged, held_staged):
        path.write_bytes(b"x")
    abandoned, held = tmp_path / "bnfold-staged-a.txt", tmp_path / "bnfold-staged-b.txt"
    abandoned.write_text(f"+{staged}\n+{kept}\n")  # a journal that names a file bnfold never stages
    held.write_text(f"+{held_staged}\n")
    with open(held) as live:
        fcntl.flock(live, fcntl.LOCK_EX)  # a run still alive
        _sweep_abandoned(str(tmp_path))
    assert not staged.exists() and not abandoned.exists()
    assert kept.exists() and held_staged.exists() and held.exists()


@pytest.mark.parametrize("delay", [0.2, 0.6, 1.0, 1.5, 2.5])
def test_a_run_killed_at_any_moment_leaves_nothing_or_a_valid_model(tmp_path, delay):
    model = tmp_path / "big.onnx"
    big_model(model)
    before = model.read_bytes()
    run_and_kill(["optimize", str(model), "--no-verify", "-q"], tmp_path, when_temp_appears=False, delay=delay)
    out = tmp_path / "big.folded.onnx"
    if out.exists():
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert model.read_bytes() == before


# ---- named hostile cases --------------------------------------------------------------------------
def test_a_protobuf_of_another_message_is_exit_2(tmp_path):
    import numpy as np
    from onnx import numpy_helper

    path = tmp_path / "tensor.onnx"
    path.write_bytes(numpy_helper.from_array(np.arange(1000, dtype=np.float32), "t").SerializeToString())
    assert_cli_refuses(["optimize", path], "not", tmp_path)


def test_a_graph_with_a_cycle_is_exit_2(tmp_path):
    from builders import conv_bn_model

    model = conv_bn_model()
    model.graph.node[0].input[0] = "y"  # the conv reads the relu's output
    path = tmp_path / "cycle.onnx"
    onnx.save(model, str(path))
    assert_cli_refuses(["optimize", path], "the input is not a valid ONNX model", tmp_path)


def test_an_absurd_declared_input_shape_is_exit_2(tmp_path):
    from builders import conv_bn_model

    model = conv_bn_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 10**9
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 10**9
    path = tmp_path / "huge.onnx"
    onnx.save(model, str(path))
    assert_cli_refuses(["optimize", path], "need more than 1 GiB", tmp_path)


def test_deeply_nested_subgraphs_are_exit_0_or_2_without_a_traceback(tmp_path):
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("v", TensorProto.FLOAT, [1])
    leaf = helper.make_graph([helper.make_node("Identity", ["x"], ["v"])], "leaf", [], [value])
    body = leaf
    # Nested through then_branch only (both branches would double the model per level). protobuf
    # itself caps message depth at 100 (Graph → Node → Attribute per level), so a deeper file
    # cannot even be parsed, which bnfold reports as exit 2; this is as deep as one can be built.
    for depth in range(30):
        node = helper.make_node("If", ["cond"], ["v"], then_branch=body, else_branch=leaf)
        body = helper.make_graph([node], f"level{depth}", [], [value])
    graph = helper.make_graph(
        body.node,
        "nested",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [value],
    )
    path = tmp_path / "nested.onnx"
    path.write_bytes(make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    result = runner.invoke(app, ["optimize", str(path), "--no-verify"])
    assert result.exit_code in (0, 2) and "Traceback" not in result.output, result.output


def test_a_symlink_at_the_destination_is_replaced_not_followed(tmp_path):
    import shutil

    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    model = tmp_path / "net.onnx"
    shutil.copy(SAMPLE, model)
    (tmp_path / "net.folded.onnx").symlink_to(target)
    assert runner.invoke(app, ["optimize", str(model), "-q"]).exit_code == 0
    assert not (tmp_path / "net.folded.onnx").is_symlink()
    assert target.read_text() == "keep me"


def test_a_model_too_big_to_check_in_memory_is_a_clear_error_for_inspect(monkeypatch, tmp_path):
    # Past 2 GiB onnx.checker needs the model on disk; the limit is lowered to test the path.
    import bnfold.io.output

    monkeypatch.setattr(bnfold.io.output, "SINGLE_FILE_LIMIT", 1000)
    result = runner.invoke(app, ["inspect", str(SAMPLE)])
    assert result.exit_code == 2
    assert "over 2 GiB, and onnx.checker reads such a model only from disk" in result.stderr


def test_a_test_data_file_that_declares_external_data_is_refused_not_read(tmp_path):
    # Issue 32: onnx resolves the location against the working directory, so any plain file
    # below it was read, run, and copied by --save-inputs into the folder meant for bug reports.
    import subprocess
    import sys

    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])  # fmt: skip
    model = make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    (tmp_path / "secret.txt").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    tensor = TensorProto(name="x", data_type=TensorProto.FLOAT, dims=[2, 2])
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "secret.txt"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "input_0.pb").write_bytes(tensor.SerializeToString())
    run = subprocess.run(
        [sys.executable, "-m", "bnfold", "verify", "m.onnx", "m.onnx", "--inputs", "data", "--save-inputs", "out"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "declared external" in run.stderr and not (tmp_path / "out").exists()
