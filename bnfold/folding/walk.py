"""The fold pass over one model: its functions, its main graph and the subgraphs inside it.

Each graph is folded in graph order, so chains fold step by step (Conv → Mul → Add: the Mul
folds, then the Add folds into the same Conv); then sums of branches are merged (reparam); then
what became dead is swept; and again, until a round changes nothing.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.folding.plan import Skip, decide
from bnfold.folding.planner import CANDIDATES
from bnfold.folding.reparam import MergeMemo, MergePlan, plan_merge
from bnfold.folding.sources import batch_norm_version
from bnfold.graph.context import GraphContext, ModelScope
from bnfold.graph.protos import ONNX_DOMAINS, all_names, all_nodes, named_subgraphs
from bnfold.graph.tensors import Names, TensorReader, TensorStore, store_pending
from bnfold.report import BRANCH_MERGE, FoldOutcome

FOLD_KINDS = tuple(CANDIDATES)
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
    requantize: bool = False,
) -> tuple[list[FoldOutcome], dict[str, np.ndarray]]:
    """Fold the main graph of `model` and the subgraphs in it (If/Loop/Scan bodies) in place.
    Returns one outcome per BatchNormalization and runtime-statistics normalization, and one
    per Mul/Add/Sub/Div that folded; and the values of the main graph's new initializers,
    which the GraphProto holds without data (bnfold.graph.tensors): `store_pending` or a
    streamed write gives them their data. `read_tensor` reads the model's own initializers;
    `calibrated`: measured moments of the main graph's tensors (bnfold.calibration);
    `requantize`: fold across a quantizer (bnfold.folding.quantized)."""
    outcomes = _fold_functions(model, read_tensor, reparam, bias_correction, requantize)
    kinds = (*FOLD_KINDS, "Add", "Sub", "Sum") if reparam else FOLD_KINDS
    if not any(n.op_type in kinds for n in all_nodes(model.graph)):
        return outcomes, {}
    opset = _onnx_opset(model.opset_import)
    if opset is None:
        raise BnfoldError("the model uses ai.onnx operators but imports no ai.onnx opset")
    tensors = TensorStore(read_tensor)
    names = Names(all_names(model.graph))
    scope = ModelScope(
        model.ir_version, opset, list(model.opset_import), names, tensors, bias_correction, requantize,
        calibrated=calibrated or {},
    )  # fmt: skip
    graph_outcomes = _fold_graph(model.graph, scope, None, "", reparam)
    store_pending(model.graph, tensors.pending, subgraphs_only=True)
    return graph_outcomes + outcomes, tensors.pending


def _onnx_opset(imports) -> int | None:
    return next((o.version for o in imports if o.domain in ONNX_DOMAINS), None)


def _fold_functions(
    model: onnx.ModelProto, read_tensor: TensorReader, reparam: bool, bias_correction: bool, requantize: bool
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
        scope = ModelScope(max(model.ir_version, 4), opset, imports, names, tensors, bias_correction, requantize)
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
        merges = _merge_sums(ctx, version, prefix, found) if sums else 0
        ctx.finish()
        if not folded and not merges:
            break
    return outcomes + list(found.values())


def _fold_node(node: onnx.NodeProto, ctx: GraphContext, version: int, prefix: str) -> FoldOutcome | None:
    """Plan and apply one candidate's fold; its outcome, or None for a refusal the report does
    not list (a Mul/Add/Sub/Div: most are no candidate, and only their folds are reported)."""
    name, output, op = _name(prefix, node), node.output[0], node.op_type  # (a rewrite may change the node)
    mechanisms = CANDIDATES[node.op_type]
    plan = decide(node, mechanisms, ctx, version)
    if isinstance(plan, Skip):
        return FoldOutcome(name, output, op=op, reason=plan.reason) if mechanisms.reported else None
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


def _merge_sums(ctx: GraphContext, version: int, prefix: str, found: dict) -> int:
    """Offer every sum to the branch merge, from the graph's end (reparam.plan_merge), apply the
    plans and record them; how many merged."""
    memo, merged, refused = MergeMemo(), [], []
    for node in reversed(ctx.index.live_nodes()):
        answer = plan_merge(node, ctx, version, memo)  # NOT_MINE for all but sums
        if isinstance(answer, Skip):
            refused.append((node, answer))
        elif isinstance(answer, MergePlan):
            root_name = node.name or node.output[0]  # before it becomes the Conv
            answer.rewrite(ctx)
            memo.settle(answer.term.nodes)
            merged.append((root_name, answer))
    _record_merges(found, merged[::-1], refused[::-1], prefix)
    return len(merged)


def _record_merges(found: dict, merged: list[tuple[str, MergePlan]], refused: list, prefix: str) -> None:
    """Each merged BatchNormalization shown as folded into the merged Conv, one outcome per
    merge (replacing an earlier round's refusal of that sum), one per refusal; in graph order."""
    for _, plan in merged:
        for node in plan.removed:
            key = ("BatchNormalization", _name(prefix, node))
            if node.op_type == "BatchNormalization" and key in found:
                found[key] = FoldOutcome(
                    found[key].node,
                    found[key].output,
                    folded_into=plan.source.name,
                    folded_into_op="Conv",
                    via="merged with the branches beside it",
                )
    for root_name, plan in merged:
        conv = plan.source
        found.pop((BRANCH_MERGE, prefix + root_name), None)
        found[(BRANCH_MERGE, prefix + conv.name)] = FoldOutcome(
            prefix + conv.name,
            conv.output[0],
            op=BRANCH_MERGE,
            folded_into=conv.name,
            folded_into_op="Conv",
            via=plan.via,
            rounding=plan.rounding,
        )
    for root, skip in refused:
        name = _name(prefix, root)
        found[(BRANCH_MERGE, name)] = FoldOutcome(name, root.output[0], op=BRANCH_MERGE, reason=skip.reason)
