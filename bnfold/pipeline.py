"""`bnfold optimize` as a library call: fold a model file, prove the result loads, write it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bnfold.folding import fold
from bnfold.modelfile import load_model, output_path, save_model
from bnfold.report import FoldReport


@dataclass
class OptimizeResult:
    input: Path
    output: Path
    written: bool
    report: FoldReport

    def to_dict(self) -> dict:
        return {
            "input": str(self.input),
            "output": str(self.output),
            "written": self.written,
            **self.report.to_dict(),
        }


def optimize(
    model_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    progress: Callable[[str], None] = lambda stage: None,
) -> OptimizeResult:
    """Fold `model_path` and write the result to `output` (default `<model>.folded.onnx`).

    Nothing is written unless the folded model passes onnx.checker and loads in onnxruntime;
    the write is atomic and never targets the input.
    """
    from bnfold.verification import check_loads  # onnxruntime: only when a check runs

    start = time.perf_counter()
    src = Path(model_path)
    dst = output_path(src, output)  # refuse a bad destination before doing any work
    progress(f"folding {src}")
    result = fold(src)
    progress("loading the folded model in onnxruntime")
    check_loads(result.model, lambda: load_model(src))
    progress(f"writing {dst}")
    result.report.bytes_after = save_model(result.model, dst)
    result.report.seconds = time.perf_counter() - start  # the whole run, as the user waited
    return OptimizeResult(src, dst, True, result.report)
