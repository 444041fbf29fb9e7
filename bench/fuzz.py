"""Fuzz the `bnfold` commands with mutated sample models, each run in its own process.

    python bench/fuzz.py [--cases N] [--seed S] [--jobs J]

Every case mutates one sample model (bnfold.testing.mutate: bit flips, truncation, inserted,
deleted and swapped bytes) and runs the real CLI on it, one of these ways in turn:
- `optimize` (human output), and `optimize --json`;
- `optimize --calibration` with random arrays, half of them of a wrong shape;
- `verify m m --save-inputs DIR --json`;
- `inspect --json`;
- `optimize FOLDER --jobs 2 --json`, the folder holding the mutated model and an intact one.

And the stored formats, each a mutated copy of a valid file read with the intact resnet_tiny
sample (`STORED`): `--inputs` as an .npz, as Polygraphy's JSON and as an onnx test-data folder
whose `input_0.pb` is mutated; `--load-outputs` as an .npz and as Polygraphy's JSON; and
`--custom-lib` with a mutated shared library (onnxruntime's own `libonnxruntime_providers_shared`).

Exit 0, 2 (not a usable model, or bad data) and 1 (a valid model whose fold verification found
not equivalent, e.g. a float16 model whose own arithmetic overflows after a flipped exponent
bit) are verdicts; a batch says the most severe of its models'.

A case is a finding when:
- the exit code is anything else, or a traceback is printed;
- with `--json`, stdout is not one JSON report whose `exit_code` is the exit code;
- a failed run leaves any file behind, or a successful run leaves anything but its outputs.

The script prints the exit-code counts per way and every finding, with the seed and case
number to reproduce it.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the builders tests share
from builders import mutate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INTACT = ROOT / "sample_models" / "resnet_tiny.onnx"
MODEL_WAYS = ("optimize", "optimize --json", "calibration", "verify --save-inputs", "inspect --json", "batch --jobs 2")
POLYGRAPHY = ROOT / "tests" / "data" / "polygraphy"
# way → (the valid file whose mutated copy it reads, under which name in the case's folder)
STORED = {
    "--inputs npz": (ROOT / "sample_models" / "resnet_tiny.npz", "in.npz"),
    "--inputs json": (POLYGRAPHY / "inputs.json", "in.json"),
    "--inputs test data": (None, "data/test_data_set_0/input_0.pb"),  # made by main()
    "--load-outputs npz": (ROOT / "sample_models" / "resnet_tiny.npz", "out.npz"),
    "--load-outputs json": (POLYGRAPHY / "outputs.json", "out.json"),
    "--custom-lib": (None, "lib.so"),  # made by main()
}
WAYS = (*MODEL_WAYS, *STORED)


def run_case(way: str, data: bytes, seed: int) -> tuple[int, str, list[str], str | None]:
    """(exit code, stderr, files left in the case's folder, what is wrong with its JSON)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "m.onnx"
        if way in STORED:
            shutil.copy(INTACT, path)
            stored = folder / STORED[way][1]
            stored.parent.mkdir(parents=True, exist_ok=True)
            stored.write_bytes(data)
            command, outputs = _stored_command(way, path, stored), []
        else:
            path.write_bytes(data)
            command, outputs = _command(way, folder, path, seed)
        result = subprocess.run([sys.executable, "-m", "bnfold", *command], capture_output=True, text=True, timeout=300)
        left = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
        json_problem = _json_problem(result) if "--json" in command else None
        expected = _expected(way, result.returncode, outputs, left)
        return result.returncode, result.stderr, left + ["(unexpected)"] if left != expected else left, json_problem


def _command(way: str, folder: Path, path: Path, seed: int) -> tuple[list[str], list[str]]:
    """The command line, and the outputs a success may leave."""
    if way == "optimize":
        return ["optimize", str(path), "--trials", "1"], ["m.folded.onnx"]
    if way == "optimize --json":
        return ["optimize", str(path), "--trials", "1", "--json"], ["m.folded.onnx"]
    if way == "calibration":
        _calibration_data(path, folder / "calib.npz", np.random.default_rng(seed))
        return ["optimize", str(path), "--trials", "1", "--calibration", str(folder / "calib.npz")], ["m.folded.onnx"]
    if way == "verify --save-inputs":
        return ["verify", str(path), str(path), "--trials", "1", "--save-inputs", str(folder / "saved"), "--json"], []
    if way == "inspect --json":
        return ["inspect", str(path), "--json"], []
    batch = folder / "batch"
    batch.mkdir()
    path.rename(batch / "m.onnx")
    shutil.copy(INTACT, batch / "intact.onnx")
    return ["optimize", str(batch), "-o", str(folder / "out"), "--jobs", "2", "--trials", "1", "--json"], []


def _stored_command(way: str, model: Path, stored: Path) -> list[str]:
    if way.startswith("--inputs"):
        given = stored.parents[1] if way == "--inputs test data" else stored
        return ["verify", str(model), str(model), "--inputs", str(given), "--json"]
    if way == "--load-outputs npz":
        return ["verify", str(model), "--load-outputs", str(stored), "--json"]
    if way == "--load-outputs json":
        return [
            "verify",
            str(model),
            "--load-outputs",
            str(stored),
            "--inputs",
            str(POLYGRAPHY / "inputs.json"),
            "--json",
        ]
    return ["verify", str(model), str(model), "--trials", "1", "--custom-lib", str(stored), "--json"]


def _calibration_data(model: Path, target: Path, rng: np.random.Generator) -> None:
    """Random arrays for the model's inputs, by declared shape (symbols at 8); half the time
    one axis is one larger than declared."""
    arrays = {}
    try:
        inputs = onnx.load(str(model), load_external_data=False).graph.input
    except Exception:
        inputs = []
    for value in inputs:
        dims = [d.dim_value if d.dim_value > 0 else 8 for d in value.type.tensor_type.shape.dim]
        if dims and rng.random() < 0.5:
            dims[rng.integers(len(dims))] += 1
        arrays[value.name] = rng.standard_normal(dims).astype(np.float32)
    np.savez(target, **arrays)


def _expected(way: str, code: int, outputs: list[str], left: list[str]) -> list[str]:
    """The files a run may leave: the inputs always, the outputs only on success."""
    given = {"calibration": ["calib.npz"], "batch --jobs 2": ["batch", "batch/intact.onnx", "batch/m.onnx"]}
    if way in STORED:
        name = STORED[way][1]
        given[way] = [name] + [str(Path(*Path(name).parts[:i])) for i in range(1, len(Path(name).parts))]
    files = ["m.onnx"] if way != "batch --jobs 2" else []
    files += given.get(way, [])
    if code == 0:
        files += outputs
    if way == "verify --save-inputs" and code in (0, 1):  # what was run, whatever the verdict
        files += [f for f in left if f == "saved" or f.startswith("saved/")]
    if way == "batch --jobs 2" and "out" in left:  # each model's output, as its own verdict says
        files += [f for f in left if f == "out" or f in ("out/intact.folded.onnx", "out/m.folded.onnx")]
    return sorted(files)


def _json_problem(result: subprocess.CompletedProcess) -> str | None:
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        return "stdout is not one JSON document"
    if report.get("exit_code") != result.returncode:
        return f"the report says exit {report.get('exit_code')}, the run exited {result.returncode}"
    return None


def is_finding(way: str, code: int, stderr: str, left: list[str], json_problem: str | None) -> bool:
    return code not in (0, 1, 2) or "Traceback" in stderr or "(unexpected)" in left or json_problem is not None


def _test_data_input() -> bytes:
    """A valid onnx test-data input for the intact sample, as `verify --save-inputs` writes it."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "bnfold", "verify", str(INTACT), str(INTACT), "--trials", "1",
                        "--save-inputs", f"{tmp}/saved", "-q"], check=True)  # fmt: skip
        return (Path(tmp) / "saved" / "test_data_set_0" / "input_0.pb").read_bytes()


def _a_shared_library() -> bytes:
    import onnxruntime

    return next(Path(onnxruntime.__file__).parent.glob("capi/libonnxruntime_providers_shared*.so")).read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    samples = sorted((ROOT / "sample_models").glob("*.onnx"))
    originals = [p.read_bytes() for p in samples]
    stored = {way: path.read_bytes() for way, (path, _) in STORED.items() if path is not None}
    stored["--inputs test data"] = _test_data_input()
    stored["--custom-lib"] = _a_shared_library()
    rng = np.random.default_rng(args.seed)
    cases = []
    for k in range(args.cases):
        way = WAYS[k % len(WAYS)]
        if way in STORED:
            cases.append((k, way, STORED[way][1], mutate(stored[way], rng)))
        else:
            cases.append((k, way, samples[k % len(samples)].stem, mutate(originals[k % len(samples)], rng)))
    counts: dict[str, collections.Counter] = {way: collections.Counter() for way in WAYS}
    findings = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = pool.map(lambda c: run_case(c[1], c[3], args.seed * 100_000 + c[0]), cases)
        for (k, way, name, _), (code, stderr, left, json_problem) in zip(cases, results):
            counts[way][code] += 1
            if is_finding(way, code, stderr, left, json_problem):
                findings.append((k, way, name, code, stderr.strip().splitlines()[-1:], left, json_problem))
    print(f"{args.cases} cases (seed {args.seed}); {len(findings)} findings")
    for way, counter in counts.items():
        print(f"  {way}: exit codes {dict(sorted(counter.items()))}")
    for case, way, kind, code, what, left, json_problem in findings:
        print(f"  case {case} ({way}, {kind}): exit {code}, {what}, left {left}, json: {json_problem}")


if __name__ == "__main__":
    main()
