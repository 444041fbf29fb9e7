"""Validation: onnx.checker with full_check (strict shape inference) on a folded model, and
blame when it fails: BnfoldError when the input itself is invalid, InternalError when the fold
broke a valid model."""

from __future__ import annotations

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


def validate_input_skeleton(model: onnx.ModelProto, source: ModelSource, original: str) -> None:
    """check_input() for a model opened for folding, on its skeleton (no tensor data read).
    Run before folding: a model the checker refuses may be read one way by onnxruntime and
    another by any folder (two tensors of one name, an attribute given twice), so it is never
    folded, whatever the fold would have left."""
    with tempfile.TemporaryDirectory(prefix="bnfold-check-") as folder:
        check_input(str(write_skeleton(model, {}, source, Path(folder))))


def check_input(original: onnx.ModelProto | str) -> None:
    """Raise BnfoldError if the input model fails the checker."""
    try:
        _check(original)
    except BnfoldError as input_error:
        raise BnfoldError(f"the input is not a valid ONNX model: {input_error}") from None


def _check(model: onnx.ModelProto | str) -> None:
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else str(model), full_check=True)
    except Exception as exc:  # ValidationError, InferenceError, and ValueError for bad enums
        raise BnfoldError(first_line(exc)) from None
