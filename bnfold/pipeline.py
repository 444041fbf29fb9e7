"""`bnfold optimize` as a library call: fold a model file, prove the result, write it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfold.errors import BnfoldError, InternalError
from bnfold.folding import fold_in_place, validate
from bnfold.modelfile import SINGLE_FILE_LIMIT, StagedModel, output_path, read_model
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


EXTERNAL_DATA_MODES = ("auto", "always", "never")


def optimize(
    model_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    external_data: str = "auto",
    verify_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] = lambda stage: None,
) -> OptimizeResult:
    """Fold `model_path` and write the result to `output` (default `<model>.folded.onnx`).

    Nothing is written unless the folded model passes onnx.checker and, with `verify`, computes
    the same function as the original under onnxruntime (`bnfold.verify`, with
    `verify_options`); without `verify` it must still load in onnxruntime. Both checks read the
    staged files, so they work for models with external data and past 2 GiB. `external_data`:
    "auto" keeps tensors in a data file when the input did or when one file cannot hold the
    model, "always", or "never". The write is atomic and never targets the input.
    """
    from bnfold import verification  # onnxruntime: only when a check runs

    start = time.perf_counter()
    if external_data not in EXTERNAL_DATA_MODES:
        raise BnfoldError(f"--external-data {external_data!r}: choose one of {', '.join(EXTERNAL_DATA_MODES)}")
    src = Path(model_path)
    dst = output_path(src, output)  # refuse a bad destination before doing any work
    progress(f"folding {src}")
    model, had_external = read_model(src)
    report = FoldReport(bytes_before=model.ByteSize())
    report.outcomes = fold_in_place(model, str(src))
    too_big = model.ByteSize() > SINGLE_FILE_LIMIT
    if external_data == "never" and too_big:
        raise BnfoldError("the folded model is over 2 GiB, more than one ONNX file can hold; use --external-data auto")
    external = external_data == "always" or (external_data == "auto" and (had_external or too_big))
    progress(f"staging {dst}")
    checked = None
    with StagedModel(model, dst, external=external) as staged:
        progress("checking the folded model")
        validate(str(staged.path), str(src))
        if verify:
            progress("verifying the folded model against the original")
            checked = _verify(src, staged.path, verify_options or {}, progress)
            checked.candidate = str(dst)
        else:
            progress("loading the folded model in onnxruntime")
            verification.check_loads(staged.path, src)
        written = checked is None or checked.equivalent
        if written:
            staged.commit()
        report.bytes_after = staged.bytes
    report.seconds = time.perf_counter() - start  # the whole run, as the user waited
    return OptimizeResult(src, dst, written, report, checked)


def _verify(src: Path, folded: Path, options: dict, progress) -> VerifyReport:
    from bnfold.verification import ModelLoadError, verify

    try:
        return verify(src, folded, progress=progress, **options)
    except ModelLoadError as exc:
        if exc.role == "candidate":
            raise InternalError(f"the folded model does not load although the input does: {exc}") from None
        raise BnfoldError(f"cannot verify: {exc} (--no-verify skips verification)") from None
    except BnfoldError as exc:
        raise BnfoldError(f"cannot verify: {exc} (--no-verify skips verification)") from None
