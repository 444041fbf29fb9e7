"""Validation: onnx.checker with full_check (strict shape inference) on a folded model, and
blame when it fails: BnfoldError when the input itself is invalid, InternalError when the fold
broke a valid model."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import onnx

from bnfold.errors import BnfoldError, InternalError, first_line
from bnfold.io.source import ModelSource
from bnfold.io.writer import write_skeleton


def validate(candidate: onnx.ModelProto | str, original: onnx.ModelProto | str) -> None:
    """Check the folded model. Either may be a ModelProto or a path (the checker needs a path
    past protobuf's 2 GiB)."""
    try:
        _check(candidate)
    except BnfoldError as folded_error:
        check_input(original)
        raise InternalError(f"the folded model fails onnx.checker although the input passes: {folded_error}") from None


def validate_skeleton(
    model: onnx.ModelProto, pending: dict[str, np.ndarray], source: ModelSource | None, original: str
) -> None:
    """validate() for a folded model that is to be streamed to disk (bnfold.io.output): the
    checker reads its skeleton (bnfold.io.writer.write_skeleton), the graph whole but large
    tensors without their data, so checking costs no second parse of the weights."""
    with tempfile.TemporaryDirectory(prefix="bnfold-check-") as folder:
        validate(str(write_skeleton(model, pending, source, Path(folder))), original)


def validate_input_skeleton(model: onnx.ModelProto, source: ModelSource, original: str) -> list[str]:
    """check_input() for a model opened for folding, on its skeleton (no tensor data read).
    Run before folding: a model the checker refuses may be read one way by onnxruntime and
    another by any folder (two tensors of one name, an attribute given twice), so it is never
    folded, whatever the fold would have left. Annotations are not the model, though: the
    `value_info` entries that contradict the graph are dropped from `model` (drop_stale_value_info),
    and their names returned."""
    with tempfile.TemporaryDirectory(prefix="bnfold-check-") as folder:
        return check_input(model, lambda m: str(write_skeleton(m, {}, source, Path(folder))))


def check_input(model: onnx.ModelProto | str, as_checked=lambda m: m) -> list[str]:
    """Raise BnfoldError if the input model fails the checker. A ModelProto that fails only by
    its stale value_info has those entries dropped (it must be a copy that the caller owns);
    their names are returned. `as_checked` gives what the checker reads for a ModelProto."""
    try:
        _check(as_checked(model))
        return []
    except BnfoldError as input_error:
        stale = drop_stale_value_info(model) if isinstance(model, onnx.ModelProto) else []
        try:
            if stale:
                _check(as_checked(model))
                return stale
        except BnfoldError:
            pass
        raise BnfoldError(f"the input is not a valid ONNX model: {input_error}") from None


def list_initializers_as_inputs(model: onnx.ModelProto) -> list[str]:
    """Repair what onnxruntime runs and onnx.checker refuses: an IR version below 4 requires every
    initializer to be a graph input, and exporters of that era (onnxruntime's own fusion test
    models) left some out. Such a model is raised to IR 4, which does not require it (nothing
    else differs); the sentence for the report, or nothing."""
    if not 0 < model.ir_version < 4:
        return []
    listed = {v.name for v in model.graph.input}
    missing = [t.name for t in model.graph.initializer if t.name not in listed]
    if not missing:
        return []
    before, model.ir_version = model.ir_version, 4
    return [
        f"IR version {before} requires every initializer to be a graph input; {len(missing)} were not, so the "
        "model is written as IR version 4, which does not (onnxruntime runs both alike)"
    ]


def drop_stale_value_info(model: onnx.ModelProto) -> list[str]:
    """Remove the main graph's value_info entries whose type contradicts what shape inference
    finds without them (another element type, rank or fixed size: left over from an exporter,
    as jax2onnx's channels-last shapes are), or that have no type at all (onnxslim writes such
    entries: the checker reads them as data type 0); a graph output declared with a type the
    graph does not make is declared as what it is. Return their names. Inference reads a copy
    without the large tensors' data."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    skeleton.graph.ClearField("value_info")
    for output in skeleton.graph.output:  # inferred afresh, to compare with what is declared
        if output.type.HasField("tensor_type"):
            output.type.tensor_type.ClearField("shape")
    for tensor in skeleton.graph.initializer:
        if len(tensor.raw_data) > 4096:
            tensor.ClearField("raw_data")
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False).graph
    except Exception:
        return []
    found = {v.name: v.type for v in (*inferred.value_info, *inferred.output)}
    stale = [
        v.name
        for v in model.graph.value_info
        if v.type.WhichOneof("value") is None or v.name in found and _contradicts(v.type, found[v.name])
    ]
    kept = [v for v in model.graph.value_info if v.name not in set(stale)]
    if stale:
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
    # a graph output declared with a type the graph does not make (declared twice, once stale):
    # declared as what it is
    for output in model.graph.output:
        if output.name in found and _contradicts(output.type, found[output.name]):
            output.type.CopyFrom(found[output.name])
            stale.append(f"{output.name} (a graph output's type)")
    return stale


def _contradicts(declared: onnx.TypeProto, inferred: onnx.TypeProto) -> bool:
    """Whether two tensor types disagree where both are known."""
    if not (declared.HasField("tensor_type") and inferred.HasField("tensor_type")):
        return False
    a, b = declared.tensor_type, inferred.tensor_type
    if a.elem_type and b.elem_type and a.elem_type != b.elem_type:
        return True
    if not (a.HasField("shape") and b.HasField("shape")):
        return False
    if len(a.shape.dim) != len(b.shape.dim):
        return True
    return any(
        x.HasField("dim_value") and y.HasField("dim_value") and x.dim_value != y.dim_value
        for x, y in zip(a.shape.dim, b.shape.dim)
    )


# Strict inference failing inside the function body of a standard op: the body is onnx's own
# (its MeanVarianceNormalization-13 body holds a Constant that its own inference refuses).
_IN_FUNCTION_BODY = re.compile(r"\(op_type:(\w+)[^)]*\): \[ShapeInferenceError\] Inference error\(s\): \(op_type:")


def _check(model: onnx.ModelProto | str) -> None:
    """onnx.checker with full_check. A model whose only fault is in the function body onnx itself
    gives a standard op passes when the checker without strict inference passes it."""
    checked = model if isinstance(model, onnx.ModelProto) else str(model)
    try:
        onnx.checker.check_model(checked, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError, and ValueError for bad enums
        inside = _IN_FUNCTION_BODY.search(str(exc))
        if inside and _has_standard_body(inside.group(1)):
            try:
                onnx.checker.check_model(checked)
                return
            except Exception:
                pass
        raise BnfoldError(first_line(exc)) from None


def _has_standard_body(op_type: str) -> bool:
    try:
        schema = onnx.defs.get_schema(op_type)
    except Exception:  # not a standard op
        return False
    return schema.has_function or schema.has_context_dependent_function
