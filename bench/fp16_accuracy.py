"""How far folded float16 models move from their float32 networks: bias correction on and off,
with calibration data, onnxruntime's own float16 Conv+BN fusion, and folding before conversion.

    python bench/fp16_accuracy.py [--realizations R] [--inputs N] [--big FOLDER]

Needs onnxconverter-common (a sample-regeneration dependency, not bnfold's).

A float16 model is one draw of rounding errors: the fold adds its own, independent of them, so
the ratio for one model scatters widely around its mean (0.93 to 1.47 over 12 draws of one
ResNet with plain rounding). Each network is therefore converted R times (`keep_io_types=True`):
draw 0 from the float32 network as it is, draw r from that network with every float weight moved
by a uniform ±½ float16 ulp (a new float32 network with its own float16 twin, its own reference).

Per draw: the mean relative RMS deviation from the float32 network over N inputs of the folded
model, divided by the unfolded float16 model's. Two ways of computing a float16 model:
- cpu: onnxruntime on this machine runs float16 Conv and BN in float32 between float16 weights
  (the float16 model and its float32-widened twin agree exactly), so only parameters round;
- fp16 storage: every tensor between ops rounded to float16, as a GPU stores it (the widened
  model with a Cast pair after each op), so a fold also saves the BN's own output rounding.
Variants: bnfold with --no-bias-correction (sum-preserving rounding), bnfold (statistics from the
graph), bnfold --calibration (statistics measured on 8 other input batches), onnxruntime's own
Conv+BN fusion, and bnfold on the float32 network before the conversion.
Reported: mean ± standard deviation over the draws, and in how many draws the ratio was ≤ 1.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxconverter_common import float16

import bnfold
from bnfold.testing import run
from bnfold.verification.precision import widen_floats

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ("resnet_tiny", "mobilenet_tiny", "efficientnet_tiny", "inception_tiny", "repvit_tiny", "fastvit_tiny")
VARIANTS = ("no correction", "bias correction", "calibrated", "onnxruntime fusion", "folded before conversion")


def relative_rms(got: np.ndarray, want: np.ndarray) -> float:
    got, want = got.astype(np.float64), want.astype(np.float64)
    return float(np.sqrt(((got - want) ** 2).mean() / (want**2).mean()))


def draw(network: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """The float32 network with each float weight moved by a uniform ±½ float16 ulp (seed 0: as is)."""
    moved = onnx.ModelProto()
    moved.CopyFrom(network)
    if seed == 0:
        return moved
    rng = np.random.default_rng([11, seed])
    for tensor in moved.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if values.dtype == np.float32 and values.size > 1:
            ulp = np.spacing(np.abs(values).astype(np.float16)).astype(np.float32)
            values = values + (rng.uniform(-0.5, 0.5, values.shape) * ulp).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), tensor.name))
    return moved


def fp16_storage(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` computed as a GPU stores it: float32 inside each op, each float tensor between ops
    rounded to float16 (the widened model with Cast(float16) → Cast(float) after every op)."""
    wide = onnx.shape_inference.infer_shapes(widen_floats(model))
    graph = wide.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    outputs = {o.name for o in graph.output}
    nodes = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type in ("Cast", "Constant", "Shape"):
            continue
        for i, name in enumerate(node.output):
            if types.get(name) == TensorProto.FLOAT and name not in outputs:
                node.output[i] = f"{name}__float32"
                nodes.append(helper.make_node("Cast", [node.output[i]], [f"{name}__float16"], to=TensorProto.FLOAT16))
                nodes.append(helper.make_node("Cast", [f"{name}__float16"], [name], to=TensorProto.FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    return wide


def onnxruntime_fusion(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's own Conv+BN fusion (BASIC level), saved and read back."""
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(folder) / "fused.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def measure(network: onnx.ModelProto, seed: int, shape: tuple, count: int, data: tuple) -> dict[str, dict[str, float]]:
    """{execution: {variant: ratio}} for one draw, on inputs scale·N(0, 1) + offset (`data`: the
    distribution the network's BN statistics were calibrated on)."""
    reference = draw(network, seed)
    unfolded = float16.convert_float_to_float16(reference, keep_io_types=True)
    name = reference.graph.input[0].name

    def inputs(stream: int, k: int) -> np.ndarray:
        return (np.random.default_rng([stream, k]).standard_normal(shape) * data[0] + data[1]).astype(np.float32)

    calibration = [{name: inputs(99, k)} for k in range(8)]  # not the inputs measured below
    models = {
        "unfolded": unfolded,
        "no correction": bnfold.fold(unfolded, bias_correction=False).model,
        "bias correction": bnfold.fold(unfolded, bias_correction=True).model,
        "calibrated": bnfold.fold(unfolded, calibration=calibration).model,
        "onnxruntime fusion": onnxruntime_fusion(unfolded),
        # what a user who still has the float32 model gets: one rounding instead of two
        "folded before conversion": float16.convert_float_to_float16(bnfold.fold(reference).model, keep_io_types=True),
    }
    executions = {"cpu": models, "fp16 storage": {k: fp16_storage(m) for k, m in models.items()}}
    deviations = {e: {k: [] for k in models} for e in executions}
    for trial in range(count):
        x = inputs(7, trial)
        (want,) = run(reference, {name: x})
        for execution, variants in executions.items():
            for variant, model in variants.items():
                deviations[execution][variant].append(relative_rms(run(model, {name: x})[0], want))
    return {e: {v: float(np.mean(d[v]) / np.mean(d["unfolded"])) for v in VARIANTS} for e, d in deviations.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--realizations", type=int, default=8, help="float16 draws per network")
    parser.add_argument("--inputs", type=int, default=16, help="inputs per draw")
    parser.add_argument("--big", type=Path, help="the folder bench/fp16_verify.py --folder wrote")
    args = parser.parse_args()
    # make_samples.py calibrates on 1.5·N(0, 1) + 0.3 images, fp16_verify.py on N(0, 1)
    cases = [(ROOT / "sample_models" / f"{n}.onnx", None, args.realizations, (1.5, 0.3)) for n in SAMPLES]
    if args.big:
        draws = max(2, args.realizations // 2)
        cases += [(args.big / f"{n}.onnx", (1, 3, 224, 224), draws, (1.0, 0.0)) for n in ("mobilenet_v2", "resnet50")]
    print(f"| network | draws | computed | {' | '.join(VARIANTS)} |")
    print("|---|---|---|" + "---|" * len(VARIANTS))
    for path, shape, draws, data in cases:
        network = onnx.load(str(path))
        dims = network.graph.input[0].type.tensor_type.shape.dim
        shape = shape or tuple(d.dim_value or 8 for d in dims)  # a symbolic batch: 8
        ratios = [measure(network, seed, shape, args.inputs, data) for seed in range(draws)]
        for execution in ratios[0]:
            cells = []
            for variant in VARIANTS:
                values = np.array([r[execution][variant] for r in ratios])
                cells.append(f"{values.mean():.3f} ± {values.std():.3f} ({(values <= 1).sum()}/{draws} ≤ 1)")
            print(f"| {path.stem} | {draws} | {execution} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
