"""Where two models differ, and a model that judges each difference where it acts.

A candidate node is *kept* when the reference has a node with the same domain, op, attributes,
inputs, outputs and constant inputs (by value); every other candidate node is *rewritten*. A
fold leaves the BN's output name to the linear op that absorbed it, so the tensors that
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
from onnx import TensorProto, numpy_helper

from bnfold.graph.protos import all_nodes, subgraphs

ISOLATED = "__bnfold_isolated"  # suffix of the candidate's copy in the probe
REROUNDED = "__bnfold_rerounded"  # suffix of the reference's re-rounded copy
# Ops that move values without computing: a fold may carry a BN's scale through them.
MOVES_VALUES = ("Identity", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice")
READS_SHAPE_ONLY = ("Shape", "Size")  # readers of a tensor's shape, not of its values
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

    @property
    def isolated(self) -> bool:
        """Whether every difference between the models lies in a rewritten node."""
        return not self.whole


def find_rewrite(reference: onnx.ModelProto, candidate: onnx.ModelProto, arrays=({}, {})) -> Rewrite:
    """The rewritten nodes of both models and the sites between them. `arrays` holds each
    model's large initializers by name when the models are skeletons (runtime.weights_apart)."""
    if _opsets(reference) != _opsets(candidate):
        return Rewrite(whole="the models import different opsets")
    if _functions(reference) != _functions(candidate):
        return Rewrite(whole="the models' local functions differ")
    shared = _shared(reference, candidate, arrays)
    sparse = _shared_sparse(reference, candidate)
    contents = [{**{t.name: "same" if t.name in shared else side for t in m.graph.initializer},
                 **{t.values.name: "same" if t.values.name in sparse else side for t in m.graph.sparse_initializer}}
                for m, side in ((reference, "reference"), (candidate, "candidate"))]  # fmt: skip
    signatures = [_signatures(m, c) for m, c in zip((reference, candidate), contents)]
    kept = set(signatures[0]) & set(signatures[1])
    kept -= _moved_through(candidate, signatures[1], kept)
    rewritten = [
        [node for node, sig in zip(m.graph.node, sigs) if sig not in kept]
        for m, sigs in zip((reference, candidate), signatures)
    ]
    made = {out for node in rewritten[1] for out in node.output if out}
    kept_nodes = [node for node, sig in zip(candidate.graph.node, signatures[1]) if sig in kept]
    read_after = {name for node in kept_nodes if node.op_type not in READS_SHAPE_ONLY for name in _reads(node)}
    read_after |= {o.name for o in candidate.graph.output}
    shape_read = {name for node in kept_nodes if node.op_type in READS_SHAPE_ONLY for name in node.input}
    remade = [out for node in rewritten[0] for out in node.output if out in made]
    sites = [out for out in remade if out in read_after]
    shape_sites = [out for out in remade if out in shape_read and out not in read_after]
    return Rewrite(sites, rewritten[1], rewritten[0], shared=shared | sparse, shape_sites=shape_sites)


def _moved_through(candidate: onnx.ModelProto, signatures: list[tuple], kept: set) -> set:
    """Signatures of kept nodes that a rewrite moved a value through: ops that only move values
    (MOVES_VALUES), reading a rewritten tensor, every reader of whose outputs is rewritten too.
    A fold through a Reshape (MatMul' → Reshape → Reshape', the BN gone from between them)
    changes the value under the kept Reshape's name, so it belongs to the rewritten region."""
    nodes = list(zip(candidate.graph.node, signatures))
    readers: dict[str, list[int]] = {}
    for i, (node, _) in enumerate(nodes):
        if node.op_type in READS_SHAPE_ONLY:
            continue  # the value under a name may change; its shape may not, and the outputs show that
        for name in _reads(node):
            readers.setdefault(name, []).append(i)
    returned = {o.name for o in candidate.graph.output}
    inside = {i for i, (_, sig) in enumerate(nodes) if sig not in kept}
    changed = True
    while changed:
        changed = False
        made = {out for i in inside for out in nodes[i][0].output if out}
        for i, (node, _) in enumerate(nodes):
            if i in inside or node.op_type not in MOVES_VALUES or not any(n in made for n in node.input):
                continue
            outputs = [o for o in node.output if o]
            if (
                outputs
                and not any(o in returned for o in outputs)
                and all(r in inside for o in outputs for r in readers.get(o, []))
            ):
                inside.add(i)
                changed = True
    return {nodes[i][1] for i in inside} & kept


def probe(reference: onnx.ModelProto, candidate: onnx.ModelProto, rewrite: Rewrite, types: dict) -> onnx.ModelProto:
    """The reference (its own copy, changed here) with the candidate's rewritten nodes beside it,
    and as outputs its own, then each site, then each site as the candidate computes it. The
    copies read the reference's initializers where they are `rewrite.shared`, else the
    candidate's, renamed; so either model may be a skeleton whose large tensors are stubs."""
    _splice(reference, rewrite.candidate_nodes, candidate.graph.initializer, ISOLATED, keep=rewrite.shared,
            sparse=candidate.graph.sparse_initializer)  # fmt: skip
    _expose(reference, [*rewrite.sites, *rewrite.shape_sites], types, ISOLATED)
    return reference


def yardstick(reference: onnx.ModelProto, rewrite: Rewrite, types: dict, seed: int) -> onnx.ModelProto:
    """The reference (its own copy, changed here) with its rewritten nodes copied beside it,
    every float parameter of the copy rounded the other way (`reround`); outputs as `probe`'s."""
    read = {name for node in rewrite.reference_nodes for name in _reads(node)}
    initializers = [
        reround(t, np.random.default_rng([seed, 0, i]))
        for i, t in enumerate(reference.graph.initializer)
        if t.name in read
    ]
    rewritten = {id(node) for node in rewrite.reference_nodes}
    constants = [n for n in reference.graph.node if _is_constant(n) and id(n) not in rewritten and n.output[0] in read]
    nodes = [
        _rerounded_constants(node, np.random.default_rng([seed, 1, i]))
        for i, node in enumerate([*constants, *rewrite.reference_nodes])
    ]
    _splice(reference, nodes, initializers, REROUNDED)
    _expose(reference, rewrite.sites, types, REROUNDED)
    return reference


def rerounded_end_to_end(reference: onnx.ModelProto, rewrite: Rewrite, seed: int) -> onnx.ModelProto:
    """The reference (its own copy, changed here) with every float parameter its rewritten nodes
    read rounded the other way (every one, when the rewrite is not isolated): how far its
    outputs move when only those parameters move."""
    read = {name for node in rewrite.reference_nodes for name in _reads(node)}
    for i, tensor in enumerate(reference.graph.initializer):
        if tensor.name in read or not rewrite.isolated:
            tensor.CopyFrom(reround(tensor, np.random.default_rng([seed, 0, i])))
    for i, node in enumerate(reference.graph.node):
        if _is_constant(node) and (node.output[0] in read or not rewrite.isolated):
            node.CopyFrom(_rerounded_constants(node, np.random.default_rng([seed, 1, i])))
    return reference


def _is_constant(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and len(node.output) == 1


def reround(tensor: TensorProto, rng: np.random.Generator) -> TensorProto:
    """A float tensor with each value, with probability ½, moved to its neighbour on a random
    side: the other of the two roundings a computed parameter (W·s) could have had. A value that
    is a whole number stays: no rounding made it, and it may be structural (Pow's exponent 2 moved
    to 2.0000002 makes every negative base NaN). Other tensors are returned as they are."""
    if tensor.data_type not in FLOAT_TYPES or tensor.data_location == TensorProto.EXTERNAL:
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
    for name in [*sites, *(s + suffix for s in sites)]:
        typed = types.get(name.removesuffix(suffix))
        model.graph.output.append(
            onnx.ValueInfoProto(name=name, type=typed) if typed else onnx.ValueInfoProto(name=name)
        )


def _reads(node: onnx.NodeProto) -> set[str]:
    """Every name a node reads, its subgraphs' outer names included."""
    names = set(node.input)
    for graph in subgraphs(node):
        for inner in all_nodes(graph):
            names.update(inner.input)
    return names


def _signatures(model: onnx.ModelProto, contents: dict[str, str]) -> list[tuple]:
    """Per node: what must be equal for two nodes to compute the same thing."""
    return [
        (
            node.domain,
            node.op_type,
            tuple(node.input),
            tuple(node.output),
            tuple(sorted((a.name, a.SerializeToString(deterministic=True)) for a in node.attribute)),
            tuple(sorted((name, contents[name]) for name in _reads(node) if name in contents)),
        )
        for node in model.graph.node
    ]


def _shared(reference: onnx.ModelProto, candidate: onnx.ModelProto, arrays) -> set[str]:
    """The initializers both models hold under one name with equal values. Only tensors of one
    name are compared, byte for byte (a fold names its new tensors anew); a node's signature
    says of each tensor it reads whether it is shared, else whose it is."""
    ours = {t.name: t for t in reference.graph.initializer}
    theirs = {t.name: t for t in candidate.graph.initializer}
    return {name for name in ours.keys() & theirs.keys() if _equal(ours[name], theirs[name], arrays, name)}


def _shared_sparse(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> set[str]:
    """The sparse initializers both models hold under one name with equal contents."""
    ours, theirs = ({t.values.name: t.SerializeToString(deterministic=True) for t in m.graph.sparse_initializer}
                    for m in (reference, candidate))  # fmt: skip
    return {name for name in ours.keys() & theirs.keys() if ours[name] == theirs[name]}


def _equal(a: TensorProto, b: TensorProto, arrays, name: str) -> bool:
    """Whether two tensors hold the same type, shape and values, whichever field (or array,
    for a skeleton's stub) holds them."""
    if (a.data_type, list(a.dims)) != (b.data_type, list(b.dims)):
        return False
    values = [array[name] if name in array else t for t, array in zip((a, b), arrays)]
    if all(isinstance(v, TensorProto) for v in values):
        if a.data_location == TensorProto.EXTERNAL or b.data_location == TensorProto.EXTERNAL:
            return a.data_location == b.data_location and list(a.external_data) == list(b.external_data)
        if a.HasField("raw_data") and b.HasField("raw_data"):
            return a.raw_data == b.raw_data
    data = [v if isinstance(v, np.ndarray) else numpy_helper.to_array(v) for v in values]
    return data[0].tobytes() == data[1].tobytes()


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {o.domain or "ai.onnx": o.version for o in model.opset_import}


def _functions(model: onnx.ModelProto) -> dict:
    return {(f.domain, f.name): f.SerializeToString(deterministic=True) for f in model.functions}
