"""The fold pass: index the graph, check each BatchNormalization, fold, sweep, validate."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from bnfold import modelfile, wire
from bnfold.errors import BnfoldError, InternalError, first_line
from bnfold.graph import ONNX_DOMAINS, GraphIndex, TensorLoader, all_names, named_subgraphs, store_new_values
from bnfold.modelfile import load_model, serialized_size
from bnfold.reparam import Merge, merge_branches
from bnfold.report import BRANCH_MERGE, FoldOutcome, FoldReport
from bnfold.rules import (
    ELEMENTWISE_AFFINE,
    RUNTIME_NORMALIZATIONS,
    RUNTIME_STATISTICS,
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


def fold(model: onnx.ModelProto | str | os.PathLike, *, check: bool = True, reparam: bool = True) -> FoldResult:
    """Fold every foldable BatchNormalization (and per-channel Mul/Add/Sub/Div) into the linear
    op next to it; see the README's "What is folded" for the patterns and their preconditions.

    With `reparam`, sums of parallel branches affine in one tensor are then merged into one
    Conv (bnfold.reparam: RepVGG, MobileOne, RepMixer blocks).

    `model` is a ModelProto (never modified: the fold works on a copy) or a path. With `check`,
    the result must pass `onnx.checker` (full check) or this raises: BnfoldError when the input
    itself is invalid, InternalError when the fold broke a valid model.
    """
    start = time.perf_counter()
    if isinstance(model, (str, os.PathLike)):
        original: onnx.ModelProto | str = str(model)
        folded = load_model(model)  # a fresh copy that only we hold
    elif isinstance(model, onnx.ModelProto):
        original = model
        folded = onnx.ModelProto()
        folded.CopyFrom(model)
    else:
        raise TypeError(f"fold() takes an onnx.ModelProto or a path, not {type(model).__name__}")
    report = FoldReport(bytes_before=serialized_size(folded))
    report.outcomes, new_values = fold_in_place(folded, original, reparam=reparam)
    store_new_values(folded.graph, new_values)
    report.bytes_after = serialized_size(folded)
    if check:
        if report.bytes_after > modelfile.SINGLE_FILE_LIMIT:
            raise BnfoldError(
                "the folded model is over 2 GiB, and onnx.checker reads such a model only from disk: "
                "`bnfold optimize` checks it there (fold(..., check=False) skips the check)"
            )
        validate(folded, original)
    report.seconds = time.perf_counter() - start
    return FoldResult(folded, report)


def fold_in_place(
    model: onnx.ModelProto,
    original: onnx.ModelProto | str,
    load_tensor: TensorLoader = wire.read_tensor,
    *,
    reparam: bool = True,
) -> tuple[list[FoldOutcome], dict[str, np.ndarray]]:
    """fold_model_graph, with a crash blamed on the input when the input is invalid: a broken
    model can break what any valid one guarantees (an unknown data type, a dangling name)."""
    try:
        return fold_model_graph(model, load_tensor, reparam=reparam)
    except (BnfoldError, InternalError):
        raise
    except Exception:
        _check_input(original)
        raise


@dataclass(frozen=True)
class _Scope:
    """What every graph of one model shares while it is folded."""

    ir_version: int
    opset: int
    opset_imports: list
    names: set[str]  # every name in the model: fresh names must shadow none
    reparam: bool  # merge sums of parallel branches (bnfold.reparam)
    new_values: dict[str, np.ndarray]  # the data of the tensors the fold created, by name
    load_tensor: TensorLoader

    def index(self, graph: onnx.GraphProto, parent: GraphIndex | None) -> GraphIndex:
        return GraphIndex(
            graph,
            ir_version=self.ir_version,
            opset=self.opset,
            opset_imports=self.opset_imports,
            parent=parent,
            names=self.names,
            new_values=self.new_values,
            load_tensor=self.load_tensor,
        )


FOLD_KINDS = ("BatchNormalization", *ELEMENTWISE_AFFINE, *RUNTIME_NORMALIZATIONS)


def fold_model_graph(
    model: onnx.ModelProto, load_tensor: TensorLoader = wire.read_tensor, *, reparam: bool = True
) -> tuple[list[FoldOutcome], dict[str, np.ndarray]]:
    """Fold the main graph of `model` and the subgraphs in it (If/Loop/Scan bodies) in place.
    Returns one outcome per BatchNormalization and runtime-statistics normalization, and one
    per Mul/Add/Sub/Div that folded; and the values of the main graph's new initializers,
    which the GraphProto holds without data (GraphIndex.new_values): store_new_values or a
    streamed write (modelfile.StagedModel) gives them their data."""
    outcomes = _fold_functions(model, reparam)
    kinds = (*FOLD_KINDS, "Add", "Sub") if reparam else FOLD_KINDS
    if not any(n.op_type in kinds for n in _all_nodes(model.graph)):
        return outcomes, {}
    opset = next((o.version for o in model.opset_import if o.domain in ONNX_DOMAINS), None)
    if opset is None:
        raise BnfoldError("the model uses ai.onnx operators but imports no ai.onnx opset")
    scope = _Scope(
        model.ir_version, opset, list(model.opset_import), set(all_names(model.graph)), reparam, {}, load_tensor
    )
    graph_outcomes, _ = _fold_graph(model.graph, scope, parent=None, prefix="")
    store_new_values(model.graph, scope.new_values, subgraphs_only=True)
    return graph_outcomes + outcomes, scope.new_values


def _fold_functions(model: onnx.ModelProto, reparam: bool) -> list[FoldOutcome]:
    """Fold inside model-local functions. A function has no initializers: its body is folded as
    a graph whose inputs are the function's, and the folded tensors become Constant nodes."""
    outcomes = []
    for function in model.functions:
        if not any(n.op_type in FOLD_KINDS for n in function.node):
            continue  # (a function without BN is left alone, branches or not)
        imports = list(function.opset_import) or list(model.opset_import)
        opset = next((o.version for o in imports if o.domain in ONNX_DOMAINS), None)
        if opset is None:
            continue  # the body uses no ai.onnx op, so no BatchNormalization either
        body = onnx.helper.make_graph(
            list(function.node),
            function.name,
            [onnx.ValueInfoProto(name=name) for name in function.input],
            [onnx.ValueInfoProto(name=name) for name in function.output],
        )
        scope = _Scope(max(model.ir_version, 4), opset, imports, set(all_names(body)), reparam, {}, wire.read_tensor)
        found, _ = _fold_graph(body, scope, parent=None, prefix=f"function {function.domain}.{function.name}/")
        if any(o.folded for o in found):
            store_new_values(body, scope.new_values)
            constants = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in body.initializer]
            del function.node[:]
            function.node.extend([*constants, *body.node])
        outcomes += found
    return outcomes


def _fold_graph(
    graph: onnx.GraphProto, scope: _Scope, parent: GraphIndex | None, prefix: str
) -> tuple[list[FoldOutcome], list[str]]:
    """Fold one graph in graph order, so chains fold step by step (Conv → Mul → Add: the Mul
    folds, then the Add folds into the same Conv). Bodies first: their folds change what they
    read from this scope, which this scope's index must see. Returns the outcomes and the names
    from enclosing scopes that this graph stopped reading (for their sweep)."""
    outcomes: list[FoldOutcome] = []
    maybe_dead: list[str] = []
    if any(True for n in graph.node for _ in named_subgraphs(n)):
        lookup = scope.index(graph, parent)  # constants the bodies may read from this scope
        for node in graph.node:
            for attr_name, body in named_subgraphs(node):
                label = f"{prefix}{node.name or node.op_type}.{attr_name}/"
                body_outcomes, escaped = _fold_graph(body, scope, lookup, label)
                outcomes += body_outcomes
                maybe_dead += escaped
    candidates = [n for n in graph.node if n.domain in ONNX_DOMAINS and n.op_type in FOLD_KINDS]
    sums = scope.reparam and any(n.op_type in ("Add", "Sub") for n in graph.node)
    if not candidates and not maybe_dead and not sums:
        return outcomes, []
    index = scope.index(graph, parent)
    version = batch_norm_version(scope.opset)
    for node in candidates:
        name, output = prefix + (node.name or node.output[0]), node.output[0]
        if node.op_type == "BatchNormalization":
            plan = plan_batch_norm(node, index, version, scope.opset)
        elif node.op_type in RUNTIME_NORMALIZATIONS:
            plan = RUNTIME_STATISTICS  # reported, so a user who asks why sees the answer
        else:
            plan = plan_elementwise(node, index, scope.opset)
            if isinstance(plan, Skip):
                continue  # most Mul/Add nodes are no candidates; only folds are reported
        if isinstance(plan, Skip):
            outcomes.append(FoldOutcome(name, output, op=node.op_type, reason=plan.reason))
            continue
        # read before the rewrite renames outputs (and turns a MatMul into a Gemm)
        into = ", ".join(linear.name or linear.output[0] for linear in plan.linears)
        into_op = "/".join(sorted({linear.op_type for linear in plan.linears}))
        maybe_dead += plan.rewrite(index)
        outcomes.append(
            FoldOutcome(
                name,
                output,
                op=node.op_type,
                folded_into=into,
                folded_into_op=into_op,
                forward=plan.forward,
                via=plan.via,
            )
        )
    if sums:
        merges, refusals, dead = merge_branches(index, version)
        maybe_dead += dead
        outcomes = _with_merges(outcomes, merges, prefix)
        outcomes += [
            FoldOutcome(prefix + (r.root.name or r.root.output[0]), r.root.output[0], op=BRANCH_MERGE, reason=r.reason)
            for r in refusals
        ]
    index.sweep(maybe_dead)
    index.commit()
    return outcomes, [n for n in maybe_dead if n and not index.defines(n)]


def _with_merges(outcomes: list[FoldOutcome], merges: list[Merge], prefix: str) -> list[FoldOutcome]:
    """The outcomes with each merged BatchNormalization shown as folded into the merged Conv,
    and one outcome per merge."""
    merged_into = {}
    for merge in merges:
        for node in merge.removed:
            if node.op_type == "BatchNormalization":
                merged_into[prefix + (node.name or node.output[0])] = merge
    result = []
    for outcome in outcomes:
        merge = merged_into.get(outcome.node)
        if merge is not None and outcome.op == "BatchNormalization":
            outcome = FoldOutcome(
                outcome.node,
                outcome.output,
                folded_into=merge.conv.name,
                folded_into_op="Conv",
                via="merged with the branches beside it",
            )
        result.append(outcome)
    for merge in merges:
        result.append(
            FoldOutcome(
                prefix + merge.conv.name,
                merge.conv.output[0],
                op=BRANCH_MERGE,
                folded_into=merge.conv.name,
                folded_into_op="Conv",
                via=f"{len(merge.branches)} branches ({', '.join(merge.branches)})",
            )
        )
    return result


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for _, body in named_subgraphs(node):
            yield from _all_nodes(body)


def validate(candidate: onnx.ModelProto | str, original: onnx.ModelProto | str) -> None:
    """onnx.checker with full_check (strict shape inference) on the result, and blame on failure.
    Either may be a ModelProto or a path (the checker needs a path past protobuf's 2 GiB)."""
    try:
        _check(candidate)
    except BnfoldError as folded_error:
        _check_input(original)
        raise InternalError(f"the folded model fails onnx.checker although the input passes: {folded_error}") from None


def validate_skeleton(
    model: onnx.ModelProto, new_values: dict[str, np.ndarray], source_folder: Path | None, original: str
) -> None:
    """validate() for a folded model that is to be streamed to disk (modelfile.StagedModel): the
    checker reads its skeleton (wire.write_skeleton), the graph whole but large tensors
    without their data, so checking costs no second parse of the weights."""
    with tempfile.TemporaryDirectory(prefix="bnfold-check-") as folder:
        validate(str(wire.write_skeleton(model, new_values, source_folder, Path(folder))), original)


def _check_input(original: onnx.ModelProto | str) -> None:
    try:
        _check(original)
    except BnfoldError as input_error:
        raise BnfoldError(f"the input is not a valid ONNX model: {input_error}") from None


def _check(model: onnx.ModelProto | str) -> None:
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else str(model), full_check=True)
    except Exception as exc:  # ValidationError, InferenceError, and ValueError for bad enums
        raise BnfoldError(first_line(exc)) from None
