"""Fold and verify a model over 2 GiB (protobuf's limit for one ONNX file).

    python bench/large.py [--side 17000] [--folder DIR]

Builds x → Gemm → BatchNormalization → Gemm → BatchNormalization with two float32 weights of
side × side (17000: 2 × 1.16 GB), saved with external data (the only way past 2 GiB), then
runs `bnfold optimize` on it, without and with verification, each in a child process, and
prints wall time, peak memory, the verification verdict and the files it wrote. Needs about 4×
the model size in free memory and 2× on disk.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(side: int, path: Path) -> None:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(2):
        weight = rng.standard_normal((side, side), dtype=np.float32) * np.float32(1 / np.sqrt(side))  # stays float32
        inits.append(numpy_helper.from_array(weight, f"W{i}"))
        for key, values in (
            ("gamma", rng.uniform(0.5, 1.5, side)),
            ("beta", rng.normal(0, 0.5, side)),
            ("mean", rng.normal(0, 0.5, side)),
            ("var", rng.uniform(0.3, 2, side)),
        ):
            inits.append(numpy_helper.from_array(values.astype(np.float32), f"{key}{i}"))
        nodes += [
            helper.make_node("Gemm", [x, f"W{i}"], [f"g{i}"], name=f"gemm{i}"),
            helper.make_node(
                "BatchNormalization",
                [f"g{i}", f"gamma{i}", f"beta{i}", f"mean{i}", f"var{i}"],
                [f"y{i}"],
                name=f"bn{i}",
            ),
        ]
        x = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, side])],
    )
    for tensor in inits:  # built in place: protobuf cannot copy a tensor into a tree past 2 GiB
        target = graph.initializer.add()
        target.name, target.data_type = tensor.name, tensor.data_type
        target.dims.extend(tensor.dims)
        target.raw_data = tensor.raw_data
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")


def measured(command: list[str]) -> tuple[float, float, int, str]:
    """Wall seconds, peak resident GB, exit code and stdout of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss / 1e6, process.returncode, stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=17000)
    parser.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        path = Path(tmp) / "large.onnx"
        start = time.perf_counter()
        # Built in a child: Linux carries a parent's peak memory into a forked child's
        # ru_maxrss, so this process must stay small for the measurement below to be bnfold's.
        builder = multiprocessing.get_context("spawn").Process(target=build, args=(args.side, path))
        builder.start()
        builder.join()
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        print(f"built {path.name}: {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s")
        wall, peak, _, _ = measured([sys.executable, "-m", "bnfold", "optimize", str(path), "--no-verify", "-q"])
        print(f"bnfold optimize --no-verify: {wall:.0f} s, peak {peak:.1f} GB")
        wall, peak, code, stdout = measured(
            [sys.executable, "-m", "bnfold", "optimize", str(path), "--json", "--trials", "1"]
        )
        print(f"bnfold optimize (verified): exit {code}, {wall:.0f} s, peak {peak:.1f} GB")
        if code != 0:
            return
        result = subprocess.CompletedProcess([], code, stdout)
        report = json.loads(result.stdout)
        outputs = report["verification"]["outputs"]
        print(
            f"folded {report['summary']['folded']} of {report['summary']['batch_normalization_nodes']}; "
            f"equivalent: {report['verification']['equivalent']}; "
            + ", ".join(f"{o['name']} needed atol {o['needed_atol']:.1e}" for o in outputs)
        )
        for p in sorted(Path(tmp).iterdir()):
            print(f"  {p.name}: {p.stat().st_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
