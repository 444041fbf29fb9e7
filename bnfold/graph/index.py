"""Who produces and who reads each tensor of one GraphProto, kept current through every edit.

Built once per graph, in one pass. Rewrites go through its methods, so no rule rescans the
graph, and so the index sees every edit: each name that loses its last reader or its producer
is recorded, and `sweep()` walks back from exactly those names to remove what became dead.
`commit()` applies removals to the GraphProto once, at the end.

"Reads" includes implicit reads: a node with a subgraph (If, Loop, Scan) reads every outer-scope
name its body uses, so a tensor used only inside a branch still counts as used. When a body is
rewritten, `refresh_reads` updates the enclosing graph's record of what the body reads.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import onnx

from bnfold.graph.protos import ONNX_DOMAINS, delete_where, outer_scope_reads

# Deterministic ops without side effects: a constant feeding one gives a constant (see
# bnfold.graph.constants), and one that feeds nothing any more can be swept.
PURE_OPS = frozenset(
    {
        "Abs", "Add", "Cast", "CastLike", "Concat", "ConstantOfShape", "Div", "Exp", "Expand",
        "Flatten", "Gather", "Log", "Mul", "Neg", "Pow", "Reciprocal", "Reshape", "Shape",
        "Slice", "Sqrt", "Squeeze", "Sub", "Transpose", "Unsqueeze",
        # a QAT export's fake-quantized weight is QuantizeLinear of constants: its integers
        "QuantizeLinear",
    }
)  # fmt: skip
# …and what else goes once nothing reads it: a quantized model's DequantizeLinear of a folded
# BN's parameters (never evaluated as a constant: a fold into its output would dequantize it).
SWEEPABLE = PURE_OPS | {"Identity", "Constant", "DequantizeLinear"}


class GraphIndex:
    def __init__(self, graph: onnx.GraphProto, *, initializers_are_defaults: bool):
        """`initializers_are_defaults`: an initializer that is also a graph input may be
        overridden by the caller (IR v4 and later, and every subgraph, whose inputs are its own);
        before IR v4 every initializer had to be listed as an input and was a constant anyway."""
        self.graph = graph
        self.initializers_are_defaults = initializers_are_defaults
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = {v.name for v in graph.input}
        self.graph_outputs = {v.name for v in graph.output}
        self._nodes = list(graph.node)  # holds the wrappers, so id() stays stable
        self._removed_nodes: set[int] = set()
        self._removed_initializers: set[str] = set()
        self._vanished: set[str] = set()  # names this pass stopped producing
        self._orphans: list[str] = []  # names that lost their last reader or their producer
        self._producer: dict[str, onnx.NodeProto] = {}
        self._readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self._implicit: dict[int, set[str]] = {}  # id(node) → what its subgraphs read from here
        self.on_redefine: list[Callable[[str], None]] = []  # told when a name gets a new producer
        for node in self._nodes:
            for name in node.output:
                if name:
                    self._producer[name] = node
            for name in self._reads(node):
                self._readers[name].append(node)

    # ---- queries -------------------------------------------------------------------------
    def producer(self, name: str) -> onnx.NodeProto | None:
        return self._producer.get(name)

    def readers(self, name: str) -> tuple[onnx.NodeProto, ...]:
        return tuple(self._readers.get(name, ()))

    def live_nodes(self) -> list[onnx.NodeProto]:
        """The graph's nodes in order, without those this pass removed (before commit)."""
        return [node for node in self._nodes if id(node) not in self._removed_nodes]

    def initializer(self, name: str) -> onnx.TensorProto | None:
        """The initializer called `name`, unless this pass removed it."""
        return None if name in self._removed_initializers else self.initializers.get(name)

    def is_used(self, name: str) -> bool:
        return bool(self._readers.get(name)) or name in self.graph_outputs

    @property
    def has_orphans(self) -> bool:
        """Whether edits left names that `sweep` should look at."""
        return bool(self._orphans)

    def is_overridable(self, name: str) -> bool:
        """Whether a caller can replace this initializer's value at run time."""
        return name in self.graph_inputs and self.initializers_are_defaults

    # ---- edits ---------------------------------------------------------------------------
    def add_initializer(self, name: str, data_type: int, dims: tuple[int, ...]) -> onnx.TensorProto:
        """Declare a new initializer (its data is kept elsewhere: bnfold.graph.tensors)."""
        # Built in place: appending a finished tensor copies it, and protobuf cannot copy into a
        # model tree past 2 GiB; setting the fields of a new element can.
        tensor = self.graph.initializer.add()
        tensor.name = name
        tensor.data_type = data_type
        tensor.dims.extend(dims)
        self.initializers[name] = tensor
        if not self.initializers_are_defaults:  # a main graph before IR v4
            # Before IR v4 the checker requires every initializer to be a graph input too.
            self.graph.input.append(onnx.helper.make_tensor_value_info(name, data_type, dims))
            self.graph_inputs.add(name)
        return tensor

    def set_input(self, node: onnx.NodeProto, position: int, name: str) -> None:
        old = node.input[position] if position < len(node.input) else ""
        if old:
            self._unread(old, node)
        while len(node.input) <= position:
            node.input.append("")
        node.input[position] = name
        if name:
            self._readers[name].append(node)

    def truncate_inputs(self, node: onnx.NodeProto, count: int) -> None:
        """Drop `node`'s inputs after the first `count`."""
        for name in node.input[count:]:
            if name:
                self._unread(name, node)
        del node.input[count:]

    def set_output(self, node: onnx.NodeProto, position: int, name: str) -> None:
        old = node.output[position]
        if self._producer.get(old) is node:
            self._unproduce(old)
        node.output[position] = name
        self._producer[name] = node
        for listener in self.on_redefine:
            listener(name)

    def insert_node(self, node: onnx.NodeProto, before: onnx.NodeProto) -> onnx.NodeProto:
        """Add a copy of `node` to the graph just before `before` (so that it precedes that reader
        in graph order); returns the graph's own copy, the one to edit further."""
        position = next(i for i, n in enumerate(self._nodes) if n is before)
        self.graph.node.insert(position, node)
        added = self.graph.node[position]
        self._nodes.insert(position, added)
        for name in added.output:
            if name:
                self._producer[name] = added
        for name in self._reads(added):
            self._readers[name].append(added)
        return added

    def remove_node(self, node: onnx.NodeProto) -> None:
        self._removed_nodes.add(id(node))
        for name in self._reads(node):
            self._unread(name, node)
        for name in node.output:
            if self._producer.get(name) is node:
                self._unproduce(name)

    def refresh_reads(self, node: onnx.NodeProto) -> None:
        """Re-read what `node`'s subgraphs take from this graph, after they were rewritten."""
        old, new = self._implicit.get(id(node), set()), outer_scope_reads(node)
        for name in old - new:
            self._unread(name, node)
        for name in new - old:
            self._readers[name].append(node)
        self._implicit[id(node)] = new

    def sweep(self) -> None:
        """Remove what became dead, walking back from the names edits orphaned: unused
        initializers and the Constant, Identity and pure-op nodes that fed only them. Other
        dead nodes were the model's own and stay."""
        pending, self._orphans = self._orphans, []
        while pending:
            name = pending.pop()
            if not name or self.is_used(name):
                continue
            node = self._producer.get(name)
            if node is not None:
                if node.domain not in ONNX_DOMAINS or node.op_type not in SWEEPABLE:
                    continue
                if any(self.is_used(out) for out in node.output):
                    continue
                self.remove_node(node)
                pending.extend(node.input)
            elif name in self.initializers and not self.is_overridable(name):
                self._removed_initializers.add(name)
                self._vanished.add(name)
        self._orphans.clear()  # what the sweep's own removals orphaned it has just walked

    def commit(self) -> list[str]:
        """Apply removals to the GraphProto, and drop value_info of the tensors that vanished.
        Returns the names of the initializers removed."""
        graph = self.graph
        delete_where(graph.node, lambda i, node: id(self._nodes[i]) in self._removed_nodes)
        self._nodes = list(graph.node)
        self._removed_nodes.clear()
        gone = sorted(self._removed_initializers)
        if gone:
            removed = set(gone)
            delete_where(graph.initializer, lambda i, tensor: tensor.name in removed)
            if not self.initializers_are_defaults:
                delete_where(graph.input, lambda i, value: value.name in removed)
                self.graph_inputs -= removed
            for name in gone:
                del self.initializers[name]
            self._removed_initializers.clear()
        live = set(self._producer) | self.graph_inputs | set(self.initializers)
        vanished = self._vanished - live
        delete_where(graph.value_info, lambda i, value: value.name in vanished)
        self._vanished.clear()
        return gone

    # ---- internals -----------------------------------------------------------------------
    def _unproduce(self, name: str) -> None:
        del self._producer[name]
        self._vanished.add(name)
        self._orphans.append(name)

    def _unread(self, name: str, node: onnx.NodeProto) -> None:
        """Drop one read of `name` by `node`, found by identity: protobuf's == compares contents."""
        readers = self._readers[name]
        for i, reader in enumerate(readers):
            if reader is node:
                del readers[i]
                break
        if not readers:
            self._orphans.append(name)

    def _reads(self, node: onnx.NodeProto) -> list[str]:
        implicit = self._implicit.get(id(node))
        if implicit is None:
            implicit = self._implicit[id(node)] = outer_scope_reads(node)
        return [*(n for n in node.input if n), *implicit]
