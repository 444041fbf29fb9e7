"""How far folded float16 models move from their float32 networks, with and without bias correction.

    python bench/fp16_accuracy.py [--big FOLDER]

For each float16 model (onnxconverter-common, keep_io_types=True): the mean relative RMS
deviation from its float32 network of the folded model (sum-preserving rounding, and with
`bias_correction=True`), divided by the unfolded float16 model's. Below 1: folding brought the
model closer to the float32 network. The four `*_fp16io` samples are measured on 64 inputs;
with `--big FOLDER` (as `bench/fp16_verify.py --folder FOLDER` leaves it) MobileNetV2 and
ResNet-50 at 224×224 on 32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx

import bnfold
from bnfold.testing import run

ROOT = Path(__file__).resolve().parents[1]


def relative_rms(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.sqrt(((got.astype(np.float64) - want) ** 2).mean() / (want**2).mean()))


def measure(float32: Path, float16: Path, shape: tuple, count: int) -> dict[str, float]:
    m32, m16 = onnx.load(str(float32)), onnx.load(str(float16))
    models = {
        "unfolded": m16,
        "sum-preserving": bnfold.fold(m16).model,
        "bias correction": bnfold.fold(m16, bias_correction=True).model,
    }
    deviations = {name: [] for name in models}
    for trial in range(count):
        x = np.random.default_rng([7, trial]).standard_normal(shape).astype(np.float32)
        (want,) = run(m32, {"input": x})
        for name, model in models.items():
            deviations[name].append(relative_rms(run(model, {"input": x})[0], want.astype(np.float64)))
    unfolded = np.mean(deviations["unfolded"])
    return {name: float(np.mean(values) / unfolded) for name, values in deviations.items() if name != "unfolded"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", type=Path, help="the folder bench/fp16_verify.py --folder wrote")
    args = parser.parse_args()
    samples = ROOT / "sample_models"
    cases = [
        (samples / f"{n}.onnx", samples / f"{n}_fp16io.onnx", (8, 3, 32, 32), 64)
        for n in ("resnet_tiny", "mobilenet_tiny", "efficientnet_tiny", "inception_tiny")
    ]
    if args.big:
        cases += [
            (args.big / f"{n}.onnx", args.big / f"{n}_fp16.onnx", (1, 3, 224, 224), 32)
            for n in ("mobilenet_v2", "resnet50")
        ]
    print("| network | sum-preserving rounding | + bias correction |")
    print("|---|---|---|")
    for float32, float16, shape, count in cases:
        ratios = measure(float32, float16, shape, count)
        print(f"| {float16.stem} | {ratios['sum-preserving']:.3f} | {ratios['bias correction']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
