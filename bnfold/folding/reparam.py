"""Structural re-parameterization: merge parallel branches that are all affine in one tensor.

RepVGG, MobileOne, FastViT's RepMixer and their kin train with parallel branches that are
summed, e.g. `BN(Conv3x3(x)) + BN(Conv1x1(x)) + BN(x)` or `x + γ·(BN(DWConv(x)) − BN(x))`.
After BN folding each branch is a term affine in the same x:

    Conv(x; W, b)      a conv of x (its BN already folded in),
    BN(x) = s·x + t    a per-channel affine (a BN with no conv to fold into),
    x                  the identity,

and Add, Sub and Mul by a per-channel constant (layer scale) combine terms linearly. Every
such term is itself a conv of x: BN(x) is the 1×1 depthwise conv with weights s and bias t, x
the one with weights 1. Convs that share stride add up into one conv, exactly:

    Conv(x; W₁, b₁) + Conv(x; W₂, b₂) = Conv(x; W₁ ⊕ W₂, b₁ + b₂)

when the kernels line up in the larger one (a k-wide kernel with begin pad p sits at offset
j₀ = (P − p)/d in a K-wide kernel with begin pad P, and the end pads agree likewise), and a
group-g kernel is a special case of a group-g' kernel when g' divides g (block-diagonal).
Kernels and biases are summed in float64 and rounded once to the weight's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import gcd

import numpy as np
import onnx

from bnfold.folding import affine
from bnfold.folding.correction import conv_input_moments, corrects, input_moments, rounding_note
from bnfold.folding.linear import cast_conv
from bnfold.folding.plan import Skip
from bnfold.folding.sources import check_inference_mode, read_batch_norm
from bnfold.graph.constants import NotConstant
from bnfold.graph.context import GraphContext
from bnfold.graph.protos import is_onnx_op, node_label, str_attr

MAX_DEPTH = 32  # layer scales (Mul) nested in one sum: real blocks need < 10; bounds the work per sum


@dataclass
class Term:
    """A tensor affine in x, as Conv(x; kernel, bias) with this geometry (float64 once merged)."""

    kernel: np.ndarray  # [C_out, C_in / group, k…]; a Conv's own until it meets another term
    bias: np.ndarray  # [C_out]
    group: int
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # ONNX order: begins, then ends
    nodes: list  # the nodes this term replaces
    branches: list[str]  # what was merged, for the report
    convs: int  # how many Conv nodes it replaces
    x: str = ""  # the tensor every branch reads
    dtype: np.dtype | None = None  # the Conv weights' dtype (None: no conv among the branches yet)
    rounding: str | None = None  # how a 16-bit merged weight was rounded (set by _replace)

    @property
    def in_channels(self) -> int:
        return self.kernel.shape[1] * self.group


@dataclass
class Merge:
    """A sum of branches merged into one Conv: the root Add/Sub node, turned into that Conv."""

    conv: onnx.NodeProto
    removed: list  # the nodes merged away (the branches' Conv/BN/Mul/Add/Sub)
    branches: list[str]
    root_name: str = ""  # the root Add/Sub's name (or output) before it became the Conv
    rounding: str | None = None  # how a 16-bit merged weight was rounded


@dataclass(frozen=True)
class Mismatch(Skip):
    """Branches of one tensor, with at least one conv, that cannot be merged: reported (a sum of
    different tensors, such as a ResNet shortcut, is no candidate and is not)."""


@dataclass
class Refusal:
    root: onnx.NodeProto
    reason: str


def merge_branches(ctx: GraphContext, version: int) -> tuple[list[Merge], list[Refusal]]:
    """Merge every Add/Sub/Sum tree of branches affine in one tensor into one Conv. Trees are
    tried from the graph's end, so the largest tree around a sum is merged, not a part of it.
    Returns the merges (in graph order) and the refusals worth reporting (Mismatch)."""
    merges, refusals, removed = [], [], set()  # removed: merged, or part of a tree that cannot merge
    failed: dict[int, Skip] = {}  # sums whose tree cannot merge: each is walked once, not once per root
    for node in reversed(ctx.index.live_nodes()):
        if id(node) in removed or not is_sum(node):
            continue
        term = _term(node.output[0], ctx, version, root=True, failed=failed)
        if isinstance(term, Mismatch):
            refusals.append(Refusal(node, term.reason))
        if isinstance(term, Skip):
            continue
        if term.convs == 0 or len(term.branches) < 2:
            removed.update(id(old) for old in term.nodes)  # nor can a part of it: not tried again
            continue
        root_name = node.name or node.output[0]
        if not _replace(node, term, ctx):
            refusals.append(Refusal(node, f"the merged weights overflow {np.dtype(term.dtype)}"))
            continue
        removed.update(id(old) for old in term.nodes)
        removed_nodes = [old for old in term.nodes if old is not node]
        merges.append(Merge(node, removed_nodes, term.branches, root_name, term.rounding))
    return merges[::-1], refusals[::-1]


def _term(
    name: str, ctx: GraphContext, version: int, root: bool = False, depth: int = 0, failed: dict | None = None
) -> Term | Skip:
    """`name` as a Term in some x (`.x`), or why it is not one (`failed`: _sum_term's)."""
    if depth > MAX_DEPTH:
        return Skip(f"the sum nests more than {MAX_DEPTH} layer scales (Mul) and sums")
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
    return _identity(name)


def is_sum(node: onnx.NodeProto) -> bool:
    """An Add or Sub of two tensors, or a Sum of any number (how tf2onnx writes TF's AddN)."""
    if is_onnx_op(node, "Add") or is_onnx_op(node, "Sub"):
        return len(node.input) == 2
    return is_onnx_op(node, "Sum") and len(node.input) >= 1


def _sum_term(root: onnx.NodeProto, ctx: GraphContext, version: int, depth: int, failed: dict) -> Term | Skip:
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

    def fail(why: Skip) -> Skip:
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
            if isinstance(term, Skip):
                return fail(term)
            terms.append(term)
        stack.pop()
        if is_onnx_op(node, "Sub"):
            terms[1].kernel, terms[1].bias = -terms[1].kernel, -terms[1].bias
        merged = _add_all(node, terms)
        if isinstance(merged, Skip):
            stack.append(node)
            return fail(merged)
        done[id(node)] = merged
    return done[id(root)]


def _add_all(node: onnx.NodeProto, terms: list[Term]) -> Term | Skip:
    """The sum `node` of its inputs' terms, left to right."""
    merged = terms[0]
    for term in terms[1:]:
        if merged.x and term.x and merged.x != term.x:
            return Skip(f"{node_label(node)} sums terms of different tensors ('{merged.x}', '{term.x}')")
        x = merged.x or term.x  # a constant term is affine in any x
        merged = _add(merged, term)
        if isinstance(merged, Skip):
            return merged
        merged.x = x
    merged.nodes.append(node)
    return merged


def _conv_term(conv: onnx.NodeProto, ctx: GraphContext) -> Term | Skip:
    attrs = {a.name: a for a in conv.attribute}
    auto_pad = str_attr(conv, "auto_pad", "NOTSET")
    try:
        weight = ctx.constant(conv.input[1])
        bias = ctx.constant(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    except NotConstant as why:
        return Skip(f"{node_label(conv)}'s parameters are not constant: {why}")
    if weight.ndim < 3:
        return Skip(f"{node_label(conv)} has a weight of rank {weight.ndim}")
    if weight.dtype not in (np.float16, np.float32, np.float64):  # reported, so a bfloat16 model says why
        return Mismatch(f"{node_label(conv)} has a {weight.dtype} weight: branches are merged for float16, 32 and 64")
    spatial = weight.ndim - 2
    strides = tuple(attrs["strides"].ints) if "strides" in attrs else (1,) * spatial
    dilations = tuple(attrs["dilations"].ints) if "dilations" in attrs else (1,) * spatial
    pads = tuple(attrs["pads"].ints) if "pads" in attrs else (0,) * (2 * spatial)
    if auto_pad == "VALID":
        pads = (0,) * (2 * spatial)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if any(s != 1 for s in strides):  # then the padding depends on the input's size
            return Skip(f"{node_label(conv)} pads with auto_pad={auto_pad} at stride {list(strides)}")
        totals = [d * (k - 1) for d, k in zip(dilations, weight.shape[2:])]
        extra_at_end = auto_pad == "SAME_UPPER"  # ONNX Conv: SAME_UPPER puts the odd pad at the end
        begins = [t // 2 if extra_at_end else t - t // 2 for t in totals]
        pads = tuple(begins) + tuple(t - b for t, b in zip(totals, begins))
    elif auto_pad != "NOTSET":
        return Skip(f"{node_label(conv)} has auto_pad={auto_pad}")
    return Term(
        kernel=weight,  # float64 only once merging starts: most Convs before an Add merge with nothing
        bias=np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64).reshape(-1),
        group=attrs["group"].i if "group" in attrs else 1,
        strides=strides,
        dilations=dilations,
        pads=pads,
        nodes=[conv],
        branches=[f"Conv '{conv.name or conv.output[0]}'"],
        convs=1,
        x=conv.input[0],
        dtype=weight.dtype,
    )


def _batch_norm_term(bn: onnx.NodeProto, ctx: GraphContext, version: int) -> Term | Skip:
    blocked = check_inference_mode(bn, version, ctx)
    if blocked:
        return blocked
    try:
        channels = ctx.constant(bn.input[1]).shape[0]
    except NotConstant as why:
        return Skip(f"{node_label(bn)}'s scale is not constant: {why}")
    scale_shift = read_batch_norm(bn, ctx, channels)
    if isinstance(scale_shift, Skip):
        return scale_shift
    scale, shift = scale_shift
    term = _identity(bn.input[0], channels)
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
    if value.dtype not in (np.float16, np.float32, np.float64):
        return None
    vector = affine.channel_vector(value, len(shape), shape[1])
    if vector is None or not np.isfinite(vector).all():
        return None
    channels = shape[1]
    return Term(
        kernel=np.zeros((channels, 1)), bias=vector, group=channels, strides=(), dilations=(), pads=(),
        nodes=[], branches=["a constant"], convs=0, x="",
    )  # fmt: skip


def _identity(x: str, channels: int | None = None) -> Term:
    """x itself: a per-channel term with weight 1 (kernel [C, 1], group C, no spatial axes yet).
    Until its channel count is known it holds one coefficient for every channel (group 0);
    `_with_channels` spreads it when it meets a BN, a conv or a layer scale."""
    count = channels or 1
    return Term(
        kernel=np.ones((count, 1)),
        bias=np.zeros(count),
        group=channels or 0,
        strides=(),
        dilations=(),
        pads=(),
        nodes=[],
        branches=["identity"],
        convs=0,
        x=x,
    )


def _with_channels(term: Term, channels: int) -> Term:
    """A one-coefficient term (group 0, see _identity) as `channels` equal per-channel ones."""
    if term.group != 0:
        return term
    return replace(
        term, kernel=np.repeat(term.kernel, channels, axis=0), bias=np.repeat(term.bias, channels), group=channels
    )


def _scaled_term(mul: onnx.NodeProto, ctx: GraphContext, version: int, depth: int) -> Term | Skip:
    """A term times a per-channel constant (a layer scale)."""
    for position in (0, 1):
        data, constant = mul.input[position], mul.input[1 - position]
        shape = ctx.shapes.shape(data)
        try:
            value = ctx.constant(constant)
        except NotConstant:
            continue
        if (
            shape is None
            or len(shape) < 3
            or shape[1] is None
            or value.dtype not in (np.float16, np.float32, np.float64)
        ):
            continue
        scale = affine.channel_vector(value, len(shape), shape[1])
        if scale is None:
            return Skip(f"{node_label(mul)} multiplies by a constant that is not one value per channel")
        inner = _term(data, ctx, version, depth=depth + 1)
        if isinstance(inner, Skip):
            return inner
        inner = _with_channels(inner, shape[1])
        if inner.kernel.shape[0] != shape[1]:
            return Skip(f"{node_label(mul)} scales {shape[1]} channels of a {inner.kernel.shape[0]}-channel term")
        inner.kernel = inner.kernel * scale.reshape((-1,) + (1,) * (inner.kernel.ndim - 1))
        inner.bias = inner.bias * scale
        inner.nodes.append(mul)
        return inner
    return Skip(f"{node_label(mul)} multiplies by no per-channel constant")


def _add(a: Term, b: Term) -> Term | Skip:
    """a + b as one Term, if their geometries line up (module docstring)."""
    a, b = _shaped_alike(a, b), _shaped_alike(b, a)
    for term in (a, b):
        if isinstance(term, Skip):
            return term
    if a.kernel.shape[0] != b.kernel.shape[0] or a.in_channels != b.in_channels:
        return Mismatch(
            f"branches map {a.in_channels}→{a.kernel.shape[0]} and {b.in_channels}→{b.kernel.shape[0]} channels"
        )
    if a.strides != b.strides:
        return Mismatch(f"branches have different strides ({list(a.strides)} and {list(b.strides)})")
    spatial = a.kernel.ndim - 2
    dilations, sizes, pads = [], [], [[0, 0] for _ in range(spatial)]
    for axis in range(spatial):
        ka, kb = a.kernel.shape[2 + axis], b.kernel.shape[2 + axis]
        da, db = a.dilations[axis], b.dilations[axis]
        if ka > 1 and kb > 1 and da != db:
            return Mismatch(f"branches have different dilations ({list(a.dilations)} and {list(b.dilations)})")
        dilations.append(da if ka > 1 else db)
        sizes.append(max(ka, kb))
        big = a if ka >= kb else b
        pads[axis] = [big.pads[axis], big.pads[spatial + axis]]
    group = gcd(a.group, b.group)
    kernels = []
    for term in (a, b):
        kernel = _regroup(term.kernel.astype(np.float64, copy=False), term.group, group)
        offsets = []
        for axis in range(spatial):
            k, d = term.kernel.shape[2 + axis], dilations[axis]
            begin = pads[axis][0] - term.pads[axis]
            end = pads[axis][1] - term.pads[spatial + axis]
            if begin % d or end % d or begin < 0 or end < 0 or begin // d + end // d != sizes[axis] - k:
                return Mismatch(
                    f"{' + '.join(term.branches)} (kernel {list(term.kernel.shape[2:])}, pads {list(term.pads)}) "
                    f"does not line up in the {'×'.join(map(str, sizes))} kernel with pads "
                    f"{[p[0] for p in pads] + [p[1] for p in pads]}"
                )
            offsets.append((begin // d, end // d))
        kernels.append(np.pad(kernel, [(0, 0), (0, 0), *offsets]))
    return Term(
        kernel=kernels[0] + kernels[1],
        bias=a.bias + b.bias,
        group=group,
        strides=a.strides,
        dilations=tuple(dilations),
        pads=tuple(p[0] for p in pads) + tuple(p[1] for p in pads),
        nodes=a.nodes + b.nodes,
        branches=a.branches + b.branches,
        convs=a.convs + b.convs,
        x=a.x,
        dtype=a.dtype or b.dtype,
    )


def _shaped_alike(term: Term, other: Term) -> Term | Skip:
    """A per-channel term (identity, BN) beside another term: it takes the other's channel count
    if it had none yet, and beside a conv the conv's rank (1-wide kernel, stride 1, no padding).
    A conv term is returned as it is."""
    if term.strides:
        return term
    if other.group != 0:
        term = _with_channels(term, other.kernel.shape[0])
    if not other.strides:
        return term  # two per-channel terms add as they are
    channels = other.kernel.shape[0]
    if other.in_channels != channels:
        return Mismatch(f"an identity branch sits beside a {other.in_channels}→{channels}-channel conv")
    if term.kernel.shape[0] != channels:
        return Mismatch(f"a {term.kernel.shape[0]}-channel branch sits beside a {channels}-channel conv")
    spatial = other.kernel.ndim - 2
    shaped = replace(
        term,
        kernel=term.kernel.reshape((channels, 1) + (1,) * spatial),
        group=channels,
        strides=(1,) * spatial,
        dilations=(1,) * spatial,
        pads=(0,) * (2 * spatial),
    )
    if other.strides != shaped.strides:
        return Mismatch(f"an identity branch sits beside a conv with strides {list(other.strides)}")
    return shaped


def _regroup(kernel: np.ndarray, group: int, target: int) -> np.ndarray:
    """A group-`group` kernel as the equal group-`target` kernel (`target` divides `group`):
    block-diagonal within each of the target's groups."""
    if group == target:
        return kernel
    out_channels, in_per_group = kernel.shape[:2]
    in_channels = in_per_group * group
    result = np.zeros((out_channels, in_channels // target) + kernel.shape[2:])
    out_per_group, out_per_target = out_channels // group, out_channels // target
    for o in range(out_channels):
        first_input = (o // out_per_group) * in_per_group  # of this output's group, among all inputs
        offset = first_input - (o // out_per_target) * (in_channels // target)
        result[o, offset : offset + in_per_group] = kernel[o]
    return result


def _replace(root: onnx.NodeProto, term: Term, ctx: GraphContext) -> bool:
    """Turn the root Add/Sub/Sum into the one Conv (in place: it keeps its output name and its
    place in the graph's order, after x) and remove the other nodes; False if the merged
    weights overflow the model's dtype."""
    dtype = np.dtype(term.dtype)
    if corrects(ctx, dtype):
        input_moments(ctx, root.output[0])  # the sum's statistics, while its branches still tell them
    moments = conv_input_moments(ctx, term.x, term.in_channels, dtype)
    cast = cast_conv(dtype, term.kernel, term.bias, term.group, moments)
    term.rounding = rounding_note(dtype, moments, ctx.scope.bias_correction)
    if isinstance(cast, Skip):
        return False
    weight, bias = cast
    first_conv = next(n for n in term.nodes if is_onnx_op(n, "Conv"))
    base = first_conv.name or first_conv.output[0]
    for old in term.nodes:
        if old is not root:
            ctx.index.remove_node(old)
    ctx.index.truncate_inputs(root, 3)  # a Sum's others
    ctx.index.set_input(root, 0, term.x)
    ctx.index.set_input(root, 1, ctx.add_initializer(weight, f"{base}_reparam_W"))
    ctx.index.set_input(root, 2, ctx.add_initializer(bias, f"{base}_reparam_B"))
    root.op_type, root.domain, root.name = "Conv", "", ctx.fresh_name(f"{base}_reparam")
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
    return True
