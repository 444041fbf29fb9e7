"""What each BN-folding tool leaves behind on the sample models, and whether its result is right.

    pip install onnxoptimizer onnxslim onnxscript   # the peers; not bnfold dependencies
    python bench/peers.py

For each model in sample_models/ and each tool, prints `B/A ok`: B BatchNormalization nodes and
A Mul/Add/Sub/Div nodes left (every model's own residual Adds count too, so compare across a
row), and whether `bnfold.verify` (onnxruntime, graph optimizations off, default tolerances)
finds the result equivalent to the original: `ok`, `NOT EQUIVALENT`, or the tool's error.
Each peer runs in its most favourable documented form:
- onnxruntime: offline optimizer at BASIC level (its Conv+BN, Conv+Add, Conv+Mul fusions).
- onnxoptimizer: its fuse-and-elimination passes (fuse_bn_into_conv, fuse_add_bias_into_conv,
  fuse_matmul_add_bias_into_gemm, …).
- onnxslim: `onnxslim.slim(model)` with its defaults.
- onnxscript: `optimizer.optimize` (constant folding), then the rewriter with its default rules
  plus its BatchNormalization and conv-affine fusion rules.
A tool that is not installed is skipped.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

import bnfold

ROOT = Path(__file__).resolve().parents[1]
AFFINE_OPS = ("Mul", "Add", "Sub", "Div")


def run_bnfold(model: onnx.ModelProto) -> onnx.ModelProto:
    return bnfold.fold(model).model


def run_onnxruntime(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = f"{tmp}/optimized.onnx"
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def run_onnxoptimizer(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxoptimizer

    return onnxoptimizer.optimize(model, onnxoptimizer.get_fuse_and_elimination_passes())


def run_onnxslim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def run_onnxscript(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxscript.optimizer
    import onnxscript.rewriter
    from onnxscript.rewriter.rules.common import _fuse_batchnorm, _fuse_conv_affine

    optimized = onnxscript.optimizer.optimize(model)
    rules = (
        [*onnxscript.rewriter.rules.common.default_rules]
        if hasattr(onnxscript.rewriter.rules.common, "default_rules")
        else []
    )
    for module in (_fuse_batchnorm, _fuse_conv_affine):
        rules += [getattr(module, name) for name in dir(module) if name.endswith("_rule")]
    return onnxscript.rewriter.rewrite(optimized, pattern_rewrite_rules=rules)


TOOLS = {
    "bnfold": run_bnfold,
    "onnxruntime": run_onnxruntime,
    "onnxoptimizer": run_onnxoptimizer,
    "onnxslim": run_onnxslim,
    "onnxscript": run_onnxscript,
}


def cell(tool, model: onnx.ModelProto) -> str:
    try:
        result = tool(model)
    except ImportError:
        return "not installed"
    except Exception as exc:
        return f"error: {type(exc).__name__}"
    bn = sum(n.op_type == "BatchNormalization" for n in result.graph.node)
    affine = sum(n.op_type in AFFINE_OPS for n in result.graph.node)
    try:
        verdict = "ok" if bnfold.verify(model, result).equivalent else "NOT EQUIVALENT"
    except bnfold.BnfoldError as exc:
        verdict = f"unverifiable: {str(exc)[:40]}"
    return f"{bn}/{affine} {verdict}"


def main() -> None:
    print(f"onnx {onnx.__version__}; cells: BN left / Mul+Add+Sub+Div left, then the verdict")
    rows = [["model", "original", *TOOLS]]
    for path in sorted((ROOT / "sample_models").glob("*.onnx")):
        model = onnx.load(str(path))
        bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
        affine = sum(n.op_type in AFFINE_OPS for n in model.graph.node)
        rows.append([path.stem, f"{bn}/{affine}", *(cell(tool, model) for tool in TOOLS.values())])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()
