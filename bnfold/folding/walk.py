"""The fold pass over one model: its functions, its main graph and the subgraphs inside it.

Each graph is folded in graph order, so chains fold step by step (Conv → Mul → Add: the Mul
folds, then the Add folds into the same Conv); then sums of branches are merged (reparam); then
what became dead is swept; and again, until a round changes nothing.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.folding.plan import Pass, Plan, decide
from bnfold.folding.planner import CANDIDATES, FOLDS, MERGES
from bnfold.folding.sources import batch_norm_version, remember_batch_norm
from bnfold.graph.context import GraphContext, ModelScope
from bnfold.graph.protos import ONNX_DOMAINS, all_names, all_nodes, named_subgraphs
from bnfold.graph.tensors import Names, TensorReader, TensorStore, store_pending
from bnfold.report import FoldOutcome

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
    kinds = (*FOLD_KINDS, *MERGES.tables) if reparam else FOLD_KINDS
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
    passes = [p for p in (FOLDS, MERGES) if reparam or p is not MERGES]
    if not any(_offered(n, p) for n in graph.node for p in passes) and (ctx is None or not ctx.index.has_orphans):
        return outcomes
    ctx = ctx or GraphContext.build(graph, scope, parent)
    version = batch_norm_version(scope.opset)
    found: dict[tuple[str, str], FoldOutcome] = {}  # by (kind, node): a later round's outcome replaces
    for _ in range(len(graph.node) + 1):
        changed = sum(_run_pass(one, ctx, version, prefix, found) for one in passes)
        ctx.finish()
        if not changed:
            break
    return outcomes + list(found.values())


def _offered(node: onnx.NodeProto, one: Pass) -> bool:
    return node.domain in ONNX_DOMAINS and node.op_type in one.tables


def _run_pass(one: Pass, ctx: GraphContext, version: int, prefix: str, found: dict) -> int:
    """Offer every live node of the pass's kinds to its table (plan.decide), in the pass's
    order; apply each plan at once; record the outcomes in graph order. How many plans applied."""
    ctx.memo.clear()
    nodes = [n for n in ctx.index.live_nodes() if _offered(n, one)]
    results = []
    for node in reversed(nodes) if one.from_the_end else nodes:
        table = one.tables[node.op_type]
        kind = table.label or node.op_type
        key = (kind, _name(prefix, node))  # before a rewrite renames it
        answer = decide(node, table, ctx, version)
        if isinstance(answer, Plan):
            outcome = answer.outcome(prefix, kind)  # read before the rewrite
            absorbed = [(n.op_type, _name(prefix, n)) for n in answer.absorbed]
            if node.op_type == "BatchNormalization":
                remember_batch_norm(node, ctx)  # its statistics, by the name its output keeps
            answer.rewrite(ctx)
            results.append((key, outcome, absorbed))
        elif answer is not None and table.reported:
            results.append((key, FoldOutcome(key[1], node.output[0], op=kind, reason=answer.reason), []))
    for key, outcome, absorbed in results[::-1] if one.from_the_end else results:
        for taken in absorbed:  # an earlier refusal of a node the plan took away, now folded into its op
            if taken in found:
                found[taken] = replace(
                    found[taken], folded_into=outcome.folded_into, folded_into_op=outcome.folded_into_op,
                    via="merged with the branches beside it", reason=None,
                )  # fmt: skip
        if key != (outcome.op, outcome.node):  # renamed (a merged sum is named after its Conv)
            found.pop(key, None)
        found[(outcome.op, outcome.node)] = outcome
    return sum(outcome.folded for _, outcome, _ in results)


def _name(prefix: str, node: onnx.NodeProto) -> str:
    return prefix + (node.name or node.output[0])
