"""Never lose or overwrite a file bnfold did not create in this run. Each case runs the real CLI
in a subprocess, the way a pipeline runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import make_model

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


@pytest.mark.parametrize("signal_name, said", [("SIGKILL", "was killed (SIGKILL"), ("SIGSEGV", "crashed (SIGSEGV)")])
def test_a_run_killed_during_verification_leaves_no_file_and_says_so(tmp_path, signal_name, said):
    # The work dies the moment verification starts (the OOM killer; onnxruntime dereferencing a
    # bad pointer): the staged model and its data exist. The supervising process removes them,
    # says what happened in one line, and exits 2 with the JSON report.
    shutil.copy(SAMPLE, tmp_path / "model.onnx")
    script = (
        "import os, signal, sys; import bnfold.pipeline as p; "
        f"p._verify = lambda *a, **k: os.kill(os.getpid(), signal.{signal_name}); "
        "from bnfold.cli import main; sys.argv[0] = 'bnfold'; main()"
    )
    model = str(tmp_path / "model.onnx")
    command = [sys.executable, "-c", script, "optimize", model, "--external-data", "always", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    assert result.stderr.startswith(f"bnfold: error: the run {said}") and "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert report["exit_code"] == 2 and report["command"] == "optimize" and said in report["error"]


def _run_with(script_lines: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`bnfold optimize model.onnx --json` in a process where `script_lines` ran first."""
    shutil.copy(SAMPLE, tmp_path / "model.onnx")
    script = f"import os, signal, sys, atexit; import bnfold.pipeline as p\n{script_lines}\n" + (
        "from bnfold.cli import main; sys.argv[0] = 'bnfold'; main()"
    )
    command = [sys.executable, "-c", script, "optimize", str(tmp_path / "model.onnx"), "--json"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_an_exit_status_bnfold_never_gives_is_a_crash_of_native_code(tmp_path):
    # the dynamic loader ends the process with _exit(127) on a broken custom-op library
    result = _run_with("p._verify = lambda *a, **k: os._exit(127)", tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("bnfold: error: the run crashed (exit status 127) in native code")
    assert json.loads(result.stdout)["exit_code"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_a_crash_at_interpreter_shutdown_cannot_undo_a_finished_run(tmp_path):
    # a custom-op library whose unloading crashes: the run's report and output stand
    result = _run_with(
        "real = p._verify\n"
        "def verify(*a, **k):\n"
        "    atexit.register(lambda: os.kill(os.getpid(), signal.SIGSEGV))\n"
        "    return real(*a, **k)\n"
        "p._verify = verify",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["written"] and (tmp_path / "model.folded.onnx").exists()


def test_a_model_that_crashes_onnxruntime_costs_one_line_not_the_process(tmp_path):
    # A BatchNormalization-7 whose four optional outputs are named "": onnxruntime (1.20 to 1.32
    # at least) dereferences one of them and dies of SIGSEGV when it runs the model unoptimized,
    # as verification does. The fold itself is right (--no-verify writes it).
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    params = {"W": rng.normal(size=(4, 3, 3, 3)), "g": rng.uniform(0.5, 1.5, 4), "b": rng.normal(size=4),
              "m": rng.normal(size=4), "v": rng.uniform(0.5, 1.5, 4)}  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y", "", "", "", ""]),
    ]
    graph = helper.make_graph(
        nodes, "bn7", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()],
    )  # fmt: skip
    path = tmp_path / "bn7.onnx"
    onnx.save(make_model(graph, opset_imports=[helper.make_opsetid("", 7)]), path)
    command = [sys.executable, "-m", "bnfold", "optimize", str(path), "-o", str(tmp_path / "out.onnx"), "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    if result.returncode == 0:  # an onnxruntime that runs it: then verified like any model
        assert report["verification"]["equivalent"]
        return
    assert result.returncode == 2 and report["exit_code"] == 2, result.stderr
    assert result.stderr.startswith("bnfold: error: the run crashed (SIGSEGV) in native code")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn7.onnx"]


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


# ---- containment: checked and read through one handle ----------------------------------------------
def external(folder: Path, location: str = "weights.bin") -> Path:
    path = folder / "model.onnx"
    onnx.save(onnx.load(str(SAMPLE)), str(path), save_as_external_data=True, location=location, size_threshold=0)
    return path


def test_a_data_file_swapped_after_the_check_is_not_read(tmp_path):
    from bnfold.io.source import ModelSource

    (tmp_path / "model").mkdir()
    path = external(tmp_path / "model")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"S" * (tmp_path / "model" / "weights.bin").stat().st_size)
    with ModelSource.open(path) as source:
        os.replace(tmp_path / "model" / "weights.bin", tmp_path / "model" / "moved.bin")
        (tmp_path / "model" / "weights.bin").symlink_to(secret)  # swapped in after the check
        weight = next(t for t in source.model.graph.initializer if len(t.dims) == 4)
        values = source.read(weight)
    assert b"SSSS" not in values.tobytes()
    original = onnx.load(str(SAMPLE))
    want = next(t for t in original.graph.initializer if t.name == weight.name)
    assert values.tobytes() == onnx.numpy_helper.to_array(want).tobytes()


def test_a_repeated_external_data_key_is_refused(tmp_path):
    path = external(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    model.graph.initializer[0].external_data.add(key="location", value="../outside.bin")
    path.write_bytes(model.SerializeToString())
    one_line_error(bnfold("optimize", path, "--no-verify"), "gives its external-data key 'location' twice")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("location", "weights\0.bin", "a NUL character"),
        ("offset", "-8", "a negative external-data offset or length"),
        ("length", "-4", "a negative external-data offset or length"),
    ],
)
def test_malformed_external_data_is_one_line(key, value, message, tmp_path):
    path = external(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    weight = next(t for t in model.graph.initializer if len(t.dims) == 4)
    entry = next((e for e in weight.external_data if e.key == key), None) or weight.external_data.add(key=key)
    entry.value = value
    path.write_bytes(model.SerializeToString())
    result = bnfold("optimize", path, "--no-verify")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_hugging_face_hub_cache_layout_folds(tmp_path):
    # models--org--name/snapshots/<rev>/{model.onnx, weights.bin} are links into blobs/
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    built = tmp_path / "build"
    built.mkdir()
    external(built)
    for name, blob in (("model.onnx", "1f2e"), ("weights.bin", "9a8b")):
        (built / name).rename(repo / "blobs" / blob)
        (repo / "snapshots" / "abc123" / name).symlink_to(Path("..") / ".." / "blobs" / blob)
    result = bnfold("optimize", repo / "snapshots" / "abc123" / "model.onnx", "-o", tmp_path / "out.onnx", "-q")
    assert result.returncode == 0, result.stderr
    assert loads(tmp_path / "out.onnx")


def test_a_link_planted_beside_a_model_still_leads_nowhere(tmp_path):
    (tmp_path / "model").mkdir()
    path = external(tmp_path / "model")
    (tmp_path / "model" / "weights.bin").rename(tmp_path / "elsewhere.bin")
    (tmp_path / "model" / "weights.bin").symlink_to(tmp_path / "elsewhere.bin")
    one_line_error(bnfold("optimize", path, "--no-verify"), "leads outside the model's folder")


def test_a_fifo_given_as_the_model_is_one_line_not_a_hang(tmp_path):
    os.mkfifo(tmp_path / "model.onnx")
    one_line_error(bnfold("optimize", tmp_path / "model.onnx"), "is not a regular file")


# ---- one line, not a traceback -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "damage, message",
    [
        ("four bytes too many", "holds 868 bytes of data; its dims [6, 4, 3, 3] and type need 864"),
        ("dims of 2^45 bytes", "and type need 35184372088832"),
        ("dims past int64", "and type need"),
        ("a negative dimension", "has a negative dimension"),
    ],
)
def test_a_tensor_whose_data_does_not_fit_its_dims_is_one_line(damage, message, tmp_path):
    from builders import conv_bn_model

    model = conv_bn_model()
    weight = next(t for t in model.graph.initializer if t.name == "W")  # the folded weight
    if damage == "four bytes too many":
        weight.raw_data += b"\0\0\0\0"
    else:
        dims = {"dims of 2^45 bytes": [1 << 43], "dims past int64": [1 << 40, 1 << 40], "a negative dimension": [-1]}
        del weight.dims[:]
        weight.dims.extend(dims[damage])
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    for command in (["optimize", path, "--no-verify"], ["inspect", path]):
        result = bnfold(*command)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


# ---- batches ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("external", [False, True])
def test_a_worker_told_to_stop_between_staging_and_its_cleanup_leaves_nothing(tmp_path, external):
    # The pool terminates the other workers when one dies. A signal between staging a model
    # and entering the block that would discard it (or inside mkstemp) once left a hidden
    # `.a.folded.onnx.*.tmp` behind; the worker's handler removes every staged file itself.
    script = (
        "import os, signal, onnx\n"
        "from pathlib import Path\n"
        "from bnfold import batch\n"
        "from bnfold.io.output import StagedModel\n"
        "batch._exit_on_terminate(os.getppid())\n"
        f"staged = StagedModel(onnx.load({str(SAMPLE)!r}), Path({str(tmp_path / 'a.folded.onnx')!r}), "
        f"external={external})\n"
        "assert any(p.name.endswith('.tmp') for p in Path(staged.dest.parent).iterdir())\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 128 + 15, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_worker_that_dies_costs_only_its_own_model(tmp_path):
    # With --jobs 2 the worker folding b.onnx is killed (as the OOM killer would); a and c are
    # still written, each model gets its line, and b's is exit 3.
    for name in ("a", "b", "c"):
        shutil.copy(SAMPLE, tmp_path / f"{name}.onnx")
    # Workers are fresh interpreters (spawn), so the kill is installed in every process of the
    # run, workers included, by a sitecustomize module on PYTHONPATH.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal\nimport bnfold.batch as b\nreal = b.optimize\n"
        "def dying(path, *a, **k):\n"
        "    if path.name == 'b.onnx': os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(path, *a, **k)\n"
        "b.optimize = dying\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "bnfold", "optimize", str(tmp_path), "-o", str(tmp_path / "out"), "--jobs", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 3, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.folded.onnx", "c.folded.onnx"]
    assert "FAIL  " + str(tmp_path / "b.onnx") + ": its worker process died" in result.stderr
    assert "3 models: 2 written, 1 failed" in result.stderr


def test_a_fifo_or_dangling_link_in_a_folder_gets_its_own_line(tmp_path):
    shutil.copy(SAMPLE, tmp_path / "good.onnx")
    os.mkfifo(tmp_path / "pipe.onnx")
    (tmp_path / "gone.onnx").symlink_to(tmp_path / "nowhere.onnx")
    result = bnfold("optimize", tmp_path, "-o", tmp_path / "out", "--no-verify")
    assert result.returncode == 2
    assert f"FAIL  {tmp_path / 'pipe.onnx'}: " in result.stderr and "not a regular file" in result.stderr
    assert f"FAIL  {tmp_path / 'gone.onnx'}: " in result.stderr and "no such file" in result.stderr
    assert (tmp_path / "out" / "good.folded.onnx").is_file()


def test_each_models_line_appears_as_it_finishes_without_a_terminal(tmp_path):
    for name in ("a", "b"):
        shutil.copy(SAMPLE, tmp_path / f"{name}.onnx")
    flag = tmp_path / "go"
    script = (
        "import sys, time; from pathlib import Path; import bnfold.batch as b; real = b.optimize\n"
        "def waiting(path, *a, **k):\n"
        f"    while path.name == 'b.onnx' and not Path({str(flag)!r}).exists(): time.sleep(0.05)\n"
        "    return real(path, *a, **k)\n"
        "b.optimize = waiting\n"
        "from bnfold.cli import main; sys.argv[0] = 'bnfold'; main()"
    )
    command = [sys.executable, "-c", script, "optimize", str(tmp_path), "-o", str(tmp_path / "out"), "--no-verify"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    first = process.stderr.readline()  # printed while b.onnx is still waiting
    assert first.startswith("ok    ") and "a.onnx" in first
    flag.touch()
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 0 and "b.onnx" in rest


# ---- resources ----------------------------------------------------------------------------------------
def test_a_constant_too_large_to_evaluate_is_refused_before_it_is_computed(tmp_path):
    # BN's scale is Add([N,1], [1,N]) reduced back: a 130 kB model whose constant would be N².
    import tracemalloc

    import numpy as np
    from builders import conv_bn_model
    from onnx import helper, numpy_helper

    import bnfold

    n = 16384
    model = conv_bn_model()
    bn = next(x for x in model.graph.node if x.op_type == "BatchNormalization")
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.ones((n, 1), np.float32), "column"),
            numpy_helper.from_array(np.ones((1, n), np.float32), "row"),
        ]
    )
    model.graph.node.insert(0, helper.make_node("Add", ["column", "row"], ["square"]))
    model.graph.node.insert(1, helper.make_node("Slice", ["square", "zero", "six"], ["scale_sliced"]))
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([6], np.int64), "six"),
        ]
    )
    bn.input[1] = "scale_sliced"
    tracemalloc.start()
    result = bnfold.fold(model, check=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    (outcome,) = result.report.batch_norms
    assert not outcome.folded and f"would be a constant of {n * n} elements" in outcome.reason
    assert peak < 50e6  # the square (1 GiB) was never allocated


def test_the_input_cap_bounds_all_inputs_of_a_trial_together(tmp_path):
    # Three float32 inputs of 400 MB each: each alone is under 1 GiB, together they are not.
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [100, 1000, 1000]) for n in "abc"]
    nodes = [helper.make_node("Sum", ["a", "b", "c"], ["y"])]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [100, 1000, 1000])
    model = make_model(helper.make_graph(nodes, "big", inputs, [y]), opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "big.onnx"
    onnx.save(model, str(path))
    one_line_error(bnfold("verify", path, path), "one trial's inputs together need more than 1 GiB")


def test_fresh_names_from_one_base_are_the_first_free_ones():
    from bnfold.graph.tensors import Names

    names = Names(["W_bnfold", "W_bnfold_2", "B"])
    assert [names.fresh("W_bnfold") for _ in range(3)] == ["W_bnfold_1", "W_bnfold_3", "W_bnfold_4"]
    assert names.fresh("B") == "B_1" and names.fresh("new") == "new"
