"""`bnfold verify` against the chains a pipeline runs: the export against what other tools made of it.

    pip install onnxslim onnxsim onnxscript      # the tools; not bnfold dependencies
    python bench/chains.py MODEL.onnx [MODEL.onnx ...] [--json FILE]

For each model (the *export*), each tool in TOOLS makes a candidate, and bnfold then folds
that candidate (the chain `tool → bnfold`). Every candidate is verified against the export:
a correct one must pass. Then the same candidate with a seeded mistake, at the first, middle and
last Conv that has a constant weight (the bias of its loudest output channel, the one with
the largest weights, moved by 3% of its size, or that channel's weights ×1.01), must fail: a
quiet channel may be dead behind its activation, and a mistake there changes nothing. A tool
that fails on a model, or makes one onnxruntime cannot load, is skipped and says so; bnfold
exiting with an error is counted as an error.

Prints a line per candidate and the totals: correct passed, correct refused (false alarms),
mistakes failed, mistakes passed (silent passes), errors. A refused candidate is also checked
apart from bnfold (`_independently`), so a refusal of a tool's wrong model is seen as such.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

import bnfold
from bnfold.errors import BnfoldError


def with_onnxslim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def with_onnxsim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim could not check its result")
    return simplified


def with_onnxruntime(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "in.onnx", Path(folder) / "out.onnx"
        onnx.save(model, source)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(target)
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        return onnx.load(target)


def with_onnxscript(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxscript.optimizer

    return onnxscript.optimizer.optimize(model)


def with_bnfold(model: onnx.ModelProto) -> onnx.ModelProto:
    return bnfold.fold(model).model


TOOLS = {
    "onnxslim": with_onnxslim,
    "onnxsim": with_onnxsim,
    "onnxruntime": with_onnxruntime,
    "onnxscript": with_onnxscript,
}


def candidates(model: onnx.ModelProto):
    """(name, candidate) for each tool, alone and followed by bnfold; bnfold alone first."""
    yield "bnfold", with_bnfold(model)
    for name, tool in TOOLS.items():
        try:
            made = tool(_copy(model))
        except Exception as error:  # noqa: BLE001 - a tool that fails on a model is skipped
            print(f"  {name}: skipped ({type(error).__name__}: {str(error)[:80]})", file=sys.stderr)
            continue
        unloadable = _unloadable(made)
        if unloadable:  # the tool made a model onnxruntime refuses: nothing to verify
            print(f"  {name}: skipped (onnxruntime cannot load what it made: {unloadable[:80]})", file=sys.stderr)
            continue
        yield name, made
        try:
            yield f"{name} → bnfold", with_bnfold(made)
        except BnfoldError as error:  # bnfold refusing the tool's model: counted as an error
            yield f"{name} → bnfold", error


def _unloadable(model: onnx.ModelProto) -> str:
    import onnxruntime as ort

    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - its message is the reason
        return str(error).splitlines()[0]
    return ""


def mistakes(model: onnx.ModelProto):
    """(label, model) with one seeded mistake each, at the first, middle and last constant-weight Conv."""
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    tensors.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                    if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})  # fmt: skip
    constants = set(tensors)
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in constants]
    picked = sorted({0, len(convs) // 2, len(convs) - 1}) if convs else []
    for position in picked:
        node = convs[position]
        weights = tensors[node.input[1]].astype(np.float64)
        loud = int(np.abs(weights.reshape(len(weights), -1)).sum(axis=1).argmax())
        if len(node.input) > 2 and node.input[2] in constants:
            bias = tensors[node.input[2]]
            changed = bias.copy()
            changed[loud] = bias[loud] + 0.03 * abs(bias[loud]) + 1e-3
            yield f"bias+3% @conv{position}", _changed(model, node, 2, changed)
        changed = tensors[node.input[1]].copy()
        changed[loud] *= 1.01
        yield f"w×1.01 @conv{position}", _changed(model, node, 1, changed)


def _changed(model: onnx.ModelProto, node: onnx.NodeProto, slot: int, values: np.ndarray) -> onnx.ModelProto:
    """The model with the tensor `node` reads at `slot` replaced by `values`, under a new name,
    so that no other reader of the tensor changes."""
    copy = _copy(model)
    name = node.input[slot]
    copy.graph.initializer.append(numpy_helper.from_array(values, name + "__mistake"))
    changed = next(n for n in copy.graph.node if list(n.output) == list(node.output))
    changed.input[slot] = name + "__mistake"
    return copy


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _verdict(reference: Path, candidate: onnx.ModelProto, folder: Path, check: bool = False) -> str:
    """pass, fail (with `check`, what a check apart from bnfold finds), or error."""
    path = folder / "candidate.onnx"
    onnx.save(candidate, path)
    inputs = folder / "inputs"
    shutil.rmtree(inputs, ignore_errors=True)
    try:
        report = bnfold.verify(reference, path, save_inputs=inputs)
    except BnfoldError as error:
        return f"error: {error}"
    except Exception:  # noqa: BLE001 - counted, and shown, as an error
        return "error: " + traceback.format_exc().strip().splitlines()[-1]
    if report.equivalent:
        return "pass"
    return "fail: " + report.summary() + (_independently(reference, path, inputs) if check else "")


def _independently(reference: Path, candidate: Path, inputs: Path) -> str:
    """What a check apart from bnfold finds, on the inputs verify ran: onnxruntime with graph
    optimizations off runs both models; the candidate is wrong when an output's shape differs or
    it differs from the reference 10× more than onnxruntime's own fully optimized reference does."""
    import onnxruntime as ort

    def session(path, level):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ours, theirs, optimized = (session(reference, off), session(candidate, off),
                               session(reference, ort.GraphOptimizationLevel.ORT_ENABLE_ALL))  # fmt: skip
    names = [o.name for o in ours.get_outputs()]
    worst = 1.0
    for trial in sorted(inputs.glob("test_data_set_*")):
        tensors = [onnx.load_tensor(str(f)) for f in sorted(trial.glob("input_*.pb"))]
        feed = {t.name: numpy_helper.to_array(t) for t in tensors}
        want, got, own = (s.run(names, feed) for s in (ours, theirs, optimized))
        for name, w, g, o in zip(names, want, got, own):
            if np.shape(w) != np.shape(g):
                return f" (independently: wrong, '{name}' has shape {list(np.shape(g))}, not {list(np.shape(w))})"
            w, g, o = (np.asarray(v, np.float64) for v in (w, g, o))
            error, noise = np.abs(g - w).max(initial=0), np.abs(o - w).max(initial=0)
            worst = max(worst, error / noise if noise else (np.inf if error else 1.0))
    return f" (independently: {worst:.1f}× onnxruntime's own optimization error)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="write every verdict here")
    args = parser.parse_args()
    totals: Counter = Counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for path in args.models:
            print(path.name, file=sys.stderr)
            model = onnx.load(path)
            for name, candidate in candidates(model):
                if isinstance(candidate, BnfoldError):
                    totals["error"] += 1
                    rows.append({"model": path.name, "chain": name, "mistake": None, "verdict": f"error: {candidate}"})
                    print(f"  {name}: error: {candidate}", file=sys.stderr)
                    continue
                verdict = _verdict(path, candidate, folder, check=True)
                kind = (
                    "correct passed" if verdict == "pass"
                    else "error" if verdict.startswith("error")
                    else "tool's wrong model refused" if "(independently: wrong" in verdict
                    else "false alarm"
                )  # fmt: skip
                totals[kind] += 1
                rows.append({"model": path.name, "chain": name, "mistake": None, "verdict": verdict})
                print(f"  {name}: {verdict[:160]}", file=sys.stderr)
                for label, wrong in mistakes(candidate):
                    verdict = _verdict(path, wrong, folder)
                    kind = (
                        "mistake failed" if verdict.startswith("fail")
                        else "error" if verdict.startswith("error") else "silent pass"
                    )  # fmt: skip
                    if kind == "silent pass":  # how far the mistake moves the outputs, checked apart
                        verdict += _independently(path, folder / "candidate.onnx", folder / "inputs")
                    totals[kind] += 1
                    rows.append({"model": path.name, "chain": name, "mistake": label, "verdict": verdict})
                    if kind != "mistake failed":
                        print(f"    {label}: {verdict[:160]}", file=sys.stderr)
    for kind in (
        "correct passed",
        "false alarm",
        "tool's wrong model refused",
        "mistake failed",
        "silent pass",
        "error",
    ):
        print(f"{kind}: {totals[kind]}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
