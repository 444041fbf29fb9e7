"""Does `bnfold optimize` pass correct folds of float16 ImageNet-size CNNs, and fail wrong ones?

    pip install torch==2.13.0 onnxconverter-common
    python bench/fp16_verify.py [--folder DIR]

Builds MobileNetV2 (depthwise) and ResNet-50 at ImageNet size (224×224, 1000 classes) with
random weights and BN statistics calibrated on data, exports them with BN kept, converts them
to float16 the way GPU deployments do (onnxconverter-common, keep_io_types=True: float16 inside,
float32 inputs and outputs), and runs `bnfold optimize` on each: once as is (must pass) and once
with each seeded folding mistake (must fail). It prints the verdict, the precision the policy
used, and how far the folded model moves from the unfolded one against the float16 model's own
distance from the float32 network.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

MISTAKES = {
    "β dropped": "monkeypatch_beta",
    "wrong axis": "monkeypatch_axis",
}
_MISTAKE_RUNNER = """
import sys
import numpy as np
import bnfold.folding.affine as affine
from bnfold.cli import main
mistake = sys.argv.pop(1)
if mistake == "monkeypatch_beta":
    original = affine.fold_scale_shift
    affine.fold_scale_shift = lambda g, b, m, v, e: original(g, 0 * b, m, v, e)
elif mistake == "monkeypatch_axis":
    original = affine.scale_weights
    def wrong_axis(weight, scale, axis=0, group=1, dtype=np.float64):
        if weight.ndim == 4 and weight.shape[1] == scale.shape[0] and weight.shape[0] != scale.shape[0]:
            return original(weight, scale, axis=1, group=1, dtype=dtype)
        return original(weight, scale[::-1].copy(), axis=axis, group=group, dtype=dtype)
    affine.scale_weights = wrong_axis
sys.argv[0] = "bnfold"
main()
"""


def networks():
    import torch
    from torch import nn

    def conv_bn(cin, cout, k, stride=1, groups=1, act=nn.ReLU6):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, *([act()] if act else []))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            layers = [conv_bn(cin, hidden, 1)] if expand != 1 else []
            layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, act=None)]
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            config = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2)]
            config += [(6, 320, 1, 1)]
            layers, cin = [conv_bn(3, 32, 3, 2)], 32
            for t, c, n, s in config:
                for i in range(n):
                    layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers.append(conv_bn(cin, 1280, 1))
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(1280, 1000)

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(
                conv_bn(cin, width, 1, act=nn.ReLU),
                conv_bn(width, width, 3, stride, act=nn.ReLU),
                conv_bn(width, cout, 1, act=None),
            )
            self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

        def forward(self, x):
            return torch.relu(self.body(x) + self.shortcut(x))

    class ResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            layers, cin = [conv_bn(3, 64, 7, 2, act=nn.ReLU), nn.MaxPool2d(3, 2, 1)], 64
            for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
                for i in range(blocks):
                    layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
                    cin = width * 4
            self.features = nn.Sequential(*layers)
            self.fc = nn.Linear(2048, 1000)

        def forward(self, x):
            return self.fc(self.features(x).mean((2, 3)))

    return {"mobilenet_v2": MobileNetV2, "resnet50": ResNet50}


def build(name: str, make, folder: Path) -> tuple[Path, Path, np.ndarray]:
    """(float32 model, float16 model with float32 I/O, a reference input)."""
    import torch
    from onnxconverter_common import float16

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    net = make()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
                m.momentum = None
                m.reset_running_stats()
        net.train()
        for _ in range(4):
            net(torch.randn(8, 3, 224, 224, generator=gen))
    net.eval()
    example = torch.randn(1, 3, 224, 224, generator=gen)
    fp32 = folder / f"{name}.onnx"
    torch.onnx.export(net, (example,), str(fp32), dynamo=False, do_constant_folding=False, opset_version=17,
                      input_names=["input"], output_names=["output"])  # fmt: skip
    half = float16.convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    fp16 = folder / f"{name}_fp16.onnx"
    onnx.save(half, str(fp16))
    return fp32, fp16, example.numpy()


def optimize(model: Path, out: Path, mistake: str | None = None) -> dict:
    command = [sys.executable, "-c", _MISTAKE_RUNNER, mistake or "none", "optimize", str(model), "-o", str(out)]
    run = subprocess.run([*command, "--json", "-q"], capture_output=True, text=True)
    report = json.loads(run.stdout) if run.stdout.strip() else {}
    report["exit_code"] = run.returncode
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="Keep the models here (default: a temporary folder).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.folder or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        print("| network | fold | exit | output |")
        print("|---|---|---|---|")
        for name, make in networks().items():
            fp32, fp16, example = build(name, make, folder)
            for mistake in (None, *MISTAKES):
                report = optimize(fp16, folder / f"{name}_fp16.folded.onnx", MISTAKES.get(mistake))
                verification = report.get("verification") or {}
                outputs = verification.get("outputs", [])
                detail = "; ".join(
                    f"needed atol {o['needed_atol']:.2e}, {o['precision']} atol {o['atol']:.0e}, "
                    f"noise {o['noise'] or 0:.2e}"
                    for o in outputs
                )
                print(f"| {name} | {mistake or 'correct fold'} | {report['exit_code']} | {detail} |")


if __name__ == "__main__":
    main()
