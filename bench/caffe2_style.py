"""Caffe2-style affine maps against onnxruntime's basic level (issue 34).

Caffe2 exports (onnx's own DenseNet-121 and Inception-v2 test models) write each BN as `Mul`
and `Add` by `[C]` constants made `[C, 1, 1]` by `Unsqueeze` with an `axes` attribute (opset < 13).
Those test models are downloaded from a model store, not a package registry, so this rewrites
networks of the same families that way: every 4-D BatchNormalization of MODEL becomes
Unsqueeze → Mul, Unsqueeze → Add at opset 11. It then counts the
Mul/Add pairs that bnfold leaves, and those that onnxruntime's basic level leaves
(`optimized_model_filepath`), and verifies bnfold's fold against the Caffe2-style model.

    python bench/caffe2_style.py MODEL.onnx [...]

MODEL: an export that keeps its BatchNormalization nodes (bench/timm_zoo.py --export writes
DenseNet-121 and Inception-v3 among others).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

import bnfold

MUL, ADD = "caffe2_mul", "caffe2_add"  # the names the rewritten pairs carry


def caffe2_style(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The model at opset 11 with every BN over (N, C, H, W) written as Caffe2 writes it, and how
    many were rewritten: Mul/Add by [C, 1, 1] constants, each then made Unsqueeze(axes=[1, 2])
    of a [C] one at opset 11 (onnx's version converter has no adapter down from Mul-14 or
    BatchNormalization-15; Unsqueeze reads `axes` as an attribute up to opset 12)."""
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in shape_inference.infer_shapes(model).graph.value_info
        if v.type.tensor_type.HasField("shape")
    }
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    nodes, count = [], 0
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or ranks.get(node.input[0]) != 4:
            nodes.append(node)
            continue
        count += 1
        gamma, beta, mean, var = (values[n] for n in node.input[1:5])
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + epsilon)
        name = node.name or node.output[0]
        for suffix, value in (("scale", scale), ("shift", beta - mean * scale)):
            array = value.astype(np.float32).reshape(-1, 1, 1)
            model.graph.initializer.append(numpy_helper.from_array(array, f"{name}/{suffix}3"))
        nodes += [
            helper.make_node("Mul", [node.input[0], f"{name}/scale3"], [f"{name}/scaled"], name=f"{name}/{MUL}"),
            helper.make_node("Add", [f"{name}/scaled", f"{name}/shift3"], [node.output[0]], name=f"{name}/{ADD}"),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {n for node in model.graph.node for n in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.opset_import[0].version = 11  # every op these networks use reads the same at 11 (the checker checks)
    constants = {t.name: t for t in model.graph.initializer}
    unsqueezes = []
    for node in model.graph.node:
        if node.name.endswith((MUL, ADD)):
            tensor = constants[node.input[1]]
            flat = numpy_helper.to_array(tensor).reshape(-1)
            tensor.CopyFrom(numpy_helper.from_array(flat, tensor.name[: -len("3")]))
            unsqueezes.append(helper.make_node("Unsqueeze", [tensor.name], [node.input[1]], axes=[1, 2]))
    nodes = unsqueezes + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model, count


def pairs_left(model: onnx.ModelProto) -> int:
    return sum(node.name.endswith(MUL) for node in model.graph.node)


def onnxruntime_basic(path: Path, folder: Path) -> onnx.ModelProto:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folder / "basic.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(folder / "basic.onnx"))


def main() -> None:
    print("| model | Caffe2-style pairs | left by bnfold | left by onnxruntime basic | bnfold's fold verified |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for path in map(Path, sys.argv[1:]):
            try:
                model, count = caffe2_style(onnx.load(str(path)))
            except onnx.checker.ValidationError as error:  # an op opset 11 does not have
                print(f"| {path.stem} | not at opset 11: {str(error).splitlines()[0]} | | | |", flush=True)
                continue
            written = folder / "caffe2.onnx"
            onnx.save(model, str(written))
            result = bnfold.fold(written)
            folded = folder / "folded.onnx"
            onnx.save(result.model, str(folded))
            report = bnfold.verify(written, folded)
            basic = onnxruntime_basic(written, folder)
            verdict = "equivalent" if report.equivalent else "NOT equivalent"
            print(
                f"| {path.stem} | {count} | {pairs_left(result.model)} | {pairs_left(basic)} | {verdict} |", flush=True
            )


if __name__ == "__main__":
    main()
