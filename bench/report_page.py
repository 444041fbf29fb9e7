"""The `--report FILE.html` page, looked at in a headless browser: not only parsed, rendered.

    python bench/report_page.py OUT_DIR [--chromium /usr/bin/chromium]

For three cases it runs the `bnfold` command, then has Chromium (Debian's `chromium` package;
headless, no network) render each page to a PNG in OUT_DIR:
- `folded`: `optimize --report` of a float32 sample (every site under the policy's atol);
- `fp16`: `optimize --report` of a float16 sample (sites judged at float16's resolution);
- `mistake`: `verify --report` of that float16 sample against its fold with one channel of a
  middle conv's weights ×1.05 (one red site above the allowance, the rule that failed it).
Printed per case: the exit code, the page's size and the screenshot's path. Look at the PNGs:
what BENCHMARKS.md ("The HTML report") says of them was read off them.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
CHROMIUM_FLAGS = [  # what this machine's closed network needs (no background connections)
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def bnfold(*args) -> int:
    return subprocess.run([sys.executable, "-m", "bnfold", *map(str, args), "-q"], check=False).returncode


def mistaken(folded: Path, into: Path) -> None:
    """`folded` with one output channel of its middle Conv's weight ×1.05."""
    model = onnx.load(str(folded))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    weight = convs[len(convs) // 2].input[1]
    tensor = next(t for t in model.graph.initializer if t.name == weight)
    array = numpy_helper.to_array(tensor).copy()
    array[0] *= 1.05
    tensor.CopyFrom(numpy_helper.from_array(array, weight))
    onnx.save(model, str(into))


def screenshot(chromium: str, page: Path, png: Path, profile: Path) -> None:
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1200,1400"]
    subprocess.run([*command, f"--screenshot={png}", page.as_uri()], check=True, capture_output=True, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        fp16 = SAMPLES / "efficientnet_tiny_fp16io.onnx"
        cases = {
            "folded": ("optimize", SAMPLES / "mobilenet_tiny.onnx", "-o", work / "m.onnx"),
            "fp16": ("optimize", fp16, "-o", work / "e.onnx"),
        }
        codes = {name: bnfold(*command, "--report", args.out / f"{name}.html") for name, command in cases.items()}
        mistaken(work / "e.onnx", work / "e_wrong.onnx")
        codes["mistake"] = bnfold("verify", fp16, work / "e_wrong.onnx", "--report", args.out / "mistake.html")
        for name, code in codes.items():
            page, png = args.out / f"{name}.html", args.out / f"{name}.png"
            screenshot(args.chromium, page, png, work / "profile")
            print(f"{name:8} exit {code}  page {page.stat().st_size / 1e3:.1f} kB  screenshot {png}")


if __name__ == "__main__":
    main()
