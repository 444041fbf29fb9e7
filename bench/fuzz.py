"""Fuzz `bnfold optimize` with mutated sample models, each run in its own process.

    python bench/fuzz.py [--cases N] [--seed S] [--jobs J]

Every case mutates one sample model (bnfold.testing.mutate: bit flips, truncation, inserted,
deleted and swapped bytes) and runs the real CLI on it. Exit 0 (folded), 2 (not a usable
model) and 1 (a valid model whose fold verification found not equivalent, e.g. a float16 model
whose own arithmetic overflows after a flipped exponent bit) are verdicts. A case is a finding
when the exit code is anything else, a traceback is printed, a failed run leaves any file
behind, or a successful run leaves anything but the folded model. Prints the exit-code counts and every finding, with
the seed and case number to reproduce it.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bnfold.testing import mutate

ROOT = Path(__file__).resolve().parents[1]


def run_case(data: bytes) -> tuple[int, str, list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        path.write_bytes(data)
        command = [sys.executable, "-m", "bnfold", "optimize", str(path), "--trials", "1"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        return result.returncode, result.stderr, sorted(p.name for p in Path(tmp).iterdir())


def is_finding(code: int, stderr: str, left: list[str]) -> bool:
    if code not in (0, 1, 2) or "Traceback" in stderr:
        return True
    return left != (["m.folded.onnx", "m.onnx"] if code == 0 else ["m.onnx"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    samples = sorted((ROOT / "sample_models").glob("*.onnx"))
    originals = [p.read_bytes() for p in samples]
    rng = np.random.default_rng(args.seed)
    cases = [(k, samples[k % len(samples)].stem, mutate(originals[k % len(samples)], rng)) for k in range(args.cases)]
    counts: collections.Counter = collections.Counter()
    findings = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for (k, name, _), (code, stderr, left) in zip(cases, pool.map(lambda c: run_case(c[2]), cases)):
            counts[code] += 1
            if is_finding(code, stderr, left):
                findings.append((k, name, code, stderr.strip().splitlines()[-1:], left))
    print(f"{args.cases} cases (seed {args.seed}): exit codes {dict(sorted(counts.items()))}; {len(findings)} findings")
    for finding in findings:
        case, kind, code, what, left = finding
        print(f"  case {case} ({kind}): exit {code}, {what}, left {left}")


if __name__ == "__main__":
    main()
