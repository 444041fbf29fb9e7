"""Batch throughput: models folded and verified per minute against --jobs.

    python bench/batch.py [--repeats 3] [--models FOLDER]

Runs `bnfold optimize FOLDER -o OUT -q` on a copy of every sample model, or of the models in
FOLDER (each folded and verified) with --jobs 1, 2 and the machine's core count, in fresh
processes, alternating, and prints the median wall time and models per minute. With --jobs N
each worker's onnxruntime sessions get cores/N cores (bnfold.batch), so the workers do not
oversubscribe the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", type=Path, default=ROOT / "sample_models", help="a folder of .onnx models")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    jobs = sorted({1, 2, cores})
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary) / "models"
        folder.mkdir()
        for model in args.models.glob("*.onnx"):
            shutil.copy(model, folder / model.name)
        count = len(list(folder.glob("*.onnx")))
        times = {j: [] for j in jobs}
        for _ in range(args.repeats):
            for j in jobs:
                out = Path(temporary) / f"out{j}"
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                command = [
                    sys.executable,
                    "-m",
                    "bnfold",
                    "optimize",
                    str(folder),
                    "-o",
                    str(out),
                    "-q",
                    "--jobs",
                    str(j),
                ]
                subprocess.run(command, check=True)
                times[j].append(time.perf_counter() - start)
    print(f"{count} models, {cores} cores, median of {args.repeats}\n")
    print("| --jobs | wall time | models per minute |")
    print("|---|---|---|")
    for j in jobs:
        median = statistics.median(times[j])
        print(f"| {j} | {median:.1f} s | {60 * count / median:.0f} |")


if __name__ == "__main__":
    main()
