"""What folding buys a quantized model: latency and onnxruntime's integer kernels.

    python bench/quantized.py MODEL.onnx [MODEL.onnx ...]        # float exports whose BN was kept
    python bench/quantized.py --export DIR                       # ResNet-18 and MobileNetV2 (needs torch)

For each float model (BatchNormalization still in it), four variants:
- `quantized`: onnxruntime's quantize_static (QDQ, per-channel int8 weights, uint8 activations,
  random calibration data), BN left in, as a pipeline that quantizes before folding has it;
- `bnfold`: that model folded by bnfold (exact folds only);
- `bnfold --requantize`: folded across the quantizers on the convs' outputs;
- `fold first`: the float model folded, then quantized (the bound: what quantizing a folded
  model gives).
Each is verified where bnfold made it (`--requantize` against the original with the removed
quantizers bypassed). Printed per variant: BN nodes left, onnxruntime's own optimized graph (all
optimizations) counted by QLinearConv / Conv / BatchNormalization, and the median latency of
`--runs` runs on one generated input (onnxruntime CPU, `--threads` intra-op threads), the
variants' runs alternating.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import bnfold
from bnfold.testing import random_inputs


def inputs(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    """random_inputs, a symbolic batch 1 and other symbolic sizes 64 (a detector's multiple of 32)."""
    feeds = random_inputs(model, seed)
    rng = np.random.default_rng(seed)
    return {name: value if value.size else rng.normal(0.3, 1.5, [d or (64 if i else 1) for i, d in
                                                                 enumerate(value.shape)]).astype(value.dtype)
            for name, value in feeds.items()}  # fmt: skip


def quantize(source: Path, target: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(source), load_external_data=False)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([inputs(model, seed) for seed in range(8)])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)  # fmt: skip


def session(path: Path, threads: int, level=None, optimized: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if level is not None:
        options.graph_optimization_level = level
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def kernels(path: Path, folder: Path) -> collections.Counter:
    import onnxruntime as ort

    optimized = folder / (path.stem + ".optimized.onnx")
    session(path, 1, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, optimized)
    return collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)


def variants(model: Path, folder: Path) -> dict[str, Path]:
    made = {"quantized": folder / f"{model.stem}.quantized.onnx"}
    quantize(model, made["quantized"])
    for label, requantize in (("bnfold", False), ("bnfold --requantize", True)):
        path = folder / f"{model.stem}.{label.replace(' --', '.')}.onnx"
        result = bnfold.optimize(made["quantized"], path, requantize=requantize)
        if not result.written:
            print(f"  {label}: NOT written: {result.verification.summary()}", file=sys.stderr)
            continue
        checked = result.verification.summary() if result.verification else "nothing to verify"
        print(f"  {label}: {result.report.summary()}; {checked}", file=sys.stderr)
        made[label] = path
    folded = folder / f"{model.stem}.folded.onnx"
    bnfold.optimize(model, folded)
    made["fold first"] = folder / f"{model.stem}.fold_first.onnx"
    quantize(folded, made["fold first"])
    return made


def latencies(paths: dict[str, Path], runs: int, threads: int) -> dict[str, float]:
    sessions = {label: session(path, threads) for label, path in paths.items()}
    feed = inputs(onnx.load(str(next(iter(paths.values())))), 1)
    times: dict[str, list[float]] = {label: [] for label in paths}
    for i in range(runs + 3):
        for label, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feed)
            if i >= 3:
                times[label].append(time.perf_counter() - start)
    return {label: 1e3 * statistics.median(t) for label, t in times.items()}


def export(folder: Path) -> None:
    """ResNet-18 and MobileNetV2 (torchvision's layouts, random weights, trained-looking BN
    statistics), exported with their BN kept: TorchScript exporter, no constant folding."""
    import torch
    from torch import nn

    def conv_bn(cin, cout, k=3, stride=1, groups=1, relu=True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, *([nn.ReLU6() if relu == 6 else nn.ReLU()] if relu else []))

    class Basic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, relu=False))
            self.skip = conv_bn(cin, cout, 1, stride, relu=False) if stride != 1 or cin != cout else nn.Identity()

        def forward(self, x):
            return torch.relu(self.body(x) + self.skip(x))

    class Inverted(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            mid = cin * expand
            layers = [conv_bn(cin, mid, 1, relu=6)] if expand != 1 else []
            layers += [conv_bn(mid, mid, 3, stride, groups=mid, relu=6), conv_bn(mid, cout, 1, relu=False)]
            self.body, self.residual = nn.Sequential(*layers), stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    def resnet18():
        layers, cin = [conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [Basic(cin, cout, stride), Basic(cout, cout, 1)]
            cin = cout
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000))

    def mobilenet_v2():
        layers, cin = [conv_bn(3, 32, 3, 2, relu=6)], 32
        for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                           (6, 160, 3, 2), (6, 320, 1, 1)):  # fmt: skip
            for i in range(n):
                layers.append(Inverted(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [conv_bn(cin, 1280, 1, relu=6), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 1000)]
        return nn.Sequential(*layers)

    folder.mkdir(parents=True, exist_ok=True)
    for name, net in (("resnet18", resnet18()), ("mobilenet_v2", mobilenet_v2())):
        torch.manual_seed(0)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
        net.eval()
        path = folder / f"{name}.onnx"
        torch.onnx.export(net, torch.randn(1, 3, 224, 224), str(path), dynamo=False, do_constant_folding=False,
                          opset_version=17, input_names=["input"], output_names=["logits"])  # fmt: skip
        bns = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
        print(f"{path}: {bns} BatchNormalization nodes", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--export", type=Path, metavar="DIR", help="export ResNet-18 and MobileNetV2 there")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.export:
        export(args.export)
        return
    np.random.seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for model in args.models:
            print(model.name, file=sys.stderr)
            try:
                paths = variants(model, folder)
            except Exception as error:  # noqa: BLE001 - quantize_static's own failure, shown and skipped
                print(f"  skipped: {type(error).__name__}: {str(error).splitlines()[0][:200]}", file=sys.stderr)
                continue
            times = latencies(paths, args.runs, args.threads)
            print(f"| {model.stem} | variant | BN left | QLinearConv | float Conv | float BN | latency (ms) |")
            for label, path in paths.items():
                ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
                k = kernels(path, folder)
                print(f"| | {label} | {ops['BatchNormalization']} | {k['QLinearConv']} | "
                      f"{k['Conv'] + k['FusedConv']} | {k['BatchNormalization']} | {times[label]:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
