"""Where two models differ, and a model that judges each difference where it acts.

The candidate is first renamed into the reference's names (`align`: by computation, by place
in the graph, by name). A candidate node is then *kept* when the reference has a node with the
same domain, op, attributes, inputs, outputs and constant inputs (by value), reading through
Identity nodes the other model does not have, or when it computes exactly what the reference
computes under its outputs' names; every other candidate node is *rewritten*. A fold leaves the
BN's output name (or align gives it) to the linear op that absorbed it, so the tensors that
rewritten candidate nodes produce and the reference also produces are the *sites* of the
rewrite: the places where the two models must agree, whatever lies after them. Everything else
is the same computation in both.

The *probe* is the reference with a renamed copy of the rewritten candidate nodes beside it,
reading the reference's own tensors at their inputs. One onnxruntime run of the probe gives each
site twice: as the reference computes it, and as the candidate's rewrite computes it from the
very same inputs. So a fold is judged by what it does, not by what the folds before it, a
quantizer's rounding or a saturating sigmoid after it make of float32 noise.

The *yardstick* for a site is the reference's own rewritten nodes, copied the same way, with
every float parameter rounded to its other neighbour (`reround`): how far the reference itself
moves at that site when its parameters are rounded the other way, which is the error a correct
fold is entitled to. It needs none of onnxruntime's own rewrites.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.graph.protos import all_names, all_nodes, subgraphs
from bnfold.io.view import exposing
from bnfold.verification.align import READS_SHAPE_ONLY, align, is_identity

ISOLATED = "__bnfold_isolated"  # suffix of the candidate's copy in the probe
REROUNDED = "__bnfold_rerounded"  # suffix of the reference's re-rounded copy
# Ops that move values without computing: a fold may carry a BN's scale through them.
MOVES_VALUES = ("Identity", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice")
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


@dataclass
class Rewrite:
    """What the candidate rewrote. `whole` is why the models cannot be compared site by site
    (then only their outputs are compared); empty when they can."""

    sites: list[str] = field(default_factory=list)  # in the reference's graph order
    candidate_nodes: list[onnx.NodeProto] = field(default_factory=list)
    reference_nodes: list[onnx.NodeProto] = field(default_factory=list)
    whole: str = ""
    shared: set[str] = field(default_factory=set)  # initializers both models hold, with equal values
    # rewritten tensors that only Shape or Size read after the rewrite: their shapes must agree
    shape_sites: list[str] = field(default_factory=list)
    candidate: onnx.ModelProto | None = None  # the candidate under the reference's names (align)
    arrays: dict = field(default_factory=dict)  # its large initializers, under those names

    @property
    def isolated(self) -> bool:
        """Whether every difference between the models lies in a rewritten node."""
        return not self.whole


def find_rewrite(reference: onnx.ModelProto, candidate: onnx.ModelProto, arrays=({}, {})) -> Rewrite:
    """The rewritten nodes of both models and the sites between them, the candidate first renamed
    into the reference's names (`align`). `arrays` holds each model's large initializers by name
    when the models are skeletons (bnfold.io.view.weights_apart)."""
    clash = _opset_clash(reference, candidate)
    if clash:
        return Rewrite(whole=clash)
    if _functions(reference) != _functions(candidate):
        return Rewrite(whole="the models' local functions differ")
    alignment = align(reference, candidate, arrays)
    candidate = alignment.candidate
    shared = alignment.constants
    names = [set(all_names(m.graph)) for m in (reference, candidate)]
    aliases = [_aliases(reference, names[1]), _aliases(candidate, names[0])]
    signatures = [_signatures(m, shared, side, aliases[side]) for side, m in enumerate((reference, candidate))]
    kept = [
        [sig in theirs or _computes_same(node, alignment.same) for node, sig in zip(m.graph.node, ours)]
        for m, ours, theirs in ((reference, signatures[0], set(signatures[1])),
                                (candidate, signatures[1], set(signatures[0])))
    ]  # fmt: skip
    for i in _moved_through(candidate, kept[1]):
        kept[1][i] = False
        kept[0] = [k and sig != signatures[1][i] for k, sig in zip(kept[0], signatures[0])]
    rewritten = [[node for node, k in zip(m.graph.node, ks) if not k] for m, ks in zip((reference, candidate), kept)]
    made = {out for node in rewritten[1] for out in node.output if out}
    alias = aliases[1]
    kept_nodes = [node for node, k in zip(candidate.graph.node, kept[1]) if k]
    read_after = {alias.get(n, n) for node in kept_nodes if node.op_type not in READS_SHAPE_ONLY for n in _reads(node)}
    read_after |= {alias.get(o.name, o.name) for o in candidate.graph.output}
    shape_read = {alias.get(n, n) for node in kept_nodes if node.op_type in READS_SHAPE_ONLY for n in node.input}
    remade = [out for node in rewritten[0] for out in node.output if out in made]
    sites = [out for out in remade if out in read_after]
    shape_sites = [out for out in remade if out in shape_read and out not in read_after]
    return Rewrite(sites, rewritten[1], rewritten[0], shared=shared, shape_sites=shape_sites,
                   candidate=candidate, arrays=alignment.arrays)  # fmt: skip


def _computes_same(node: onnx.NodeProto, same: set[str]) -> bool:
    """Whether every output of a node holds what the other model computes under its name."""
    outputs = [o for o in node.output if o]
    return bool(outputs) and all(o in same for o in outputs)


def _aliases(model: onnx.ModelProto, other: set[str]) -> dict[str, str]:
    """Each Identity node's output that the other model does not have → the tensor it passes on
    (through chains of them): a tool that removes Identity nodes leaves their readers as they were."""
    alias: dict[str, str] = {}
    for node in model.graph.node:
        if is_identity(node) and node.output[0] not in other:
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
    return alias


def _moved_through(candidate: onnx.ModelProto, kept: list[bool]) -> set[int]:
    """Kept nodes that a rewrite moved a value through: ops that only move values
    (MOVES_VALUES), reading a rewritten tensor, every reader of whose outputs is rewritten too.
    A fold through a Reshape (MatMul' → Reshape → Reshape', the BN gone from between them)
    changes the value under the kept Reshape's name, so it belongs to the rewritten region."""
    nodes = list(candidate.graph.node)
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        if node.op_type in READS_SHAPE_ONLY:
            continue  # the value under a name may change; its shape may not, and the outputs show that
        for name in _reads(node):
            readers.setdefault(name, []).append(i)
    returned = {o.name for o in candidate.graph.output}
    inside = {i for i, k in enumerate(kept) if not k}
    moved: set[int] = set()
    changed = True
    while changed:
        changed = False
        made = {out for i in inside for out in nodes[i].output if out}
        for i, node in enumerate(nodes):
            if i in inside or node.op_type not in MOVES_VALUES or not any(n in made for n in node.input):
                continue
            outputs = [o for o in node.output if o]
            if (
                outputs
                and not any(o in returned for o in outputs)
                and all(r in inside for o in outputs for r in readers.get(o, []))
            ):
                inside.add(i)
                moved.add(i)
                changed = True
    return moved


def probe(reference: onnx.ModelProto, candidate: onnx.ModelProto, rewrite: Rewrite, types: dict,
          their_types: dict | None = None) -> onnx.ModelProto:  # fmt: skip
    """The reference (its own copy, changed here) with the candidate's rewritten nodes beside it,
    and as outputs its own, then each site, then each site as the candidate computes it. The
    copies read the reference's initializers where they are `rewrite.shared`, else the
    candidate's, renamed; so either model may be a skeleton whose large tensors are stubs.
    Where the candidate computes in another float type than the reference (onnxruntime's offline
    optimizer turns a float16 model into float32 with Casts), `their_types` (the candidate's
    element types) bridges the two with Casts (`_bridge`)."""
    imported = {o.domain for o in reference.opset_import}
    reference.opset_import.extend(o for o in candidate.opset_import if o.domain not in imported)
    before = len(reference.graph.node)
    _splice(reference, rewrite.candidate_nodes, candidate.graph.initializer, ISOLATED, keep=rewrite.shared,
            sparse=candidate.graph.sparse_initializer)  # fmt: skip
    _bridge(reference, before, _elem_types(types), their_types or {}, [*rewrite.sites, *rewrite.shape_sites])
    _expose(reference, [*rewrite.sites, *rewrite.shape_sites], types, ISOLATED)
    return reference


def _elem_types(types: dict) -> dict[str, int]:
    return {name: t.tensor_type.elem_type for name, t in types.items() if t.HasField("tensor_type")}


def _bridge(model: onnx.ModelProto, first: int, ours: dict[str, int], theirs: dict[str, int], sites: list[str]) -> None:
    """Cast between the reference's and the candidate's float types where the copies spliced in
    from node `first` on read a reference tensor of another float type than the candidate's,
    and where a site's copy has another type than the reference's site: the site is compared in
    the reference's type."""
    graph = model.graph
    copies = list(graph.node[first:])
    made = {out for node in copies for out in node.output}

    def differs(name: str) -> bool:
        own, other = ours.get(name), theirs.get(name)
        return own in FLOAT_TYPES and other in FLOAT_TYPES and own != other

    into, out_of = [], []
    bridged: dict[str, str] = {}
    for node in copies:
        for i, name in enumerate(node.input):
            if name and name not in made and differs(name):
                if name not in bridged:
                    bridged[name] = name + "__bnfold_as_candidate"
                    into.append(helper.make_node("Cast", [name], [bridged[name]], to=theirs[name]))
                node.input[i] = bridged[name]
    for site in sites:
        copy = site + ISOLATED
        if copy in made and differs(site):
            own = copy + "__bnfold_own_type"
            for node in copies:
                node.input[:] = [own if n == copy else n for n in node.input]
                node.output[:] = [own if n == copy else n for n in node.output]
            out_of.append(helper.make_node("Cast", [own], [copy], to=ours[site]))
    if into or out_of:  # in graph order: the casts into the copies first, the casts out of them last
        copies = [onnx.NodeProto.FromString(node.SerializeToString()) for node in copies]
        del graph.node[first:]
        graph.node.extend([*into, *copies, *out_of])


def yardstick(reference: onnx.ModelProto, rewrite: Rewrite, types: dict, seed: int) -> onnx.ModelProto:
    """The reference (its own copy, changed here) with its rewritten nodes copied beside it,
    every float parameter of the copy rounded the other way (`reround`); outputs as `probe`'s."""
    grids = _grids_before(reference, rewrite)
    region = [*grids, *rewrite.reference_nodes]
    read = {name for node in region for name in _reads(node)}
    requantized = _requantized(rewrite, grids)
    initializers = [
        reround(t, np.random.default_rng([seed, 0, i]), steps=t.name in requantized)
        for i, t in enumerate(reference.graph.initializer)
        if t.name in read
    ]
    rewritten = {id(node) for node in region}
    constants = [n for n in reference.graph.node if _is_constant(n) and id(n) not in rewritten and n.output[0] in read]
    nodes = [
        _rerounded_constants(node, np.random.default_rng([seed, 1, i])) for i, node in enumerate([*constants, *region])
    ]
    _splice(reference, nodes, initializers, REROUNDED)
    _expose(reference, rewrite.sites, types, REROUNDED)
    return reference


def rerounded_end_to_end(reference: onnx.ModelProto, rewrite: Rewrite, seed: int) -> onnx.ModelProto:
    """The reference (its own copy, changed here) with every float parameter its rewritten nodes
    read rounded the other way (every one, when the rewrite is not isolated): how far its
    outputs move when only those parameters move."""
    grids = _grids_before(reference, rewrite)
    read = {name for node in [*grids, *rewrite.reference_nodes] for name in _reads(node)}
    requantized = _requantized(rewrite, grids)
    for i, tensor in enumerate(reference.graph.initializer):
        if tensor.name in read or not rewrite.isolated:
            tensor.CopyFrom(reround(tensor, np.random.default_rng([seed, 0, i]), steps=tensor.name in requantized))
    for i, node in enumerate(reference.graph.node):
        if _is_constant(node) and (node.output[0] in read or not rewrite.isolated):
            node.CopyFrom(_rerounded_constants(node, np.random.default_rng([seed, 1, i])))
    return reference


def _is_constant(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and len(node.output) == 1


def _requantized(rewrite: Rewrite, grids: list[onnx.NodeProto]) -> set[str]:
    """The integer tensors a rewritten DequantizeLinear of the reference reads and the candidate
    holds with other values: a fold requantized them (a conv's int32 bias at its new scale); and
    those of `grids`, which a fold requantized in a copy of its own."""
    rewritten = {
        node.input[0]
        for node in rewrite.reference_nodes
        if node.op_type == "DequantizeLinear" and node.input and node.input[0] not in rewrite.shared
    }
    return rewritten | {node.input[0] for node in grids}


def _grids_before(reference: onnx.ModelProto, rewrite: Rewrite) -> list[onnx.NodeProto]:
    """The DequantizeLinear nodes of constants outside the rewrite that a rewritten node reads:
    where other nodes read one too, a fold rescales (and requantizes) a copy of it for the linear
    op alone, and the original stays. The yardstick rounds their parameters as a rewritten one's."""
    rewritten = {id(node) for node in rewrite.reference_nodes}
    initializers = {t.name for t in reference.graph.initializer}
    producers = {out: node for node in reference.graph.node for out in node.output if out}
    grids: dict[int, onnx.NodeProto] = {}
    for node in rewrite.reference_nodes:
        for name in node.input:
            grid = producers.get(name)
            if (
                grid is not None
                and id(grid) not in rewritten
                and grid.op_type == "DequantizeLinear"
                and all(i in initializers for i in grid.input if i)
            ):
                grids[id(grid)] = grid
    return list(grids.values())


def reround(tensor: TensorProto, rng: np.random.Generator, steps: bool = False) -> TensorProto:
    """A float tensor with each value, with probability ½, moved to its neighbour on a random
    side: the other of the two roundings a computed parameter (W·s) could have had. A value that
    is a whole number stays: no rounding made it, and it may be structural (Pow's exponent 2 moved
    to 2.0000002 makes every negative base NaN). With `steps`, an int32 tensor (a bias a fold
    requantized; 8-bit weights keep their integers, a quantized BN scale goes whole) moves by one
    step the same way. Other tensors are returned as they are."""
    if tensor.data_location == TensorProto.EXTERNAL:
        return tensor
    if steps and tensor.data_type == TensorProto.INT32:
        values = numpy_helper.to_array(tensor)
        limits = np.iinfo(values.dtype)
        side = np.where(rng.random(values.shape) < 0.5, 1, -1)
        moved = values.astype(np.int64) + side * (rng.random(values.shape) < 0.5)
        return numpy_helper.from_array(np.clip(moved, limits.min, limits.max).astype(values.dtype), tensor.name)
    if tensor.data_type not in FLOAT_TYPES:
        return tensor
    values = numpy_helper.to_array(tensor)
    if not values.size:
        return tensor
    direction = np.where(rng.random(values.shape) < 0.5, np.inf, -np.inf).astype(values.dtype)
    moved = np.where(rng.random(values.shape) < 0.5, np.nextafter(values, direction), values)
    with np.errstate(invalid="ignore"):  # ±Inf: not finite, kept below
        whole = np.asarray(values, np.float64) == np.round(np.asarray(values, np.float64))
    moved = np.where(np.isfinite(moved) & ~whole, moved, values).astype(values.dtype)
    return numpy_helper.from_array(moved, tensor.name)


def _rerounded_constants(node: onnx.NodeProto, rng: np.random.Generator) -> onnx.NodeProto:
    if node.op_type != "Constant":
        return node
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for attr in copy.attribute:
        if attr.name == "value":
            attr.t.CopyFrom(reround(attr.t, rng))
    return copy


def _splice(model, nodes: Iterable[onnx.NodeProto], initializers, suffix: str, keep: set[str] = frozenset(),
            sparse=()) -> None:  # fmt: skip
    """Append renamed copies of `nodes` to model's graph: their outputs get `suffix`, their
    inputs read each other's copies, and each initializer (dense, or `sparse`) they read is
    added under a new name, but those in `keep` (which the model holds with the same values)."""
    graph = model.graph
    nodes = list(nodes)
    read = {name for node in nodes for name in _reads(node)}
    renamed = {out: out + suffix for node in nodes for out in node.output if out}
    for tensor in initializers:
        name = tensor.name
        if name in read and name not in keep:
            renamed[name] = name + suffix
            added = TensorProto()
            added.CopyFrom(tensor)
            added.name = name + suffix
            graph.initializer.append(added)
    for tensor in sparse:
        name = tensor.values.name
        if name in read and name not in keep:
            renamed[name] = name + suffix
            added = graph.sparse_initializer.add()
            added.CopyFrom(tensor)
            added.values.name = name + suffix
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        if copy.name:
            copy.name += suffix
        _rename(copy, renamed)
        graph.node.append(copy)


def _rename(node: onnx.NodeProto, renamed: dict[str, str]) -> None:
    """Rename a node's inputs and outputs, and the outer names its subgraphs read."""
    for i, name in enumerate(node.input):
        node.input[i] = renamed.get(name, name)
    for i, name in enumerate(node.output):
        node.output[i] = renamed.get(name, name)
    for graph in subgraphs(node):
        for inner in all_nodes(graph):
            for i, name in enumerate(inner.input):
                inner.input[i] = renamed.get(name, name)


def _expose(model: onnx.ModelProto, sites: list[str], types: dict, suffix: str) -> None:
    """Each site, then each site's copy (`suffix`), as outputs, the copies typed as their sites."""
    exposing(model, sites, types)
    exposing(model, [s + suffix for s in sites], {s + suffix: types[s] for s in sites if s in types})


def _reads(node: onnx.NodeProto) -> set[str]:
    """Every name a node reads, its subgraphs' outer names included."""
    names = set(node.input)
    for graph in subgraphs(node):
        for inner in all_nodes(graph):
            names.update(inner.input)
    return names


def _signatures(model: onnx.ModelProto, shared: set[str], side: int, alias: dict[str, str]) -> list[tuple]:
    """Per node: what must be equal for two nodes to compute the same thing. A tensor passed on
    by Identity nodes is read as the tensor itself (`alias`); of each constant a node reads,
    whether both models hold it with one value (else whose it is)."""
    constants = {t.name for t in model.graph.initializer} | {t.values.name for t in model.graph.sparse_initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant" and n.output}
    return [
        (
            node.domain,
            node.op_type,
            tuple(alias.get(n, n) for n in node.input),
            tuple(node.output),
            tuple(sorted((a.name, a.SerializeToString(deterministic=True)) for a in node.attribute)),
            tuple(sorted((n, "same" if n in shared else side) for n in _reads(node) if n in constants)),
        )
        for node in model.graph.node
    ]


def _opset_clash(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> str:
    """Why the models' nodes cannot be read side by side: a domain both import at different
    versions (a node's meaning depends on it). Domains only one imports are no obstacle (the
    probe imports the candidate's too: onnxruntime's offline optimizer adds its own)."""
    ours, theirs = ({o.domain or "ai.onnx": o.version for o in m.opset_import} for m in (reference, candidate))
    clashes = sorted(d for d in ours.keys() & theirs.keys() if ours[d] != theirs[d])
    if clashes:
        return (
            "the models import different opsets (" + ", ".join(f"{d} {ours[d]} and {theirs[d]}" for d in clashes) + ")"
        )
    return ""


def _functions(model: onnx.ModelProto) -> dict:
    return {(f.domain, f.name): f.SerializeToString(deterministic=True) for f in model.functions}
