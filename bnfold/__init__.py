"""bnfold: fold BatchNormalization into the linear op before it in ONNX models, and prove it.

    import bnfold
    result = bnfold.fold("model.onnx")      # or an onnx.ModelProto; the input is not modified
    result.model                            # the folded onnx.ModelProto
    print(result.report.table())            # what was folded, what was skipped and why

Attributes are imported on first use, so `import bnfold` (and the CLI's start-up) stays cheap.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.2.0.dev0"

if TYPE_CHECKING:  # what type checkers see; at run time each name is imported on first use
    from bnfold.benchmark import BenchReport, bench
    from bnfold.errors import BnfoldError, InternalError
    from bnfold.pipeline import FoldResult, OptimizeResult, fold, optimize
    from bnfold.report import FoldOutcome, FoldReport
    from bnfold.verification.golden import verify_against_outputs
    from bnfold.verification.report import VerifyReport
    from bnfold.verification.verify import verify

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
    "verify_against_outputs": "bnfold.verification.golden",
    "VerifyReport": "bnfold.verification.report",
    "bench": "bnfold.benchmark",
    "BenchReport": "bnfold.benchmark",
}

__all__ = [  # spelled out, so that linters and type checkers read it
    "fold", "FoldResult", "FoldReport", "FoldOutcome", "optimize", "OptimizeResult", "BnfoldError",
    "InternalError", "verify", "verify_against_outputs", "VerifyReport", "bench", "BenchReport", "__version__",
]  # fmt: skip
assert set(__all__) == {*_EXPORTS, "__version__"}


def __dir__() -> list[str]:
    """The public names too, though each is imported only on first use."""
    return sorted({*globals(), *__all__})


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
