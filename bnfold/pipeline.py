"""The library's two pipelines: `fold` (a model in memory) and `optimize` (a model file to a
model file, proven before it is written). Both run load → index → fold → validate; optimize
then verifies and writes."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from bnfold.checker import (
    check_input,
    list_initializers_as_inputs,
    validate,
    validate_input_skeleton,
    validate_skeleton,
)
from bnfold.errors import BnfoldError, InternalError
from bnfold.folding.walk import fold_model_graph
from bnfold.graph.protos import all_nodes
from bnfold.graph.tensors import TensorReader, store_pending
from bnfold.io import output as io_output
from bnfold.io.output import StagedModel, output_path, refuse_input_data, serialized_size
from bnfold.io.source import ModelSource, as_model, is_onnx_ir, load_model
from bnfold.io.tensors import payload_bytes, read_tensor
from bnfold.report import FoldOutcome, FoldReport

if TYPE_CHECKING:
    import onnx_ir

    from bnfold.verification.report import VerifyReport


ModelLike = Any  # a path, an onnx.ModelProto, an onnx_ir model or an ONNXProgram (as_model)


@dataclass
class FoldResult:
    """The folded model and the record of what was folded and what was not, and why."""

    model: onnx.ModelProto | onnx_ir.Model  # an onnx_ir.Model when `fold` was given one, else a ModelProto
    report: FoldReport


def fold(
    model: ModelLike,
    *,
    check: bool = True,
    reparam: bool = True,
    bias_correction: bool | None = None,
    calibration=None,
    custom_ops: Sequence[str | os.PathLike] = (),
    requantize: bool = False,
) -> FoldResult:
    """Fold every foldable BatchNormalization (and per-channel Mul/Add/Sub/Div) into the linear
    op next to it; see docs/folding.md for the patterns and their preconditions.

    With `reparam`, sums of parallel branches affine in one tensor are then merged into one
    Conv (bnfold.folding.reparam: RepVGG, MobileOne, RepMixer blocks). 16-bit weights are
    rounded a second time sum-preserving; `bias_correction` chooses that rounding with each
    conv's input statistics instead, read from the graph or measured on `calibration` (a path or
    feeds: bnfold.calibration) in onnxruntime sessions that register the custom-op libraries
    `custom_ops`. By default (None) it is on only with `calibration`: on held-out networks and
    inputs unlike the statistics it reads, it was worse as often as better (docs/folding.md).
    With `requantize`, a BN behind a quantizer on the linear op's output (`Conv → QuantizeLinear →
    DequantizeLinear → BN`) folds too, that quantizer removed: not exact (bnfold.folding.quantized).

    `model` is a path, a ModelProto (never modified: the fold works on a copy), an onnx_ir model
    or a torch.onnx.ONNXProgram (bnfold.io.source.as_model); the folded model is an onnx_ir
    model when an onnx_ir model came in, else a ModelProto. With `check`,
    the result must pass `onnx.checker` (full check) or this raises: BnfoldError when the input
    itself is invalid, InternalError when the fold broke a valid model.
    """
    start = time.perf_counter()
    given_ir = is_onnx_ir(model)
    model = as_model(model)
    if isinstance(model, Path):
        original: onnx.ModelProto | str = str(model)
        folded = load_model(model)  # a fresh copy that only we hold
    else:
        original = model
        folded = onnx.ModelProto()
        folded.CopyFrom(model)
    report = FoldReport(bytes_before=serialized_size(folded), ops_before=op_counts(folded))
    report.repairs = list_initializers_as_inputs(folded)
    if check and report.bytes_before <= io_output.SINGLE_FILE_LIMIT:
        report.dropped_value_info = check_input(folded)  # before folding: see checker.validate_input_skeleton
    bias_correction = corrects_rounding(bias_correction, calibration)
    calibrated = _calibrated(original, calibration, custom_ops) if bias_correction else {}
    report.outcomes, pending = fold_in_place(
        folded, original, read_tensor, reparam=reparam, bias_correction=bias_correction, calibrated=calibrated,
        requantize=requantize,
    )  # fmt: skip
    store_pending(folded.graph, pending)
    _record_fold(folded, report)
    report.bytes_after = serialized_size(folded)
    if check:
        if report.bytes_after > io_output.SINGLE_FILE_LIMIT:
            raise BnfoldError(
                "the folded model is over 2 GiB, and onnx.checker reads such a model only from disk: "
                "`bnfold optimize` checks it there (fold(..., check=False) skips the check)"
            )
        validate(folded, original)
    if given_ir:
        import onnx_ir

        folded = onnx_ir.from_proto(folded)
    report.seconds = time.perf_counter() - start
    return FoldResult(folded, report)


METADATA_KEY = "bnfold"  # the metadata_props entry of a folded model


def _record_fold(model: onnx.ModelProto, report: FoldReport) -> None:
    """After the fold (fold and optimize alike): the op counts it left, and, when it changed the
    model, what made it in the model's `bnfold` metadata entry (replacing one an earlier run left)."""
    report.ops_after = op_counts(model)  # before report.changed is read
    if not report.changed:
        return
    entry = next((e for e in model.metadata_props if e.key == METADATA_KEY), None)
    if entry is None:
        entry = model.metadata_props.add(key=METADATA_KEY)
    entry.value = report.provenance()


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes per op type in the model's graphs (subgraphs included) and functions."""
    nodes = [*all_nodes(model.graph), *(node for function in model.functions for node in function.node)]
    return dict(sorted(Counter(node.op_type for node in nodes).items()))


def corrects_rounding(bias_correction: bool | None, calibration) -> bool:
    """Whether 16-bit folds choose their rounding with input statistics: as asked, else only
    when calibration data measures them."""
    return calibration is not None if bias_correction is None else bias_correction


def _calibrated(original: onnx.ModelProto | str, calibration, custom_ops: Sequence[str | os.PathLike]) -> dict:
    """Measured input statistics (bnfold.calibration), or none without calibration data."""
    if calibration is None:
        return {}
    from bnfold.calibration import measure  # runs onnxruntime: imported only when asked for

    return measure(original, calibration, custom_ops=custom_ops)


def fold_in_place(
    model: onnx.ModelProto,
    original: onnx.ModelProto | str,
    read_tensor: TensorReader,
    *,
    reparam: bool = True,
    bias_correction: bool = True,
    calibrated: dict | None = None,
    requantize: bool = False,
) -> tuple[list[FoldOutcome], dict]:
    """fold_model_graph, with a crash blamed on the input when the input is invalid: a broken
    model can break what any valid one guarantees (an unknown data type, a dangling name)."""
    try:
        return fold_model_graph(
            model, read_tensor, reparam=reparam, bias_correction=bias_correction, calibrated=calibrated,
            requantize=requantize,
        )  # fmt: skip
    except (BnfoldError, InternalError):
        raise
    except Exception:
        check_input(original)
        raise


@dataclass
class OptimizeResult:
    input: Path
    output: Path
    written: bool  # False only when verification found the folded model not equivalent
    report: FoldReport
    verification: VerifyReport | None = None  # None with verify=False, or with nothing to fold

    @property
    def unchanged(self) -> bool:
        """Nothing to fold: the output is the input (byte for byte when it is one file)."""
        return not self.report.changed

    def to_dict(self) -> dict:
        return {
            "input": str(self.input),
            "output": str(self.output),
            "written": self.written,
            "unchanged": self.unchanged,
            **self.report.to_dict(),
            "verification": self.verification.to_dict() if self.verification is not None else None,
        }


EXTERNAL_DATA_MODES = ("auto", "always", "never")


def optimize(
    model_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    external_data: str = "auto",
    reparam: bool = True,
    bias_correction: bool | None = None,
    calibration=None,
    verify_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] = lambda stage: None,
    requantize: bool = False,
) -> OptimizeResult:
    """Fold `model_path` and write the result to `output` (default `<model>.folded.onnx`).

    Nothing is written unless the folded model passes onnx.checker and, with `verify`, computes
    the same function as the original under onnxruntime (`bnfold.verify`, with
    `verify_options`, on the staged files). `external_data`: "auto" keeps tensors in a data
    file when the input did or when one file cannot hold the model, "always", or "never". The
    write is atomic and never targets the input. `reparam`: merge sums of parallel branches
    (bnfold.folding.reparam) too. `bias_correction`, `calibration`, `requantize`: as for `fold`
    (with `requantize`, verification bypasses the quantizers the fold removed in the original).

    The model is parsed once (bnfold.io.source); large tensors are read only when folded and
    are otherwise copied file to file; the output is streamed (bnfold.io.output) and checked
    by its skeleton (checker.validate_skeleton). So the cost is close to reading and writing
    the file (bench/run.py measures it).
    """
    start = time.perf_counter()
    if not isinstance(model_path, (str, os.PathLike)):
        raise BnfoldError(
            f"optimize reads and writes model files, and was given {type(model_path).__name__}: "
            "save the model first, or fold it in memory with bnfold.fold()"
        )
    if external_data not in EXTERNAL_DATA_MODES:
        raise BnfoldError(f"--external-data {external_data!r}: choose one of {', '.join(EXTERNAL_DATA_MODES)}")
    src = Path(model_path)
    dst = output_path(src, output)  # refuse a bad destination before doing any work
    progress(f"folding {src}")
    with ModelSource.open(src) as source:
        refuse_input_data(dst, source.data_files)
        model = source.model
        repairs = list_initializers_as_inputs(model)
        dropped = validate_input_skeleton(model, source, str(src))
        report = FoldReport(bytes_before=source.bytes_on_disk, ops_before=op_counts(model), dropped_value_info=dropped)
        report.repairs = repairs
        payload_before = payload_bytes(model.graph)
        bias_correction = corrects_rounding(bias_correction, calibration)
        if calibration is not None and bias_correction:
            progress("measuring input statistics on the calibration data")
        custom_ops = (verify_options or {}).get("custom_ops", ())  # the calibration session loads them too
        calibrated = _calibrated(str(src), calibration, custom_ops) if bias_correction else {}
        report.outcomes, pending = fold_in_place(
            model, str(src), source.read, reparam=reparam, bias_correction=bias_correction, calibrated=calibrated,
            requantize=requantize,
        )  # fmt: skip
        _record_fold(model, report)
        # The tensor data dominates the size; from dims, without serializing anything.
        too_big = report.bytes_before - payload_before + payload_bytes(model.graph) > io_output.SINGLE_FILE_LIMIT
        if external_data == "never" and too_big:
            raise BnfoldError(
                "the folded model is over 2 GiB, more than one ONNX file can hold; use --external-data auto"
            )
        external = external_data == "always" or (external_data == "auto" and (bool(source.data_files) or too_big))
        progress("checking the folded model")
        validate_skeleton(model, pending, source, str(src))
        progress(f"staging the folded model beside {dst} (hidden until it is written)")
        checked = None
        # Nothing rewritten: the input's own bytes, when it is one file and nothing was dropped.
        verbatim = not report.changed and not dropped and not source.data_files and external_data != "always"
        stage = (
            StagedModel.copy(src, dst)
            if verbatim
            else StagedModel(model, dst, external=external, pending=pending, source=source)
        )
        with stage as staged:
            pending.clear()  # written: free the folded weights before onnxruntime loads both models
            if verify and report.changed:
                progress("verifying the folded model against the original")
                options = {**(verify_options or {}), **({"requantize": True} if requantize else {})}
                checked = _verify(src, staged.path, options, progress)
                checked.candidate = str(dst)
                _name_the_fold(checked, report)
            written = checked is None or checked.equivalent
            if written:
                progress(f"writing {dst}")
                staged.commit(keep=source.data_files)
            report.bytes_after = staged.bytes
    report.seconds = time.perf_counter() - start  # the whole run, as the user waited
    return OptimizeResult(src, dst, written, report, checked)


def _verify(src: Path, folded: Path, options: dict, progress) -> VerifyReport:
    from bnfold.verification.verify import ModelLoadError, verify

    try:
        return verify(src, folded, progress=progress, locations_checked=True, localize=True, **options)
    except BnfoldError as exc:
        if isinstance(exc, ModelLoadError) and exc.role == "candidate":
            raise InternalError(f"the folded model does not load although the input does: {exc}") from None
        raise BnfoldError(f"cannot verify: {exc} (--no-verify skips verification)") from None


def _name_the_fold(checked: VerifyReport, report: FoldReport) -> None:
    """Name the fold that made the node where the folded model first diverges: the linear op
    that absorbed a BN took over the BN's output name, so the divergent tensor names it."""
    divergence = checked.first_divergence
    if divergence is None:
        return
    made = next((o for o in report.outcomes if o.folded and o.output == divergence.tensor), None)
    if made is not None:
        divergence.fold = f"{made.op} '{made.node}'"
