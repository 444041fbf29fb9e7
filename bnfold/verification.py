"""Everything that runs models: the only module that imports onnxruntime.

Sessions run with graph optimizations disabled: at its default level onnxruntime fuses Conv+BN
itself, and a check of the original would then compare bnfold against onnxruntime's own fold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import onnx
import onnxruntime as ort

from bnfold.errors import BnfoldError, InternalError, first_line

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def make_session(
    model: onnx.ModelProto, *, providers: Sequence[str] = DEFAULT_PROVIDERS, optimize: bool = False
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: keep onnxruntime's warnings off the report
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))


def check_loads(folded: onnx.ModelProto, original: Callable[[], onnx.ModelProto]) -> None:
    """The folded model must load in onnxruntime. If it does not, blame the input when that does
    not load either (BnfoldError), else bnfold (InternalError)."""
    try:
        make_session(folded)
    except Exception as folded_error:  # onnxruntime raises its own untyped failures
        try:
            make_session(original())
        except Exception as input_error:
            raise BnfoldError(
                f"onnxruntime cannot load the input model: {first_line(input_error)}"
            ) from None
        raise InternalError(
            f"onnxruntime cannot load the folded model although it loads the input: "
            f"{first_line(folded_error)}"
        ) from None
