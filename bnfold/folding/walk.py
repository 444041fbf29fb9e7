"""The fold pass over one model: its functions, its main graph and the subgraphs inside it.

Each graph is folded in graph order, so chains fold step by step (Conv → Mul → Add: the Mul
folds, then the Add folds into the same Conv); then sums of branches are merged (reparam); then
what became dead is swept; and again, until a round changes nothing.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.folding.plan import Skip
from bnfold.folding.planner import plan_batch_norm, plan_elementwise
from bnfold.folding.reparam import Merge, merge_branches
from bnfold.folding.sources import (
    ELEMENTWISE_AFFINE,
    RUNTIME_NORMALIZATIONS,
    RUNTIME_STATISTICS,
    batch_norm_version,
)
from bnfold.graph.context import GraphContext, ModelScope
from bnfold.graph.protos import ONNX_DOMAINS, all_names, all_nodes, named_subgraphs
from bnfold.graph.tensors import Names, TensorReader, TensorStore, store_pending
from bnfold.report import BRANCH_MERGE, FoldOutcome

FOLD_KINDS = ("BatchNormalization", *ELEMENTWISE_AFFINE, *RUNTIME_NORMALIZATIONS)
# Folding and merging run to a fixed point: a merge makes a Conv that a BN after the sum folds
# into, a fold makes a Conv that joins a sum. Each round that changes the graph removes at least
# one node, so there are at most as many rounds as nodes; real networks need two or three.


def fold_model_graph(
    model: onnx.ModelProto,
    read_tensor: TensorReader,
    *,
    reparam: bool = True,
    bias_correction: bool = True,
    calibrated: dict | None = None,
) -> tuple[list[FoldOutcome], dict[str, np.ndarray]]:
    """Fold the main graph of `model` and the subgraphs in it (If/Loop/Scan bodies) in place.
    Returns one outcome per BatchNormalization and runtime-statistics normalization, and one
    per Mul/Add/Sub/Div that folded; and the values of the main graph's new initializers,
    which the GraphProto holds without data (bnfold.graph.tensors): `store_pending` or a
    streamed write gives them their data. `read_tensor` reads the model's own initializers;
    `calibrated`: measured moments of the main graph's tensors (bnfold.calibration)."""
    outcomes = _fold_functions(model, read_tensor, reparam, bias_correction)
    kinds = (*FOLD_KINDS, "Add", "Sub", "Sum") if reparam else FOLD_KINDS
    if not any(n.op_type in kinds for n in all_nodes(model.graph)):
        return outcomes, {}
    opset = _onnx_opset(model.opset_import)
    if opset is None:
        raise BnfoldError("the model uses ai.onnx operators but imports no ai.onnx opset")
    tensors = TensorStore(read_tensor)
    names = Names(all_names(model.graph))
    scope = ModelScope(
        model.ir_version, opset, list(model.opset_import), names, tensors, bias_correction, calibrated=calibrated or {}
    )
    graph_outcomes = _fold_graph(model.graph, scope, None, "", reparam)
    store_pending(model.graph, tensors.pending, subgraphs_only=True)
    return graph_outcomes + outcomes, tensors.pending


def _onnx_opset(imports) -> int | None:
    return next((o.version for o in imports if o.domain in ONNX_DOMAINS), None)


def _fold_functions(
    model: onnx.ModelProto, read_tensor: TensorReader, reparam: bool, bias_correction: bool
) -> list[FoldOutcome]:
    """Fold inside model-local functions. A function has no initializers: its body is folded as
    a graph whose inputs are the function's, and the folded tensors become Constant nodes."""
    outcomes = []
    for function in model.functions:
        if not any(n.op_type in FOLD_KINDS for n in function.node):
            continue  # (a function without BN is left alone, branches or not)
        imports = list(function.opset_import) or list(model.opset_import)
        opset = _onnx_opset(imports)
        if opset is None:
            continue  # the body uses no ai.onnx op, so no BatchNormalization either
        body = onnx.helper.make_graph(
            list(function.node),
            function.name,
            [onnx.ValueInfoProto(name=name) for name in function.input],
            [onnx.ValueInfoProto(name=name) for name in function.output],
        )
        tensors = TensorStore(read_tensor)
        names = Names(all_names(body))
        scope = ModelScope(max(model.ir_version, 4), opset, imports, names, tensors, bias_correction)
        found = _fold_graph(body, scope, None, f"function {function.domain}.{function.name}/", reparam)
        if any(o.folded for o in found):
            store_pending(body, tensors.pending)
            constants = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in body.initializer]
            del function.node[:]
            function.node.extend([*constants, *body.node])
        outcomes += found
    return outcomes


def _fold_graph(
    graph: onnx.GraphProto, scope: ModelScope, parent: GraphContext | None, prefix: str, reparam: bool
) -> list[FoldOutcome]:
    """Fold one graph (module docstring). Bodies first: their folds change what they read from
    this graph, which its index then re-reads."""
    outcomes: list[FoldOutcome] = []
    ctx = None
    for node in graph.node:
        for attr_name, body in named_subgraphs(node):
            ctx = ctx or GraphContext.build(graph, scope, parent)  # for constants the bodies read from here
            label = f"{prefix}{node.name or node.op_type}.{attr_name}/"
            outcomes += _fold_graph(body, scope, ctx, label, reparam)
            ctx.index.refresh_reads(node)
    candidates = [n for n in graph.node if n.domain in ONNX_DOMAINS and n.op_type in FOLD_KINDS]
    sums = reparam and any(n.op_type in ("Add", "Sub", "Sum") for n in graph.node)
    if not candidates and not sums and (ctx is None or not ctx.index.has_orphans):
        return outcomes
    ctx = ctx or GraphContext.build(graph, scope, parent)
    version = batch_norm_version(scope.opset)
    found: dict[tuple[str, str], FoldOutcome] = {}  # by (op, node): a later round's outcome replaces
    for _ in range(len(graph.node) + 1):
        folded = 0
        for node in [n for n in ctx.index.live_nodes() if n.domain in ONNX_DOMAINS and n.op_type in FOLD_KINDS]:
            outcome = _fold_node(node, ctx, version, prefix)
            if outcome is not None:
                folded += outcome.folded
                found[(outcome.op, outcome.node)] = outcome
        merges = []
        if sums:
            merges, refusals = merge_branches(ctx, version)
            _record_merges(found, merges, refusals, prefix)
        ctx.finish()
        if not folded and not merges:
            break
    return outcomes + list(found.values())


def _fold_node(node: onnx.NodeProto, ctx: GraphContext, version: int, prefix: str) -> FoldOutcome | None:
    """Plan and apply one candidate's fold; its outcome, or None for a Mul/Add/Sub/Div that is
    no candidate (most are not, and only their folds are reported)."""
    name, output, op = _name(prefix, node), node.output[0], node.op_type  # (a rewrite may change the node)
    if node.op_type == "BatchNormalization":
        plan = plan_batch_norm(node, ctx, version)
    elif node.op_type in RUNTIME_NORMALIZATIONS:
        plan = RUNTIME_STATISTICS  # reported, so a user who asks why sees the answer
    else:
        plan = plan_elementwise(node, ctx)
        if isinstance(plan, Skip):
            return None
    if isinstance(plan, Skip):
        return FoldOutcome(name, output, op=op, reason=plan.reason)
    # read before the rewrite renames outputs (and turns a MatMul into a Gemm)
    into = ", ".join(linear.name or linear.output[0] for linear in plan.linears)
    into_op = "/".join(sorted({linear.op_type for linear in plan.linears}))
    plan.rewrite(ctx)
    return FoldOutcome(
        name, output, op=op, folded_into=into, folded_into_op=into_op, forward=plan.forward, via=plan.via,
        rounding=plan.rounding,
    )  # fmt: skip


def _name(prefix: str, node: onnx.NodeProto) -> str:
    return prefix + (node.name or node.output[0])


def _record_merges(found: dict, merges: list[Merge], refusals: list, prefix: str) -> None:
    """Each merged BatchNormalization shown as folded into the merged Conv, one outcome per
    merge (replacing an earlier round's refusal of that sum), one per refusal."""
    for merge in merges:
        for node in merge.removed:
            key = ("BatchNormalization", _name(prefix, node))
            if node.op_type == "BatchNormalization" and key in found:
                found[key] = FoldOutcome(
                    found[key].node,
                    found[key].output,
                    folded_into=merge.conv.name,
                    folded_into_op="Conv",
                    via="merged with the branches beside it",
                )
    for merge in merges:
        found.pop((BRANCH_MERGE, prefix + merge.root_name), None)
        found[(BRANCH_MERGE, prefix + merge.conv.name)] = FoldOutcome(
            prefix + merge.conv.name,
            merge.conv.output[0],
            op=BRANCH_MERGE,
            folded_into=merge.conv.name,
            folded_into_op="Conv",
            via=f"{len(merge.branches)} branches ({', '.join(merge.branches)})",
            rounding=merge.rounding,
        )
    for refusal in refusals:
        name = _name(prefix, refusal.root)
        found[(BRANCH_MERGE, name)] = FoldOutcome(name, refusal.root.output[0], op=BRANCH_MERGE, reason=refusal.reason)
