"""The margins docs/verification.md quotes, measured on the sample models: how far a correct fold
moves each tensor verification compares (its needed atol, in units of the tensor's scale S), and
how far the seeded mistakes of tests/test_verify.py move them.

    python bench/sample_margins.py

Per sample: the correct fold's largest needed atol over the outputs and the fold sites; one
channel of one folded bias 3% off (float32 samples); for the `*_fp16io` samples, β dropped and
the scale on the wrong weight axis (where a conv has as many inputs as outputs); for resnet_tiny,
ε 1e-3 for 1e-5 at its first fold site and at the output. A mistake's figure is the largest
needed atol it causes: what verification sees of it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_verify import mutate, one_bias_off  # noqa: E402

import bnfold  # noqa: E402
from bnfold.verification.verify import verify  # noqa: E402

SAMPLES = ROOT / "sample_models"


def needed(original: Path, candidate: onnx.ModelProto, folder: Path) -> tuple[float, float]:
    """(largest needed atol over the outputs, over the fold sites), in units of S."""
    path = folder / "candidate.onnx"
    onnx.save(candidate, str(path))
    report = verify(original, path)
    worst = [max((o.needed_atol or 0.0 for o in tensors), default=0.0) for tensors in (report.outputs, report.sites)]
    return worst[0], worst[1]


def folded_with(original: Path, mistake: str | None) -> onnx.ModelProto:
    with pytest.MonkeyPatch.context() as patch:
        if mistake and mistake != "one channel's bias 3% off":
            mutate(patch, mistake)
        model = bnfold.fold(original).model
    if mistake == "one channel's bias 3% off":
        try:
            one_bias_off(model)
        except StopIteration:  # no folded bias to move (nothing folded)
            pass
    return model


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for original in sorted(SAMPLES.glob("*.onnx")):
            name = original.stem
            mistakes = [None]
            if name.endswith("_fp16io"):
                mistakes += ["beta dropped", "scale on the wrong axis"]
            elif not name.endswith("_fp16"):
                mistakes += ["one channel's bias 3% off"]
            if name == "resnet_tiny":
                mistakes += ["epsilon 1e-3 for 1e-5"]
            for mistake in mistakes:
                model = folded_with(original, mistake)
                if mistake and model.SerializeToString() == bnfold.fold(original).model.SerializeToString():
                    continue  # the mistake changes nothing here (no square conv, no folded bias)
                outputs, sites = needed(original, model, Path(folder))
                rows.append((name, mistake or "correct fold", outputs, sites))
                print(f"{name:30} {mistake or 'correct fold':28} outputs {outputs:.2e}  sites {sites:.2e}", flush=True)
    print()
    for kind, pick in (("float32", lambda n: "_fp16" not in n), ("float16 io", lambda n: n.endswith("_fp16io"))):
        for what in ("correct fold", "one channel's bias 3% off", "beta dropped", "scale on the wrong axis"):
            figures = [max(o, s) for n, m, o, s in rows if m == what and pick(n)]
            if figures:
                print(f"{kind:10} {what:28} {len(figures):2} samples: {min(figures):.2e} to {max(figures):.2e} · S")


if __name__ == "__main__":
    main()
