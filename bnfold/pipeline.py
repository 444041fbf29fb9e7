"""`bnfold optimize` as a library call: fold a model file, prove the result, write it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfold.errors import BnfoldError, InternalError
from bnfold.folding import fold
from bnfold.modelfile import load_model, output_path, save_model
from bnfold.report import FoldReport

if TYPE_CHECKING:
    from bnfold.verification import VerifyReport


@dataclass
class OptimizeResult:
    input: Path
    output: Path
    written: bool  # False only when verification found the folded model not equivalent
    report: FoldReport
    verification: VerifyReport | None = None  # None with verify=False

    def to_dict(self) -> dict:
        return {
            "input": str(self.input),
            "output": str(self.output),
            "written": self.written,
            **self.report.to_dict(),
            "verification": self.verification.to_dict() if self.verification else None,
        }


def optimize(
    model_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    verify_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] = lambda stage: None,
) -> OptimizeResult:
    """Fold `model_path` and write the result to `output` (default `<model>.folded.onnx`).

    Nothing is written unless the folded model passes onnx.checker and, with `verify`, computes
    the same function as the original under onnxruntime (`bnfold.verify`, with
    `verify_options`); without `verify` it must still load in onnxruntime. The write is atomic
    and never targets the input.
    """
    from bnfold import verification  # onnxruntime: only when a check runs

    start = time.perf_counter()
    src = Path(model_path)
    dst = output_path(src, output)  # refuse a bad destination before doing any work
    progress(f"folding {src}")
    result = fold(src)
    checked = None
    if verify:
        progress("verifying the folded model against the original")
        checked = _verify(src, result.model, verify_options or {}, progress)
        checked.candidate = f"{dst} (folded)"
    else:
        progress("loading the folded model in onnxruntime")
        verification.check_loads(result.model, lambda: load_model(src))
    written = checked is None or checked.equivalent
    if written:
        progress(f"writing {dst}")
        result.report.bytes_after = save_model(result.model, dst)
    result.report.seconds = time.perf_counter() - start  # the whole run, as the user waited
    return OptimizeResult(src, dst, written, result.report, checked)


def _verify(src: Path, folded, options: dict, progress) -> VerifyReport:
    from bnfold.verification import ModelLoadError, verify

    try:
        return verify(src, folded, progress=progress, **options)
    except ModelLoadError as exc:
        if exc.role == "candidate":
            raise InternalError(f"the folded model does not load although the input does: {exc}") from None
        raise BnfoldError(f"cannot verify: {exc} (--no-verify skips verification)") from None
    except BnfoldError as exc:
        raise BnfoldError(f"cannot verify: {exc} (--no-verify skips verification)") from None
