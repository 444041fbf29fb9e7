"""The fold pass: index the graph, check each BatchNormalization, fold, sweep, validate."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import onnx

from bnfold.errors import BnfoldError, InternalError, first_line
from bnfold.graph import ONNX_DOMAINS, GraphIndex, node_label, is_onnx_op
from bnfold.modelfile import load_model
from bnfold.report import FoldOutcome, FoldReport
from bnfold.rules import (
    ELEMENTWISE_AFFINE,
    RUNTIME_NORMALIZATIONS,
    RUNTIME_STATISTICS,
    ConcatPlan,
    Skip,
    batch_norm_version,
    plan_batch_norm,
    plan_elementwise,
)


@dataclass
class FoldResult:
    """The folded model and the record of what was folded and what was not, and why."""

    model: onnx.ModelProto
    report: FoldReport


def fold(model: onnx.ModelProto | str | os.PathLike, *, check: bool = True) -> FoldResult:
    """Fold every foldable BatchNormalization into the linear op in front of it.

    `model` is a ModelProto (never modified: the fold works on a copy) or a path. With `check`,
    the result must pass `onnx.checker` (full check) or this raises: BnfoldError when the input
    itself is invalid, InternalError when the fold broke a valid model.
    """
    start = time.perf_counter()
    if isinstance(model, (str, os.PathLike)):
        path = model
        folded = load_model(path)  # a fresh copy that only we hold
        original: Callable[[], onnx.ModelProto] = lambda: load_model(path)
    elif isinstance(model, onnx.ModelProto):
        folded = onnx.ModelProto()
        folded.CopyFrom(model)
        original = lambda: model
    else:
        raise TypeError(f"fold() takes an onnx.ModelProto or a path, not {type(model).__name__}")
    report = FoldReport(bytes_before=folded.ByteSize())
    report.outcomes = fold_model_graph(folded)
    if check:
        validate(folded, original)
    report.bytes_after = folded.ByteSize()
    report.seconds = time.perf_counter() - start
    return FoldResult(folded, report)


def fold_model_graph(model: onnx.ModelProto) -> list[FoldOutcome]:
    """Fold the main graph of `model` in place, in graph order, so chains fold step by step
    (Conv → Mul → Add: the Mul folds, then the Add folds into the same Conv). One outcome per
    BatchNormalization, and one per Mul/Add/Sub/Div that folded."""
    kinds = ("BatchNormalization", *ELEMENTWISE_AFFINE, *RUNTIME_NORMALIZATIONS)
    candidates = [n for n in model.graph.node if n.domain in ONNX_DOMAINS and n.op_type in kinds]
    if not candidates:
        return []
    opset = next((o.version for o in model.opset_import if o.domain in ONNX_DOMAINS), None)
    if opset is None:
        raise BnfoldError("the model uses ai.onnx operators but imports no ai.onnx opset")
    version = batch_norm_version(opset)
    index = GraphIndex(model.graph, ir_version=model.ir_version, opset=opset, opset_imports=list(model.opset_import))
    outcomes = []
    maybe_dead: list[str] = []
    for node in candidates:
        name, output = node.name or node.output[0], node.output[0]
        if node.op_type == "BatchNormalization":
            plan = plan_batch_norm(node, index, version, opset)
        elif node.op_type in RUNTIME_NORMALIZATIONS:
            plan = RUNTIME_STATISTICS  # reported, so a user who asks why sees the answer
        else:
            plan = plan_elementwise(node, index, opset)
            if isinstance(plan, Skip):
                continue  # most Mul/Add nodes are no candidates; only folds are reported
        if isinstance(plan, Skip):
            outcomes.append(FoldOutcome(name, output, op=node.op_type, reason=plan.reason))
            continue
        # read before the rewrite renames outputs (and turns a MatMul into a Gemm)
        linears = [part.linear for part in plan.parts] if isinstance(plan, ConcatPlan) else [plan.linear]
        into = ", ".join(linear.name or linear.output[0] for linear in linears)
        into_op = "/".join(sorted({linear.op_type for linear in linears}))
        if isinstance(plan, ConcatPlan):
            via = node_label(plan.concat)
            maybe_dead += plan.rewrite(index)
        else:
            via = None
            maybe_dead += plan.rule.rewrite(plan, index)
        outcomes.append(
            FoldOutcome(
                name, output, op=node.op_type, folded_into=into, folded_into_op=into_op,
                forward=getattr(plan, "forward", False), split_at=via,
            )
        )
    index.sweep(maybe_dead)
    index.commit()
    return outcomes


def validate(folded: onnx.ModelProto, original: Callable[[], onnx.ModelProto]) -> None:
    """onnx.checker with full_check (strict shape inference) on the result, and blame on failure."""
    try:
        _check(folded)
    except BnfoldError as folded_error:
        try:
            _check(original())
        except BnfoldError as input_error:
            raise BnfoldError(f"the input is not a valid ONNX model: {input_error}") from None
        raise InternalError(
            f"the folded model fails onnx.checker although the input passes: {folded_error}"
        ) from None


def _check(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BnfoldError(first_line(exc)) from None
