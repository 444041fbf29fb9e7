"""`bnfold optimize` as a library call: fold a model file, prove the result, write it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfold.errors import BnfoldError, InternalError
from bnfold.folding import fold_in_place, validate_skeleton
from bnfold.modelfile import SINGLE_FILE_LIMIT, SUFFIX, StagedModel, output_path, read_model
from bnfold.report import FoldReport
from bnfold.wire import payload_bytes, read_tensor

if TYPE_CHECKING:
    from bnfold.verification.report import VerifyReport


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
    reparam: bool = True,
    verify_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] = lambda stage: None,
) -> OptimizeResult:
    """Fold `model_path` and write the result to `output` (default `<model>.folded.onnx`).

    Nothing is written unless the folded model passes onnx.checker and, with `verify`, computes
    the same function as the original under onnxruntime (`bnfold.verify`, with
    `verify_options`, on the staged files). `external_data`: "auto" keeps tensors in a data
    file when the input did or when one file cannot hold the model, "always", or "never". The
    write is atomic and never targets the input. `reparam`: merge sums of parallel branches
    (bnfold.reparam) too.

    The model is parsed once; tensors in an input data file are read only when folded and are
    otherwise copied file to file; the output is streamed (modelfile.StagedModel) and checked
    by its skeleton (folding.validate_skeleton). So the cost is close to reading and writing
    the file (bench/run.py measures it).
    """
    start = time.perf_counter()
    if external_data not in EXTERNAL_DATA_MODES:
        raise BnfoldError(f"--external-data {external_data!r}: choose one of {', '.join(EXTERNAL_DATA_MODES)}")
    src = Path(model_path)
    dst = output_path(src, output)  # refuse a bad destination before doing any work
    progress(f"folding {src}")
    model, data_files = read_model(src, load_external=False)
    folder = src.resolve().parent  # where the tensors left in files are read from
    report = FoldReport(bytes_before=sum(f.stat().st_size for f in (src, *data_files)))
    payload_before = payload_bytes(model.graph)
    report.outcomes, new_values = fold_in_place(model, str(src), partial(read_tensor, folder=folder), reparam=reparam)
    # The tensor data dominates the size; from dims, without serializing anything.
    too_big = report.bytes_before - payload_before + payload_bytes(model.graph) > SINGLE_FILE_LIMIT
    if external_data == "never" and too_big:
        raise BnfoldError("the folded model is over 2 GiB, more than one ONNX file can hold; use --external-data auto")
    external = external_data == "always" or (external_data == "auto" and (bool(data_files) or too_big))
    progress("checking the folded model")
    validate_skeleton(model, new_values, folder, str(src))
    progress(f"writing {dst}")
    checked = None
    with StagedModel(model, dst, external=external, new_values=new_values, source_folder=folder) as staged:
        new_values.clear()  # written: free the folded weights before onnxruntime loads both models
        if verify:
            progress("verifying the folded model against the original")
            checked = _verify(src, staged.path, verify_options or {}, progress)
            checked.candidate = str(dst)
        written = checked is None or checked.equivalent
        if written:
            staged.commit()
        report.bytes_after = staged.bytes
    report.seconds = time.perf_counter() - start  # the whole run, as the user waited
    return OptimizeResult(src, dst, written, report, checked)


def _verify(src: Path, folded: Path, options: dict, progress) -> VerifyReport:
    from bnfold.verification.verify import ModelLoadError, verify

    try:
        return verify(src, folded, progress=progress, locations_checked=True, **options)
    except BnfoldError as exc:
        if isinstance(exc, ModelLoadError) and exc.role == "candidate":
            raise InternalError(f"the folded model does not load although the input does: {exc}") from None
        raise BnfoldError(f"cannot verify: {exc} (--no-verify skips verification)") from None


@dataclass
class BatchItem:
    """One model of a batch: its result, or the error that stopped it, with its exit code."""

    input: Path
    exit_code: int
    result: OptimizeResult | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        data = self.result.to_dict() if self.result else {"input": str(self.input), "written": False}
        return {**data, "exit_code": self.exit_code, "error": self.error}


def model_files(paths: list[Path]) -> list[Path]:
    """The models to fold: files as given, and the `*.onnx` files in a folder (not earlier
    `*.folded.onnx` outputs), in a stable order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.glob("*.onnx") if p.is_file() and not p.name.endswith(SUFFIX))
        else:
            found.append(path)
    if not found:
        raise BnfoldError(f"no .onnx files in {', '.join(map(str, paths))}")
    return found


def optimize_many(
    paths: list[Path],
    output_folder: Path | None,
    *,
    jobs: int = 1,
    on_done: Callable[[BatchItem], None] = lambda item: None,
    **options: Any,
) -> list[BatchItem]:
    """optimize() for each model, `jobs` at a time in separate processes; one model's failure
    does not stop the others. Results come back in input order."""
    from concurrent.futures import ProcessPoolExecutor

    if jobs < 1:
        raise BnfoldError("--jobs must be at least 1")
    if output_folder is not None:
        if output_folder.exists() and not output_folder.is_dir():
            raise BnfoldError(f"{output_folder}: with several models, -o must name a folder")
        output_folder.mkdir(parents=True, exist_ok=True)
    tasks = [(path, output_folder, options) for path in paths]
    items: dict[Path, BatchItem] = {}
    if jobs == 1:
        for task in tasks:
            items[task[0]] = item = _optimize_one(task)
            on_done(item)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for item in pool.map(_optimize_one, tasks):
                items[item.input] = item
                on_done(item)
    return [items[path] for path in paths]


def _optimize_one(task) -> BatchItem:
    """One model of a batch, with every failure turned into its exit code (a worker process
    must return, not raise)."""
    import traceback

    from bnfold.errors import EXIT_INTERNAL_ERROR, EXIT_NOT_EQUIVALENT, EXIT_OK, EXIT_USER_ERROR

    path, output_folder, options = task
    try:
        result = optimize(path, output_folder, **options)
    except BnfoldError as exc:
        return BatchItem(path, EXIT_USER_ERROR, error=str(exc))
    except Exception as exc:  # InternalError and any bug: report it, keep the batch going
        detail = str(exc) if isinstance(exc, InternalError) else traceback.format_exc()
        return BatchItem(path, EXIT_INTERNAL_ERROR, error=f"internal error, please report: {detail}")
    return BatchItem(path, EXIT_OK if result.written else EXIT_NOT_EQUIVALENT, result=result)
