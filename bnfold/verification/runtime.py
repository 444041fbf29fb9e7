"""The onnxruntime adapter: the only module of bnfold that imports onnxruntime.

Sessions run with graph optimizations disabled: at its default level onnxruntime fuses Conv+BN
itself, and a check of the original would then compare bnfold against onnxruntime's own fold.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort

from bnfold.errors import BnfoldError, one_line
from bnfold.io.source import check_external_data
from bnfold.verification.inputs import InputSpec

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


class ModelLoadError(BnfoldError):
    """onnxruntime cannot load one of the two models; `role` says which."""

    def __init__(self, role: str, message: str):
        super().__init__(message)
        self.role = role  # "reference" or "candidate"


def check_providers(providers: Sequence[str]) -> None:
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise BnfoldError(f"provider {missing[0]} is not available; have {', '.join(available)}")


def make_session(
    model: onnx.ModelProto | str | Path, *, providers: Sequence[str] = DEFAULT_PROVIDERS, optimize: bool = False
) -> ort.InferenceSession:
    """A session on a ModelProto or a model file (a path lets onnxruntime read external data).
    `optimize` turns on onnxruntime's BASIC graph optimizations (float32-exact rewrites)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: keep onnxruntime's warnings off the report
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=list(providers))


def describe(model) -> str:
    """How reports name a model: its path, or its graph's name when it is in memory."""
    return str(model) if not isinstance(model, onnx.ModelProto) else (model.graph.name or "<in memory>")


def load_session(
    model, role: str, providers, *, optimize: bool = False, check_locations: bool = True
) -> ort.InferenceSession:
    """make_session, with the external-data check first and a ModelLoadError naming the role."""
    if check_locations and not isinstance(model, onnx.ModelProto):
        check_external_data(model)  # onnxruntime reads external data itself: check it first
    try:
        return make_session(model, providers=providers, optimize=optimize)
    except Exception as exc:
        raise ModelLoadError(role, f"onnxruntime cannot load {describe(model)}: {one_line(exc)}") from None


def signature(session: ort.InferenceSession, kind: str) -> list[tuple[str, str]]:
    """(name, type) of a session's "inputs" or "outputs", in the model's order."""
    return [(v.name, v.type) for v in getattr(session, f"get_{kind}")()]


def input_declarations(session: ort.InferenceSession) -> list[InputSpec]:
    """The model's inputs as onnxruntime reads them: name, type string, declared shape."""
    return [InputSpec(v.name, v.type, v.shape) for v in session.get_inputs()]


def run_session(session: ort.InferenceSession, feed: dict, label: str) -> list[np.ndarray]:
    """Run once; bfloat16 arrays go in as OrtValues (the only way onnxruntime's Python API
    takes them). A failure is one clear line."""
    feed = ort_feed(feed)
    try:
        if any(isinstance(v, ort.OrtValue) for v in feed.values()):
            values = {
                k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()
            }
            return [v.numpy() for v in session.run_with_ort_values(None, values)]
        return session.run(None, feed)
    except Exception as exc:
        raise BnfoldError(f"onnxruntime could not run {label}: {one_line(exc)}") from None


def run_named(session: ort.InferenceSession, feed: dict, label: str) -> dict:
    """run_session, with each output by its name."""
    names = [value.name for value in session.get_outputs()]
    return dict(zip(names, run_session(session, feed, label)))


def ort_feed(feed: dict) -> dict:
    """A feed as onnxruntime takes it: bfloat16 arrays as OrtValues of the ONNX type."""
    return {k: _bfloat16_value(v) if v.dtype == ml_dtypes.bfloat16 else v for k, v in feed.items()}


def _bfloat16_value(array: np.ndarray) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), onnx.TensorProto.BFLOAT16)
