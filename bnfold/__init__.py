"""bnfold: fold BatchNormalization into the linear op before it in ONNX models, and prove it.

    import bnfold
    result = bnfold.fold("model.onnx")      # or an onnx.ModelProto; the input is not modified
    result.model                            # the folded onnx.ModelProto
    print(result.report.table())            # what was folded, what was skipped and why

Attributes are imported on first use, so `import bnfold` (and the CLI's start-up) stays cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "fold": "bnfold.pipeline",
    "FoldResult": "bnfold.pipeline",
    "FoldReport": "bnfold.report",
    "FoldOutcome": "bnfold.report",
    "optimize": "bnfold.pipeline",
    "OptimizeResult": "bnfold.pipeline",
    "BnfoldError": "bnfold.errors",
    "InternalError": "bnfold.errors",
    "verify": "bnfold.verification.verify",
    "VerifyReport": "bnfold.verification.report",
    "bench": "bnfold.benchmark",
    "BenchReport": "bnfold.benchmark",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
