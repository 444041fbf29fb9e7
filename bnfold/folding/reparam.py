"""Structural re-parameterization: a sum of parallel branches, all affine in one tensor, merged
into one Conv.

RepVGG, MobileOne, FastViT's RepMixer and their kin train with parallel branches that are
summed, e.g. `BN(Conv3x3(x)) + BN(Conv1x1(x)) + BN(x)` or `x + γ·(BN(DWConv(x)) − BN(x))`.
After BN folding each branch is a term affine in the same x: a Conv of x (its BN folded in), a
BN of x, x itself; Add, Sub and Sum combine terms and Mul by a per-channel constant (a layer
scale) scales one. branches.py holds their algebra; this module reads a tree of sums as one
term and plans its merge (plan.py's protocol):

- match: the root Add/Sub/Sum and the tree of sums below it that nothing else reads; a tree
  that sums different tensors (a ResNet shortcut), has no conv or one branch, is NOT_MINE;
- checks: the branches line up (branches.add), and the merged weights fit the dtype;
- plan: the merged weight and bias, cast once; `MergePlan.rewrite` turns the root into the Conv.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfold.folding import affine
from bnfold.folding.branches import Term, add_all, bias_term, identity, with_channels
from bnfold.folding.correction import conv_input_moments, corrects, input_moments, rounding_note
from bnfold.folding.linear import LINEAR_OPS, cast_conv
from bnfold.folding.plan import NOT_MINE, NotMine, Plan, Refused, Skip
from bnfold.folding.sources import FLOAT_DTYPES, check_inference_mode, read_batch_norm
from bnfold.graph.constants import NotConstant
from bnfold.graph.context import GraphContext
from bnfold.graph.protos import is_onnx_op, node_label
from bnfold.report import FoldOutcome

MAX_DEPTH = 32  # layer scales (Mul) nested in one sum: real blocks need < 10; bounds the work per sum
CONV = LINEAR_OPS["Conv"]


@dataclass(frozen=True)
class MergePlan(Plan):
    source: onnx.NodeProto  # the root sum, which becomes the Conv
    term: Term  # the merged geometry, what it replaces and what it merged
    weight: np.ndarray  # merged and cast to the branches' dtype
    bias: np.ndarray
    name: str  # the Conv's
    rounding: str | None = None  # how a 16-bit merged weight was rounded

    @property
    def linears(self):
        return (self.source,)

    @property
    def via(self) -> str:
        return f"{len(self.term.branches)} branches ({', '.join(self.term.branches)})"

    @property
    def removed(self) -> list[onnx.NodeProto]:
        """The nodes merged away (the branches' Conv/BN/Mul/Add/Sub/Sum), the root aside."""
        return [node for node in self.term.nodes if node is not self.source]

    @property
    def absorbed(self) -> tuple[onnx.NodeProto, ...]:
        return tuple(node for node in self.removed if is_onnx_op(node, "BatchNormalization"))

    def outcome(self, prefix: str, op: str) -> FoldOutcome:
        """Named after the Conv the sum becomes."""
        return FoldOutcome(
            prefix + self.name, self.source.output[0], op=op, folded_into=self.name, folded_into_op="Conv",
            via=self.via, rounding=self.rounding,
        )  # fmt: skip

    def rewrite(self, ctx: GraphContext) -> None:
        """The root becomes the one Conv in place: it keeps its output name and its place in the
        graph's order, after x."""
        root, term = self.source, self.term
        first_conv = next(n for n in term.nodes if is_onnx_op(n, "Conv"))
        base = first_conv.name or first_conv.output[0]
        _memo(ctx).settle(term.nodes)  # decided: no other root of the pass is walked through them
        for old in self.removed:
            ctx.index.remove_node(old)
        ctx.index.truncate_inputs(root, 3)  # a Sum's others
        ctx.index.set_input(root, 0, term.x)
        ctx.index.set_input(root, 1, ctx.add_initializer(self.weight, f"{base}_reparam_W"))
        ctx.index.set_input(root, 2, ctx.add_initializer(self.bias, f"{base}_reparam_B"))
        root.op_type, root.domain, root.name = "Conv", "", self.name
        del root.attribute[:]
        root.attribute.extend(
            [
                onnx.helper.make_attribute("kernel_shape", list(term.kernel.shape[2:])),
                onnx.helper.make_attribute("strides", list(term.strides)),
                onnx.helper.make_attribute("dilations", list(term.dilations)),
                onnx.helper.make_attribute("pads", list(term.pads)),
                onnx.helper.make_attribute("group", term.group),
            ]
        )


@dataclass
class MergeMemo:
    """What one pass over a graph's sums has learnt: the sums whose tree cannot merge (each tree
    is walked once, not once per root in it), and the nodes already decided."""

    failed: dict[int, Skip | NotMine] = field(default_factory=dict)
    settled: set[int] = field(default_factory=set)

    def settle(self, nodes) -> None:
        self.settled.update(id(node) for node in nodes)


def _memo(ctx: GraphContext) -> MergeMemo:
    return ctx.memo.setdefault("branch merge", MergeMemo())


def plan_merge(root: onnx.NodeProto, ctx: GraphContext, version: int) -> MergePlan | Skip | NotMine:
    """The merge of the tree of sums at `root` (module docstring). Sums are offered from the
    graph's end (planner.MERGES), so the largest tree around a sum is merged, not a part of it;
    what the pass learns is in its memo (ctx.memo)."""
    memo = _memo(ctx)
    if id(root) in memo.settled or not is_sum(root):
        return NOT_MINE
    # match and checks: the tree as one term
    term = _term(root.output[0], ctx, version, root=True, failed=memo.failed)
    if isinstance(term, NotMine):  # not the shape the merge reads; a block's shape, it cannot merge
        block = _block_shape(root, ctx)
        if block is None:
            return term
        memo.settle(block.sums)  # one report per block, not one per sum in it
        return Skip(block.obstacle or term.why)
    if isinstance(term, Skip):
        return term
    if term.convs == 0 or len(term.branches) < 2:
        memo.settle(term.nodes)  # nor can a part of it: not tried again
        return NotMine("no conv among the branches, or only one branch")
    # plan
    dtype = np.dtype(term.dtype)
    if corrects(ctx, dtype):
        input_moments(ctx, root.output[0])  # the sum's statistics, while its branches still tell them
    moments = conv_input_moments(ctx, term.x, term.in_channels, dtype)
    try:
        cast = cast_conv(dtype, term.kernel, term.bias, term.group, moments)
    except Refused:
        raise Refused(f"the merged weights overflow {dtype}") from None
    first_conv = next(n for n in term.nodes if is_onnx_op(n, "Conv"))
    name = ctx.fresh_name(f"{first_conv.name or first_conv.output[0]}_reparam")  # the pass applies every plan
    return MergePlan(root, term, *cast, name, rounding_note(dtype, moments, ctx.scope.bias_correction))


def _term(
    name: str, ctx: GraphContext, version: int, root: bool = False, depth: int = 0, failed: dict | None = None
) -> Term | Skip | NotMine:
    """`name` as a Term in some x (`.x`), or why it is not one (`failed`: _sum_term's)."""
    if depth > MAX_DEPTH:
        return NotMine(f"the sum nests more than {MAX_DEPTH} layer scales (Mul) and sums")
    node = ctx.index.producer(name)
    if node is not None and not root and (len(ctx.index.readers(name)) != 1 or name in ctx.index.graph_outputs):
        node = None  # read elsewhere too: it cannot disappear into the merge, so it is the x
    if node is not None and is_sum(node):
        return _sum_term(node, ctx, version, depth, {} if failed is None else failed)
    if node is not None and is_onnx_op(node, "Mul") and len(node.input) == 2 and not root:
        return _scaled_term(node, ctx, version, depth)
    if node is not None and is_onnx_op(node, "Conv") and not root:
        return _conv_term(node, ctx)
    if node is not None and is_onnx_op(node, "BatchNormalization") and not root:
        return _batch_norm_term(node, ctx, version)
    if ctx.constants.why_not(name) is None:  # (one value per channel is a bias term: _constant_term)
        return NotMine(f"'{name}' is a constant that is not one value per channel")
    return identity(name)


@dataclass(frozen=True)
class BlockShape:
    sums: tuple[onnx.NodeProto, ...]  # the tree's sums, the root's first
    obstacle: str | None  # what the shape alone says stops the merge (a branch read elsewhere)


def _block_shape(root: onnx.NodeProto, ctx: GraphContext) -> BlockShape | None:
    """The tree of sums at `root` when it has a re-parameterizable block's shape, looked at
    through everything _term refuses: two or more branches, a Conv among them, each branch a
    Conv, a BN or an identity of one tensor x (through layer-scale Muls; constant leaves aside).
    A sum of other things (a ResNet shortcut: conv(relu(x)) + x) gives None: nothing to report."""
    sums, bases, branches, convs, obstacle = [], set(), 0, 0, None
    stack, seen = [(root.output[0], True)], set()
    while stack:
        name, at_root = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = ctx.index.producer(name)
        if node is not None and not at_root and (len(ctx.index.readers(name)) != 1 or name in ctx.index.graph_outputs):
            obstacle = obstacle or f"{node_label(node)}'s output is also read outside the sum: it cannot merge away"
        if node is not None and is_sum(node):
            sums.append(node)
            stack.extend((data, False) for data in node.input)
            continue
        data = [i for i in node.input if ctx.constants.why_not(i) is not None] if node is not None else []
        if node is not None and is_onnx_op(node, "Mul") and len(node.input) == 2 and len(data) == 1:
            stack.append((data[0], False))  # a layer scale
            continue
        if ctx.constants.why_not(name) is None:
            continue  # a constant leaf: a bias term
        branches += 1
        convs += node is not None and is_onnx_op(node, "Conv")
        of_x = node is not None and (is_onnx_op(node, "Conv") or is_onnx_op(node, "BatchNormalization"))
        bases.add(node.input[0] if of_x else name)
    if len(bases) != 1 or convs == 0 or branches < 2:
        return None
    return BlockShape(tuple(sums), obstacle)


def is_sum(node: onnx.NodeProto) -> bool:
    """An Add or Sub of two tensors, or a Sum of any number (how tf2onnx writes TF's AddN)."""
    if is_onnx_op(node, "Add") or is_onnx_op(node, "Sub"):
        return len(node.input) == 2
    return is_onnx_op(node, "Sum") and len(node.input) >= 1


def _sum_term(root: onnx.NodeProto, ctx: GraphContext, version: int, depth: int, failed: dict) -> Term | Skip | NotMine:
    """The tree of sums at `root` as one Term. A sum's input made by another sum that nothing
    else reads belongs to the tree; every other input is a leaf term. Walked with a stack, not
    recursion, so a chain of any length is one tree; each sum adds its inputs' terms left to
    right (a Sub negates its second). A tree that cannot merge fails for every sum above the
    one that failed: `failed` keeps them, so a later root inside the tree is not walked again."""
    leaves: dict[str, Term | None] = {}  # an input's constant term, evaluated once
    inners: dict[str, onnx.NodeProto | None] = {}  # the sum that makes an input, if in the tree

    def inner(name: str, reader: onnx.NodeProto) -> onnx.NodeProto | None:
        if name not in inners:
            node = ctx.index.producer(name)
            single = len(ctx.index.readers(name)) == 1 and name not in ctx.index.graph_outputs
            in_tree = node is not None and is_sum(node) and single
            if in_tree:
                leaves[name] = _constant_term(name, reader, ctx)
                in_tree = leaves[name] is None  # a sum of constants is a constant leaf
            inners[name] = node if in_tree else None
        return inners[name]

    def fail(why: Skip | NotMine) -> Skip | NotMine:
        failed.update((id(node), why) for node in stack)
        return why

    done: dict[int, Term] = {}
    stack = [root]
    while stack:
        node = stack[-1]
        if id(node) in failed:
            return fail(failed[id(node)])
        pending = [n for n in (inner(name, node) for name in node.input) if n is not None and id(n) not in done]
        if pending:
            stack.extend(reversed(pending))
            continue
        terms = []
        for name in node.input:
            below = inner(name, node)
            term = done.pop(id(below)) if below is not None else leaves.get(name) or _constant_term(name, node, ctx)
            term = term or _term(name, ctx, version, depth=depth + 1)
            if isinstance(term, (Skip, NotMine)):
                return fail(term)
            terms.append(term)
        stack.pop()
        if is_onnx_op(node, "Sub"):
            terms[1].kernel, terms[1].bias = -terms[1].kernel, -terms[1].bias
        merged = add_all(node, terms)
        if isinstance(merged, (Skip, NotMine)):
            stack.append(node)
            return fail(merged)
        done[id(node)] = merged
    return done[id(root)]


def _conv_term(conv: onnx.NodeProto, ctx: GraphContext) -> Term | Skip | NotMine:
    try:
        weight = ctx.constant(conv.input[1])
        bias = ctx.constant(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    except NotConstant as why:
        return NotMine(f"{node_label(conv)}'s parameters are not constant: {why}")
    if weight.ndim < 3:
        return NotMine(f"{node_label(conv)} has a weight of rank {weight.ndim}")
    if weight.dtype not in FLOAT_DTYPES:
        return Skip(f"{node_label(conv)} has a {weight.dtype} weight: branches are merged for float weights")
    try:
        geometry = CONV.geometry(conv, weight)
    except Refused as refusal:
        return NotMine(refusal.skip.reason)
    if geometry.pads is None:
        return NotMine(f"{node_label(conv)} pads with auto_pad={geometry.auto_pad} at stride {list(geometry.strides)}")
    return Term(
        kernel=weight,  # float64 only once merging starts: most Convs before an Add merge with nothing
        bias=np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64).reshape(-1),
        group=CONV.groups(conv),
        strides=geometry.strides,
        dilations=geometry.dilations,
        pads=geometry.pads,
        nodes=[conv],
        branches=[f"Conv '{conv.name or conv.output[0]}'"],
        convs=1,
        x=conv.input[0],
        dtype=weight.dtype,
    )


def _batch_norm_term(bn: onnx.NodeProto, ctx: GraphContext, version: int) -> Term | NotMine:
    """A BN with no conv before it, as a per-channel term; one that cannot fold is no branch."""
    blocked = check_inference_mode(bn, version, ctx)
    if blocked:
        return NotMine(blocked.reason)
    try:
        channels = ctx.constant(bn.input[1]).shape[0]
    except NotConstant as why:
        return NotMine(f"{node_label(bn)}'s scale is not constant: {why}")
    try:
        scale, shift = read_batch_norm(bn, ctx, channels)
    except Refused as refusal:
        return NotMine(refusal.skip.reason)
    term = identity(bn.input[0], channels)
    term.kernel = term.kernel * scale.reshape(-1, 1)
    term.bias = shift
    term.nodes, term.branches = [bn], [f"BatchNormalization '{bn.name or bn.output[0]}'"]
    return term


def _constant_term(name: str, add: onnx.NodeProto, ctx: GraphContext) -> Term | None:
    """A constant leaf of the sum, scalar or one value per channel: a bias term, affine in any x
    with weight 0 (FastViT's `scale_out = 0` beside an identity BN; a Cast of a scalar in the
    dynamo export). None when `name` is no such constant."""
    if ctx.constants.why_not(name) is not None:
        return None
    shape = ctx.shapes.shape(add.output[0])
    if shape is None or len(shape) < 3 or shape[1] is None:
        return None
    try:
        value = ctx.constant(name)
    except NotConstant:  # too large to evaluate (a gathered attention-bias table): not a leaf
        return None
    if value.dtype not in FLOAT_DTYPES:
        return None
    vector = affine.channel_vector(value, len(shape), shape[1])
    if vector is None or not np.isfinite(vector).all():
        return None
    return bias_term(vector)


def _scaled_term(mul: onnx.NodeProto, ctx: GraphContext, version: int, depth: int) -> Term | Skip | NotMine:
    """A term times a per-channel constant (a layer scale)."""
    for position in (0, 1):
        data, constant = mul.input[position], mul.input[1 - position]
        shape = ctx.shapes.shape(data)
        try:
            value = ctx.constant(constant)
        except NotConstant:
            continue
        if shape is None or len(shape) < 3 or shape[1] is None or value.dtype not in FLOAT_DTYPES:
            continue
        scale = affine.channel_vector(value, len(shape), shape[1])
        if scale is None:
            return NotMine(f"{node_label(mul)} multiplies by a constant that is not one value per channel")
        inner = _term(data, ctx, version, depth=depth + 1)
        if isinstance(inner, (Skip, NotMine)):
            return inner
        inner = with_channels(inner, shape[1])
        if inner.kernel.shape[0] != shape[1]:
            return NotMine(f"{node_label(mul)} scales {shape[1]} channels of a {inner.kernel.shape[0]}-channel term")
        inner.kernel = inner.kernel * scale.reshape((-1,) + (1,) * (inner.kernel.ndim - 1))
        inner.bias = inner.bias * scale
        inner.nodes.append(mul)
        return inner
    return NotMine(f"{node_label(mul)} multiplies by no per-channel constant")
