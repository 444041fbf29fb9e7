"""How close folded models are to the function the original computes, bnfold against
onnxruntime's own Conv+BN fusion.

    python bench/accuracy.py [--samples N]

For each model in sample_models/:
- "BN left": BatchNormalization nodes in the original, after onnxruntime's offline optimizer at
  the BASIC level (where its Conv+BN fusion runs; the optimized model is saved and read back),
  and after bnfold.
- deviation: relative RMS error against the *exact* function of the original — the model
  widened to float64 and evaluated by onnx's reference evaluator (onnxruntime has no float64
  Conv). Every float32 run deviates by ~1e-7 through accumulation order alone, so deviation
  from the unfolded float32 run would compare noise with noise.
- the unfolded model, onnxruntime's folded model and bnfold's folded model all run in
  onnxruntime with graph optimizations disabled, so they use the same kernels.
- for float16 models, also the deviation from the PyTorch float32 network (the .npz reference).
- weight ulps: how far each folded Conv weight is from the exact float64 product W·s, in units
  in the last place of the weight's dtype (mean / max over all folded weights). Output
  deviations of float32 models are dominated by accumulation noise; this shows the fold itself.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator

import bnfold
from bnfold.verification.precision import widen_floats

ROOT = Path(__file__).resolve().parents[1]


def session(model: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL, save: str | None = None):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = level
    if save:
        options.optimized_model_filepath = save
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def onnxruntime_folded(model: onnx.ModelProto) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/optimized.onnx"
        session(model, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, save=path)
        return onnx.load(path)


def relative_rms(got: np.ndarray, want: np.ndarray) -> float:
    got, want = got.astype(np.float64), want.astype(np.float64)
    return float(np.sqrt(((got - want) ** 2).mean() / (want**2).mean()))


def exact_folded_weights(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.dtype]]:
    """Conv name → (W·s in float64, W's dtype), for every Conv that bnfold's rules fold."""
    from bnfold.folding.affine import scale_weights
    from bnfold.folding.backward import BackwardPlan
    from bnfold.folding.planner import plan_batch_norm
    from bnfold.folding.sources import batch_norm_version, read_batch_norm
    from bnfold.graph.context import GraphContext, ModelScope
    from bnfold.graph.protos import all_names
    from bnfold.graph.tensors import Names, TensorStore
    from bnfold.io.tensors import read_tensor

    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    scope = ModelScope(
        model.ir_version, opset, list(model.opset_import), Names(all_names(model.graph)), TensorStore(read_tensor)
    )
    ctx = GraphContext.build(model.graph, scope)
    exact = {}
    for bn in (n for n in model.graph.node if n.op_type == "BatchNormalization"):
        plan = plan_batch_norm(bn, ctx, batch_norm_version(opset))
        if isinstance(plan, BackwardPlan):
            weight = ctx.constant(plan.linear.input[1])
            scale, _ = read_batch_norm(bn, ctx, weight.shape[0])
            exact[plan.linear.name] = (scale_weights(weight, scale), weight.dtype)
    return exact


def weight_ulps(folded: onnx.ModelProto, exact: dict) -> str:
    initializers = {t.name: t for t in folded.graph.initializer}
    errors = []
    for node in folded.graph.node:
        if node.op_type == "Conv" and node.name in exact and node.input[1] in initializers:
            want, dtype = exact[node.name]
            got = onnx.numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
            ulp = np.spacing(np.abs(want).astype(dtype)).astype(np.float64)
            errors.append((np.abs(got - want) / np.where(ulp > 0, ulp, 1)).ravel())
    if not errors:
        return "     n/a"
    errors = np.concatenate(errors)
    return f"{errors.mean():.2f}/{errors.max():.2f}"


def batch_norms(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64, help="inputs per model (default 64)")
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, {args.samples} inputs per model")
    header = (
        f"{'model':22} {'BN left: orig/ort/bnfold':>24}  {'unfolded':>9} {'ort fold':>9} {'bnfold':>9}"
        f"  bnfold/ort  {'weight ulps: ort':>16} {'bnfold':>9}"
    )
    print(header)
    for path in sorted((ROOT / "sample_models").glob("*.onnx")):
        model = onnx.load(str(path))
        ort_model = onnxruntime_folded(model)
        ours = bnfold.fold(model).model
        folded_only = bnfold.fold(model, reparam=False).model  # for the weight ulps: same tensors as ort's
        exact = ReferenceEvaluator(widen_floats(model, onnx.TensorProto.DOUBLE))
        value = model.graph.input[0]
        shape = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        rng = np.random.default_rng(0)
        inputs = [rng.normal(0.3, 1.5, shape).astype(dtype) for _ in range(args.samples)]
        try:
            want = np.concatenate([exact.run(None, {value.name: x.astype(np.float64)})[0] for x in inputs])
        except Exception as exc:  # onnx's reference evaluator has gaps (grouped ConvTranspose)
            print(f"{path.stem:22} onnx's reference evaluator cannot run it: {str(exc).splitlines()[0][:60]}")
            continue
        dev = []
        for candidate in (model, ort_model, ours):
            run = session(candidate)
            got = np.concatenate([run.run(None, {value.name: x})[0] for x in inputs])
            dev.append(relative_rms(got, want))
        counts = f"{batch_norms(model)}/{batch_norms(ort_model)}/{batch_norms(ours)}"
        exact_weights = exact_folded_weights(model)
        folded_by_ort = batch_norms(ort_model) < batch_norms(model)
        ort_ulps = weight_ulps(ort_model, exact_weights) if folded_by_ort else "n/a"  # nothing of its own to compare
        print(
            f"{path.stem:22} {counts:>24}  {dev[0]:9.2e} {dev[1]:9.2e} {dev[2]:9.2e}  {dev[2] / dev[1]:10.2f}"
            f"  {ort_ulps:>16} {weight_ulps(folded_only, exact_weights):>9}"
        )
        if dtype == np.float16:
            reference = np.load(path.with_suffix(".npz"))
            feeds = {value.name: reference["in.input"]}
            torch_out = reference["out.output"]
            dev16 = [relative_rms(session(m).run(None, feeds)[0], torch_out) for m in (model, ort_model, ours)]
            print(
                f"{'  vs PyTorch float32':22} {'':>24}  {dev16[0]:9.2e} {dev16[1]:9.2e} {dev16[2]:9.2e}"
                f"  bnfold/unfolded {dev16[2] / dev16[0]:.2f}"
            )


if __name__ == "__main__":
    main()
