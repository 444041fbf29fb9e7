"""Which tensor of the candidate is which tensor of the reference, whatever the tools between
them named it.

A chain of tools (an exporter, onnxslim or onnxsim, onnxruntime's offline optimizer, bnfold)
renames tensors, turns Constant nodes into initializers, removes Identity nodes, folds shape
computations into constants and leaves a Conv's name on the Conv that absorbed its BN. Comparing
two models site by site (`regions`) needs both sides of every site under one name, so the
candidate is renamed into the reference's names first, by this evidence, strongest first:

1. *The same computation*: a tensor's identity is its op, attributes and the identities of its
   inputs, down to graph inputs (by name) and constants (by value: a Constant node and an
   initializer of one type, shape and bytes are one constant). Identity nodes pass their input's
   identity on. Graph inputs and outputs pair by name (verify pairs them so).
2. *The same place*, grown from those pairs: two nodes of one op, attributes and constants that
   make paired tensors read paired tensors (backward, up from the outputs to where the rewrite
   is: a node whose constants changed may have absorbed a map of its input), and two such nodes
   that read paired tensors make paired tensors (forward).
3. *The same name*, where the same op makes it and the same ops read it; then 2 again.
4. *The only one left*: a node that is the only unpaired one of its op and attributes on each
   side (a ReLU between two folds); then 2 again.
5. Every other candidate tensor keeps its name if the reference has no tensor of that name
   unpaired, else gets a name of its own: one name never means two tensors.

A wrong pair can only make a site compare two tensors that differ (a false alarm), never hide
a difference: the nodes `regions` keeps are the same op on the same names and constants.
Renaming changes no value: the renamed candidate computes what the candidate computes.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from bnfold.graph.protos import all_names, all_nodes, is_onnx_op, subgraphs

ABSORBING = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # what a fold or a fusion writes a map into
APART = "__bnfold_candidate"  # suffix of a candidate tensor no reference tensor corresponds to
RANDOM = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli")
READS_SHAPE_ONLY = ("Shape", "Size")  # readers of a tensor's shape, not of its values
SAMPLE = 1024  # bytes of each of the three samples of a constant its fingerprint reads


@dataclass
class Alignment:
    """The candidate renamed into the reference's names, and what the renaming found."""

    candidate: onnx.ModelProto
    arrays: dict  # the candidate's large initializers, under their new names
    same: set[str] = field(default_factory=set)  # names that hold one computation in both models
    constants: set[str] = field(default_factory=set)  # …of them, the constants (initializers, Constant nodes)


def align(reference: onnx.ModelProto, candidate: onnx.ModelProto, arrays=({}, {})) -> Alignment:
    """The candidate (a copy) with each tensor under the name of the reference tensor it is."""
    values = _Constants(reference, candidate, arrays)
    graphs = [_Graph(m, set(v)) for m, v in zip((reference, candidate), values.names)]
    forward = [_forward(m, values.label(side), g) for side, (m, g) in enumerate(zip((reference, candidate), graphs))]
    pairing = _Pairing(graphs, forward)
    for name in [v.name for v in [*candidate.graph.input, *candidate.graph.output]]:
        pairing.fix(name)  # verify pairs the models' inputs and outputs by name
    by_identity: dict[str, str] = {}  # the reference's first root of each identity
    for name, identity in forward[0].items():
        by_identity.setdefault(identity, graphs[0].root(name))
    for name, identity in forward[1].items():  # 1. the same computation
        if identity in by_identity and graphs[1].root(name) == name:
            same_name = forward[0].get(name) == identity and graphs[0].root(name) == name
            pairing.pair(name, name if same_name else by_identity[identity])
    pairing.propagate()  # 2. the same place among what is paired
    for name in forward[1]:  # 3. the same name made by the same op, and the places around it
        if name not in pairing.to_ref and graphs[1].root(name) == name and graphs[0].root(name) == name:
            pairing.pair_by_name(name)
    pairing.propagate()
    pairing.pair_unique_ops()  # 4. the one op of its kind left on both sides
    pairing.propagate()
    pairing.drop_inconsistent()  # …and no pair of one node that reads what its partner does not
    ref_names = set(forward[0])
    for name in forward[1]:  # 5. the same name; else a name of its own
        if name not in pairing.to_ref:
            free = name not in pairing.taken  # a name the reference has for another tensor is not free
            pairing.to_ref[name] = name if free else _apart(name, ref_names | pairing.taken)
            pairing.taken.add(pairing.to_ref[name])

    renamed = {old: new for old, new in pairing.to_ref.items() if old != new}
    pairs = pairing.to_ref
    same = {pairs[n] for n, identity in forward[1].items() if forward[0].get(pairs[n]) == identity}
    return Alignment(
        _renamed(candidate, renamed),
        {renamed.get(n, n): a for n, a in arrays[1].items()},
        same,
        {pairs[n] for n in values.names[1] if pairs[n] in same},
    )


class _Graph:
    """One model's main graph as producers and readers, Identity nodes seen through."""

    def __init__(self, model: onnx.ModelProto, constants: set[str]):
        self.constants = constants
        self.alias: dict[str, str] = {}
        self.producer: dict[str, tuple[onnx.NodeProto, int]] = {}
        self.readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        # the nodes, held: a protobuf node read twice is two Python objects, so ids are only good on these
        self.nodes = list(model.graph.node)
        # each node's op, arity and attributes, serialized once: what two nodes must share to be one op
        self.kind = {id(n): (n.domain, n.op_type, len(n.input), len(n.output), _attributes(n)) for n in self.nodes}
        for node in self.nodes:
            if is_identity(node):
                self.alias[node.output[0]] = self.root(node.input[0])
                continue
            for k, out in enumerate(node.output):
                if out:
                    self.producer[out] = (node, k)
            for slot, name in enumerate(node.input):
                if name:
                    self.readers.setdefault(self.root(name), []).append((node, slot))

    def root(self, name: str) -> str:
        return self.alias.get(name, name)

    def inputs(self, node: onnx.NodeProto) -> list[str]:
        return [self.root(n) if n else "" for n in node.input]


class _Pairing:
    """Candidate tensor → reference tensor, grown from what is certain (the same computation,
    the graph's inputs and outputs) to the tensors around them: two nodes of one op and
    attributes that make paired tensors read paired tensors (backward), and two nodes of one op
    and attributes that read paired tensors, and nothing unpaired, make paired tensors
    (forward). Constants pair only by value. Where a place offers two partners, none is taken."""

    def __init__(self, graphs: list[_Graph], forward: list[dict[str, str]]):
        self.graphs = graphs
        self.forward = forward
        self.to_ref: dict[str, str] = {}
        self.taken: set[str] = set()
        self.fixed: set[str] = set()  # paired by name: the graphs' inputs and outputs
        self.queue: list[tuple[str, str]] = []

    def fix(self, name: str) -> None:
        """A name both models give one tensor (a graph input or output); its roots pair too."""
        self.to_ref[name] = name
        self.taken.add(name)
        self.fixed.add(name)
        if name in self.forward[0]:
            ours, theirs = self.graphs[1].root(name), self.graphs[0].root(name)
            if ours not in self.to_ref:
                self.to_ref[ours] = theirs
                self.taken.add(theirs)
            self.queue.append((ours, theirs))

    def pair(self, ours: str, theirs: str) -> None:
        """Pair candidate tensor `ours` with reference tensor `theirs`, if both are free."""
        if ours in self.to_ref or theirs in self.taken:
            return
        self.to_ref[ours] = theirs
        self.taken.add(theirs)
        self.queue.append((ours, theirs))

    def pair_by_name(self, name: str) -> None:
        """Pair a tensor with the reference's of its name, when the same op makes both and the
        same ops read both (onnxsim leaves a Conv's name on the Conv that absorbed its BN)."""
        ref, cand = self.graphs
        mine, other = cand.producer.get(name), ref.producer.get(name)
        if mine and other and mine[1] == other[1] and self._same_op(mine[0], other[0]):
            if _reader_ops(cand, name) == _reader_ops(ref, name) and self._same_constants(mine[0], other[0]):
                self.pair(name, name)

    def pair_unique_ops(self) -> None:
        """Pair the outputs of nodes that are, on each side, the only unpaired node of their op
        and attributes (a ReLU between two folds that changed both its neighbours)."""
        ref, cand = self.graphs
        left = [_by_op(g, done) for g, done in ((ref, self.taken), (cand, self.to_ref.keys()))]
        for key, theirs in left[1].items():
            ours = left[0].get(key)
            if len(theirs) == 1 and ours is not None and len(ours) == 1:
                mine, other = cand.producer[theirs[0]][0], ref.producer[ours[0]][0]
                if self._same_constants(mine, other):  # (other constants: it may have absorbed a neighbour)
                    self.pair(theirs[0], ours[0])

    def propagate(self) -> None:
        ref, cand = self.graphs
        while self.queue:
            ours, theirs = self.queue.pop()
            mine, other = cand.producer.get(ours), ref.producer.get(theirs)
            if mine and other and mine[1] == other[1] and self._same_op(mine[0], other[0]):
                # their inputs pair only when they read the same constants: a node whose
                # constants changed may have absorbed a map of its input (a BN folded forward
                # into the Gemm after a pooling), so what it reads is another tensor
                if self._same_constants(mine[0], other[0]):
                    for a, b in zip(*(g.inputs(n) for g, n in ((cand, mine[0]), (ref, other[0])))):
                        if a and b and a not in cand.constants and b not in ref.constants and self._may_be(a, b):
                            self.pair(a, b)
                for a, b in zip(mine[0].output, other[0].output):
                    if a and b:
                        self.pair(a, b)
            self._forward_step(ours, theirs)

    def _forward_step(self, ours: str, theirs: str) -> None:
        """Readers of both tensors that are the same node: their outputs pair."""
        ref, cand = self.graphs
        for node, slot in cand.readers.get(ours, []):
            matches = [
                other for other, other_slot in ref.readers.get(theirs, [])
                if other_slot == slot and self._same_op(node, other) and self._same_inputs(node, other)
            ]  # fmt: skip
            if len(matches) == 1:
                for a, b in zip(node.output, matches[0].output):
                    if a and b:
                        self.pair(a, b)

    def _same_op(self, node: onnx.NodeProto, other: onnx.NodeProto) -> bool:
        """A candidate node and a reference node of one op, arity and attributes."""
        return self.graphs[1].kind[id(node)] == self.graphs[0].kind[id(other)]

    def _may_be(self, ours: str, theirs: str) -> bool:
        """Whether candidate tensor `ours` may be reference tensor `theirs`: made by nodes of one
        op and constants, or by a candidate node the reference has nowhere (with its constants: a
        Conv that absorbed the BN which made `theirs`). A ReLU's output is never a BN's, nor a
        Mul of two tensors a Mul by 0.5 that was folded forward."""
        ref, cand = self.graphs
        mine, other = cand.producer.get(ours), ref.producer.get(theirs)
        if mine is None or other is None:
            return True
        node, kind = mine[0], self._full_kind(mine[0])
        if kind == self._full_kind(other[0], side=0) or ours == theirs:
            return True  # (a fold's last shape op takes over the name of the BN it replaces)
        # a node that can absorb a map: a linear op (its weights may come through a
        # DequantizeLinear, so its constants need not show it), a fused kernel of another
        # domain (onnxruntime's FusedConv), or a node the reference has nowhere
        return node.op_type in ABSORBING or node.domain not in ("", "ai.onnx") or kind not in self._reference_kinds

    @functools.cached_property
    def _reference_kinds(self) -> set:
        ref = self.graphs[0]
        return {self._full_kind(node, side=0) for node in ref.nodes if not is_identity(node)}

    def _full_kind(self, node: onnx.NodeProto, side: int = 1) -> tuple:
        """A node's op, arity, attributes and the constants it reads, slot by slot."""
        graph = self.graphs[side]
        constants = tuple(self.forward[side].get(n) if n in graph.constants else None for n in graph.inputs(node))
        return graph.kind[id(node)], constants

    def drop_inconsistent(self) -> None:
        """Unpair, until none is left, a pair made by nodes of one op and constants where an
        input of the candidate's is paired with another tensor than the reference's reads, or
        with none: growth from names and lone ops can pair the tensors between a BN folded
        forward and the Gemm that took it (a pooling, a Flatten), which differ by the BN."""
        ref, cand = self.graphs
        changed = True
        while changed:
            changed = False
            for ours, theirs in list(self.to_ref.items()):
                mine, other = cand.producer.get(ours), ref.producer.get(theirs)
                if ours in self.fixed or not (mine and other and self._same_op(mine[0], other[0])):
                    continue
                if self.forward[1].get(ours) == self.forward[0].get(theirs):
                    continue  # the same computation
                if not self._same_constants(mine[0], other[0]):
                    continue  # a site: the candidate's node absorbed a map
                for a, b in zip(cand.inputs(mine[0]), ref.inputs(other[0])):
                    if a and b and a not in cand.constants and b not in ref.constants and self.to_ref.get(a) != b:
                        del self.to_ref[ours]
                        self.taken.discard(theirs)
                        changed = True
                        break

    def _same_constants(self, node: onnx.NodeProto, other: onnx.NodeProto) -> bool:
        """A candidate node and a reference node that read no different constants in the same
        slots (a constant on one side only is a computation a simplifier folded, not a change)."""
        ref, cand = self.graphs
        for a, b in zip(cand.inputs(node), ref.inputs(other)):
            if a in cand.constants and b in ref.constants and self.forward[1][a] != self.forward[0][b]:
                return False
        return True

    def _same_inputs(self, node: onnx.NodeProto, other: onnx.NodeProto) -> bool:
        ref, cand = self.graphs
        mine, theirs = cand.inputs(node), ref.inputs(other)
        if len(mine) != len(theirs):
            return False
        for a, b in zip(mine, theirs):
            if (a in cand.constants) != (b in ref.constants):
                return False
            if a in cand.constants:
                if self.forward[1][a] != self.forward[0][b]:
                    return False
            elif self.to_ref.get(a) != b:
                return False
        return True


def _by_op(graph: _Graph, paired) -> dict[tuple, list[str]]:
    """Unpaired tensors (not in `paired`) by the op, attributes and output index that make them."""
    found: dict[tuple, list[str]] = {}
    for name, (node, k) in graph.producer.items():
        if name not in paired and node.op_type != "Constant":
            found.setdefault((graph.kind[id(node)], k), []).append(name)
    return found


def _reader_ops(graph: _Graph, name: str) -> list[tuple]:
    return sorted(
        (n.domain, n.op_type, slot) for n, slot in graph.readers.get(name, []) if n.op_type not in READS_SHAPE_ONLY
    )


def is_identity(node: onnx.NodeProto) -> bool:
    """An Identity node that passes a tensor on (regions reads through them too)."""
    return is_onnx_op(node, "Identity") and bool(node.input) and bool(node.output)


def _apart(name: str, taken: set[str]) -> str:
    new = name + APART
    while new in taken:
        new += "_"
    return new


def _digest(*parts) -> str:
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()


def _attributes(node: onnx.NodeProto) -> str:
    return _digest(sorted((a.name, a.SerializeToString(deterministic=True)) for a in node.attribute))


def _forward(model: onnx.ModelProto, constant_label, graph: _Graph) -> dict[str, str]:
    """Each main-graph tensor's identity: what computes it, from what."""
    main = model.graph
    identity = {t.name: constant_label(t.name) for t in main.initializer}
    identity.update({t.values.name: constant_label(t.values.name) for t in main.sparse_initializer})
    identity.update({v.name: _digest("input", v.name) for v in main.input})  # an input overrides its initializer
    for index, node in enumerate(graph.nodes):
        if is_onnx_op(node, "Constant"):
            identity[node.output[0]] = constant_label(node.output[0])
            continue
        if is_identity(node) and node.input[0] in identity:
            identity[node.output[0]] = identity[node.input[0]]
            continue
        inputs = tuple(identity.get(name, _digest("unknown", name)) if name else "" for name in node.input)
        made = _digest(graph.kind[id(node)], inputs, index if node.op_type in RANDOM else None)
        for k, out in enumerate(node.output):
            if out:
                identity[out] = _digest(made, k)
    return identity


class _Constants:
    """Which constants (initializers, Constant nodes) of the two models hold equal values: each
    gets a label, one for equal values. A cheap fingerprint (type, shape and a sample of the
    bytes) groups them; only within a group are the bytes compared in full. A candidate constant
    takes the label of an equal reference constant, of its own name if there is one."""

    def __init__(self, reference: onnx.ModelProto, candidate: onnx.ModelProto, arrays):
        self.names: list[list[str]] = [[], []]
        self.labels: list[dict[str, str]] = [{}, {}]
        groups: dict[tuple, list[tuple[str, object]]] = {}  # the reference's constants
        for name, value in constant_values(reference, arrays[0]):
            group = groups.setdefault(_fingerprint(value), [])
            twin = next((n for n, v in group if _equal_values(v, value)), None)
            self.labels[0][name] = self.labels[0][twin] if twin else _digest("const", name)
            self.names[0].append(name)
            group.append((name, value))
        for name, value in constant_values(candidate, arrays[1]):
            equal = [n for n, v in groups.get(_fingerprint(value), []) if _equal_values(v, value)]
            twin = name if name in equal else next(iter(equal), None)
            self.labels[1][name] = self.labels[0][twin] if twin else _digest("candidate const", name)
            self.names[1].append(name)

    def label(self, side: int):
        return lambda name: self.labels[side][name]


def constant_values(model: onnx.ModelProto, arrays: dict):
    """(name, value) for each initializer and Constant node output of the main graph; the value
    is an array, or bytes standing for it (an external tensor's location, a Constant's attribute)."""
    for tensor in model.graph.initializer:
        if tensor.name in arrays:
            yield tensor.name, arrays[tensor.name]
        elif tensor.data_location == TensorProto.EXTERNAL:
            yield tensor.name, repr(("external", tensor.data_type, list(tensor.dims), list(tensor.external_data)))
        else:
            yield tensor.name, _array(tensor)
    for sparse in model.graph.sparse_initializer:
        copy = onnx.SparseTensorProto()
        copy.CopyFrom(sparse)
        copy.values.name = ""
        yield sparse.values.name, repr(copy.SerializeToString(deterministic=True))
    for node in model.graph.node:
        if is_onnx_op(node, "Constant") and node.attribute:
            attr = node.attribute[0]
            if attr.name == "value":
                yield node.output[0], _array(attr.t)
            else:
                yield node.output[0], repr((attr.name, attr.SerializeToString(deterministic=True)))


def _array(tensor: TensorProto):
    try:
        return numpy_helper.to_array(tensor)
    except Exception:  # a type numpy cannot hold: its serialization, without its name
        copy = TensorProto()
        copy.CopyFrom(tensor)
        copy.name = ""
        return repr(copy.SerializeToString(deterministic=True))


def _fingerprint(value) -> tuple:
    """Type, shape and three contiguous samples of the bytes (its start, middle and end): a few
    pages of a weight that lies in a mapped file, not every one of them."""
    if isinstance(value, str):
        return ("text", _digest(value))
    flat = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
    middle = max(0, flat.size // 2 - SAMPLE // 2)
    samples = (flat[:SAMPLE], flat[middle : middle + SAMPLE], flat[-SAMPLE:])
    return (str(value.dtype), value.shape, hashlib.blake2b(b"".join(s.tobytes() for s in samples)).hexdigest())


def _equal_values(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    # byte for byte, without copies (memcmp): NaN equals a NaN of the same bits
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if a.dtype.kind == "V":  # ml_dtypes' int4, bfloat16, float8: no buffer format of their own
        a, b = a.view(np.uint8), b.view(np.uint8)
    return memoryview(a).cast("B") == memoryview(b).cast("B")


def _renamed(model: onnx.ModelProto, renamed: dict[str, str]) -> onnx.ModelProto:
    """A copy of the model with its main-graph tensors renamed, wherever they are read. A
    value_info for a tensor the graph no longer has (onnxruntime's offline optimizer keeps
    them) goes: under a name the renaming gives another tensor, its type would be that one's."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if not renamed:
        return copy
    graph = copy.graph
    present = set(all_names(graph))
    for i in reversed(range(len(graph.value_info))):
        if graph.value_info[i].name not in present:
            del graph.value_info[i]
    for tensor in graph.initializer:
        tensor.name = renamed.get(tensor.name, tensor.name)
    for tensor in graph.sparse_initializer:
        tensor.values.name = renamed.get(tensor.values.name, tensor.values.name)
    for info in graph.value_info:
        info.name = renamed.get(info.name, info.name)
    for node in graph.node:
        node.input[:] = [renamed.get(n, n) for n in node.input]
        node.output[:] = [renamed.get(n, n) for n in node.output]
        for inner in (n for g in subgraphs(node) for n in all_nodes(g)):
            inner.input[:] = [renamed.get(n, n) for n in inner.input]
    return copy
