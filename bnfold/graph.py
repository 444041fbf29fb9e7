"""An index over one GraphProto: who produces and who reads each tensor, and which are constant.

Built once per graph in one pass. Rewrites go through its methods, which keep it current, so no
rule rescans the graph; `commit()` applies removals to the GraphProto once at the end.

"Reads" includes implicit reads: a node with a subgraph (If, Loop, Scan) reads every outer-scope
name its body uses, so a tensor used only inside a branch still counts as used.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

ONNX_DOMAINS = ("", "ai.onnx")

# Deterministic ops without side effects: a constant feeding one gives a constant, computed by
# onnx's reference evaluator when a fold needs it (PyTorch's dynamo exporter builds a missing
# conv bias as Expand(CastLike(0, x), Shape(W)); FrozenBatchNorm exports Sqrt/Reciprocal/Mul).
PURE_OPS = frozenset(
    {
        "Abs",
        "Add",
        "Cast",
        "CastLike",
        "Concat",
        "ConstantOfShape",
        "Div",
        "Exp",
        "Expand",
        "Flatten",
        "Gather",
        "Log",
        "Mul",
        "Neg",
        "Pow",
        "Reciprocal",
        "Reshape",
        "Shape",
        "Slice",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Transpose",
        "Unsqueeze",
    }
)
MAX_EVALUATED_ELEMENTS = 1 << 24  # a constant subgraph larger than this is not evaluated
TensorLoader = Callable[[onnx.TensorProto], np.ndarray]
SMALL_TENSOR = 1 << 12  # initializers up to this many elements keep their data for shape inference


class NotConstant(Exception):
    """The tensor's value is not known before run time; the message says why."""


def node_label(node: onnx.NodeProto) -> str:
    """How the report names a node: `Conv 'conv1'`, or by its first output when unnamed."""
    if node.name:
        return f"{node.op_type} '{node.name}'"
    first = node.output[0] if node.output else "?"
    return f"{node.op_type} (output '{first}')"


def is_onnx_op(node: onnx.NodeProto, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in ONNX_DOMAINS


def named_subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """A node's subgraphs (If branches, Loop and Scan bodies) with their attribute names."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for i, graph in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", graph


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    return (graph for _, graph in named_subgraphs(node))


def _outer_scope_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs use without defining them (read from the enclosing scope)."""
    names: set[str] = set()
    for sub in subgraphs(node):
        defined = {v.name for v in sub.input}
        defined.update(t.name for t in sub.initializer)
        defined.update(t.values.name for t in sub.sparse_initializer)
        used = {v.name for v in sub.output}
        for inner in sub.node:
            used.update(n for n in inner.input if n)
            used |= _outer_scope_reads(inner)
            defined.update(inner.output)
        names |= used - defined
    return names


def all_names(graph: onnx.GraphProto) -> Iterator[str]:
    """Every value name in a graph and its subgraphs, so a fresh name shadows nothing."""
    yield from (v.name for v in graph.input)
    yield from (v.name for v in graph.output)
    yield from (t.name for t in graph.initializer)
    yield from (t.values.name for t in graph.sparse_initializer)
    for node in graph.node:
        yield from node.input
        yield from node.output
        for sub in subgraphs(node):
            yield from all_names(sub)


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    """The value of a Constant node (spec: exactly one `value*` attribute)."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(attr.floats, dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(attr.ints, dtype=np.int64)
    raise NotConstant(f"{node_label(node)} holds no numeric tensor")


class GraphIndex:
    def __init__(
        self,
        graph: onnx.GraphProto,
        *,
        ir_version: int,
        opset: int,
        opset_imports: list | None = None,
        parent: GraphIndex | None = None,
        names: set[str] | None = None,
        new_values: dict[str, np.ndarray] | None = None,
        load_tensor: TensorLoader = numpy_helper.to_array,
    ):
        """`parent` is the index of the enclosing scope, for a subgraph (If/Loop/Scan body):
        names the body reads from there are looked up in it. `names` is the set of every name
        in the model, shared by the scopes so that fresh names shadow nothing.

        Tensors this pass creates hold no data in the GraphProto: their values wait in
        `new_values` (name → array, shared by the scopes), to be streamed to the output file or
        put into the tree by `store_new_values`. Copying them into the tree while folding would
        double the memory of every folded weight. `load_tensor` reads an initializer's values (it may be stored
        as external data that was not loaded)."""
        self.graph = graph
        self.new_values = {} if new_values is None else new_values
        self._load_tensor = load_tensor
        self.opset = opset
        self.parent = parent
        self._opset_imports = list(opset_imports or [onnx.helper.make_opsetid("", opset)])
        self._inferred: dict[str, onnx.TypeProto.Tensor] | None = None
        self._evaluated: dict[str, np.ndarray] = {}
        self._status: dict[str, str | None] = {}  # name → why it is not constant (None: it is)
        self._declared = {v.name: v.type.tensor_type for v in (*graph.input, *graph.value_info, *graph.output)}
        self._nodes = list(graph.node)  # holds the wrappers, so id() stays stable
        self._removed_nodes: set[int] = set()
        self._removed_initializers: set[str] = set()
        self._vanished: set[str] = set()  # names this pass stopped producing
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = {v.name for v in graph.input}
        self.graph_outputs = {v.name for v in graph.output}
        # IR v4 made initializers that are also graph inputs overridable defaults; before it
        # every initializer had to be listed as a graph input and was a constant all the same.
        # A subgraph's inputs are its own (loop state, scan slices): never constants.
        self.inputs_override_initializers = ir_version >= 4 or parent is not None
        self._producer: dict[str, onnx.NodeProto] = {}
        self._readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self._names = names
        for node in self._nodes:
            for name in node.output:
                if name:
                    self._producer[name] = node
            for name in self._reads(node):
                self._readers[name].append(node)

    # ---- queries -------------------------------------------------------------------------
    def producer(self, name: str) -> onnx.NodeProto | None:
        return self._producer.get(name)

    def readers(self, name: str) -> list[onnx.NodeProto]:
        return self._readers.get(name, [])

    def live_nodes(self) -> list[onnx.NodeProto]:
        """The graph's nodes in order, without those this pass removed (before commit)."""
        return [node for node in self._nodes if id(node) not in self._removed_nodes]

    def defines(self, name: str) -> bool:
        """Whether `name` belongs to this scope (not read from an enclosing one)."""
        return (
            name in self._producer or name in self.initializers or name in self.graph_inputs or name in self._vanished
        )

    def is_used(self, name: str) -> bool:
        return bool(self._readers.get(name)) or name in self.graph_outputs

    def rank(self, name: str) -> int | None:
        """The rank of a tensor, from declared types or else one shape inference, or None."""
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        """A tensor's dims (None where only known at run time), from declared types or else one
        shape inference; None when even the rank is unknown."""
        declared = self._declared.get(name)
        if declared is None or not declared.HasField("shape"):
            if self._inferred is None:
                self._inferred = self._infer_types()
            declared = self._inferred.get(name)
        if declared is None or not declared.HasField("shape"):
            return None
        return tuple(d.dim_value if d.HasField("dim_value") else None for d in declared.shape.dim)

    def constant_value(self, name: str) -> np.ndarray:
        """The value of `name`: an initializer, a Constant, or computed from those by Identity
        chains and pure ops (PURE_OPS). Whether it is constant is decided first, iteratively
        and once per name, so a long non-constant chain (a transformer's residual stream) costs
        one walk and no deep recursion."""
        reason = self._why_not_constant(name)
        if reason is not None:
            raise NotConstant(reason)
        try:
            return self._compute(name)
        except RecursionError:
            raise NotConstant(f"'{name}' is computed by a constant chain too deep to evaluate") from None

    def _compute(self, name: str) -> np.ndarray:
        while True:
            if name in self._evaluated:
                return self._evaluated[name]
            if name in self.new_values:
                return self.new_values[name]
            if name in self.initializers and name not in self._removed_initializers:
                return self._load_tensor(self.initializers[name])
            node = self._producer.get(name)
            if node is None:
                return self.parent.constant_value(name)  # known constant in the enclosing scope
            if is_onnx_op(node, "Identity"):
                name = node.input[0]
            elif is_onnx_op(node, "Constant"):
                return _constant_node_value(node)
            else:
                return self._evaluate(node, name)

    def _why_not_constant(self, name: str) -> str | None:
        """None when `name` is a constant bnfold can compute, else why not (memoized)."""
        stack, on_stack = [name], {name}
        while stack:
            current = stack[-1]
            if current in self._status:
                on_stack.discard(stack.pop())
                continue
            needs, reason = self._constant_needs(current)
            if reason is None:
                if any(n in on_stack and n not in self._status for n in needs):
                    reason = f"'{current}' depends on itself (the graph has a cycle)"
                else:
                    waiting = [n for n in needs if n not in self._status]
                    if waiting:
                        stack.extend(waiting)
                        on_stack.update(waiting)
                        continue
                    reason = next((self._status[n] for n in needs if self._status[n] is not None), None)
            self._status[current] = reason
            on_stack.discard(stack.pop())
        return self._status[name]

    def _constant_needs(self, name: str) -> tuple[list[str], str | None]:
        """The names `name`'s constant-ness depends on, or the reason it is not constant."""
        if name in self.initializers and name not in self._removed_initializers:
            if name in self.graph_inputs and self.inputs_override_initializers:
                return [], f"'{name}' is also a graph input, so a caller can override it at run time"
            return [], None
        node = self._producer.get(name)
        if node is None:
            if name in self.graph_inputs:
                return [], f"'{name}' is a graph input"
            if self.parent is not None:
                return [], self.parent._why_not_constant(name)  # read from the enclosing scope
            return [], f"'{name}' is not defined in this graph"
        if is_onnx_op(node, "Identity"):
            return [node.input[0]], None
        if is_onnx_op(node, "Constant"):
            if any(a.ref_attr_name for a in node.attribute):  # inside a function, bound at each call site
                return [], f"{node_label(node)} takes its value from the function's caller"
            return [], None
        if node.op_type not in PURE_OPS or node.domain not in ONNX_DOMAINS:
            return [], f"'{name}' is computed by {node_label(node)}"
        needs = [n for n in node.input if n]
        if node.op_type == "Shape" and self._declared_shape(needs[0]) is not None:
            return [], None  # only the shape matters, and it is declared
        if node.op_type == "CastLike" and len(needs) == 2 and self._declared_type(needs[1]):
            return needs[:1], None  # only the second input's type matters, and it is declared
        return needs, None

        # ---- edits ---------------------------------------------------------------------------

    def fresh_name(self, base: str) -> str:
        if self._names is None:
            self._names = set(all_names(self.graph))
        name, k = base, 0
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def add_initializer(self, values: np.ndarray, base_name: str) -> str:
        """Store `values` under a fresh name; existing tensors are never rewritten in place."""
        name = self.fresh_name(base_name)
        # Built in place: appending a finished tensor copies it, and protobuf cannot copy into a
        # model tree past 2 GiB; setting the fields of a new element can.
        tensor = self.graph.initializer.add()
        tensor.name = name
        tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
        tensor.dims.extend(values.shape)
        self.new_values[name] = np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<"), copy=False)
        self.initializers[name] = tensor
        if not self.inputs_override_initializers:  # a main graph before IR v4
            # Before IR v4 the checker requires every initializer to be a graph input too.
            self.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, values.shape))
            self.graph_inputs.add(name)
        return name

    def set_input(self, node: onnx.NodeProto, position: int, name: str) -> None:
        old = node.input[position] if position < len(node.input) else ""
        if old:
            self._unread(old, node)
        while len(node.input) <= position:
            node.input.append("")
        node.input[position] = name
        if name:
            self._readers[name].append(node)

    def set_output(self, node: onnx.NodeProto, position: int, name: str) -> None:
        old = node.output[position]
        if self._producer.get(old) is node:
            del self._producer[old]
            self._vanished.add(old)
        node.output[position] = name
        self._producer[name] = node
        self._status.pop(name, None)

    def remove_node(self, node: onnx.NodeProto) -> None:
        self._removed_nodes.add(id(node))
        for name in self._reads(node):
            self._unread(name, node)
        for name in node.output:
            if self._producer.get(name) is node:
                del self._producer[name]
                self._vanished.add(name)

    def sweep(self, names: Iterable[str]) -> None:
        """Remove what became dead, walking back from `names`: unused initializers and the
        Constant, Identity and pure-op nodes that fed only them. Other dead nodes were the
        model's own and stay."""
        pending = list(names)
        while pending:
            name = pending.pop()
            if not name or self.is_used(name):
                continue
            node = self._producer.get(name)
            if node is not None:
                if node.domain not in ONNX_DOMAINS or node.op_type not in PURE_OPS | {"Identity", "Constant"}:
                    continue
                if any(self.is_used(out) for out in node.output):
                    continue
                self.remove_node(node)
                pending.extend(node.input)
            elif name in self.initializers and not (name in self.graph_inputs and self.inputs_override_initializers):
                self._removed_initializers.add(name)
                self._vanished.add(name)

    def commit(self) -> None:
        """Apply removals to the GraphProto, and drop value_info of the tensors that vanished."""
        graph = self.graph
        _delete_where(graph.node, lambda i, node: id(self._nodes[i]) in self._removed_nodes)
        self._nodes = list(graph.node)
        self._removed_nodes.clear()
        gone = self._removed_initializers
        if gone:
            _delete_where(graph.initializer, lambda i, tensor: tensor.name in gone)
            if not self.inputs_override_initializers:
                _delete_where(graph.input, lambda i, value: value.name in gone)
                self.graph_inputs -= gone
            for name in gone:
                del self.initializers[name]
                self.new_values.pop(name, None)
            gone.clear()
        live = set(self._producer) | self.graph_inputs | set(self.initializers)
        vanished = self._vanished - live
        _delete_where(graph.value_info, lambda i, value: value.name in vanished)
        self._vanished.clear()

    # ---- internals -----------------------------------------------------------------------
    def _evaluate(self, node: onnx.NodeProto, name: str) -> np.ndarray:
        """Compute a pure op whose inputs are constant. CastLike needs only its second input's
        type and Shape only its input's shape, which a declared type or shape gives too."""
        from onnx.reference import ReferenceEvaluator

        values = []
        for position, input_name in enumerate(node.input):
            if not input_name:
                values.append(None)
            elif node.op_type == "Shape":  # a zero-stride view: the shape without the memory
                values.append(np.broadcast_to(np.zeros((), np.uint8), self._static_shape(input_name)))
            elif node.op_type == "CastLike" and position == 1:
                values.append(np.zeros(0, dtype=self._dtype(input_name)))
            else:
                values.append(self.constant_value(input_name))
        if node.op_type in ("Expand", "ConstantOfShape"):
            requested = np.prod(values[-1 if node.op_type == "Expand" else 0], dtype=np.float64)
            if requested > MAX_EVALUATED_ELEMENTS:
                raise NotConstant(f"'{name}' would be a constant of {requested:.0f} elements")
        try:
            feeds = {n: v for n, v in zip(node.input, values) if n}
            outputs = ReferenceEvaluator(node, opsets={"": self.opset}).run(None, feeds)
        except Exception as exc:  # the reference evaluator's own failures: not a usable constant
            raise NotConstant(f"'{name}' could not be computed ({type(exc).__name__})") from None
        for out, value in zip(node.output, outputs):
            value = np.asarray(value)
            if value.size > MAX_EVALUATED_ELEMENTS:
                raise NotConstant(f"'{name}' would be a constant of {value.size} elements")
            self._evaluated[out] = value
        return self._evaluated[name]

    def _infer_types(self) -> dict[str, onnx.TypeProto.Tensor]:
        """onnx shape inference on a copy of the graph whose large initializers keep their dims
        but not their data, so weights are never copied; small ones (Reshape targets, axes) keep
        their values for data propagation."""
        light = onnx.GraphProto()
        light.node.extend(self.graph.node)
        light.input.extend(self.graph.input)
        light.output.extend(self.graph.output)
        light.value_info.extend(self.graph.value_info)
        for tensor in self.graph.initializer:
            small = np.prod(tensor.dims, dtype=np.float64) <= SMALL_TENSOR
            if small and tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.name not in self.new_values:
                light.initializer.append(tensor)
            else:
                light.initializer.append(
                    onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
                )
        model = onnx.helper.make_model(light, opset_imports=self._opset_imports)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
        except Exception:  # inference is a convenience here; without it ranks stay unknown
            return {}
        return {v.name: v.type.tensor_type for v in (*inferred.value_info, *inferred.output, *inferred.input)}

    def _declared_type(self, name: str) -> int:
        declared = self._declared.get(name)
        return declared.elem_type if declared is not None else 0

    def _declared_shape(self, name: str) -> tuple[int, ...] | None:
        declared = self._declared.get(name)
        if declared is None or not declared.HasField("shape"):
            return None
        dims = declared.shape.dim
        if not all(d.HasField("dim_value") for d in dims):
            return None
        return tuple(d.dim_value for d in dims)

    def _dtype(self, name: str) -> np.dtype:
        elem_type = self._declared_type(name)
        if elem_type:
            return onnx.helper.tensor_dtype_to_np_dtype(elem_type)
        return self.constant_value(name).dtype

    def _static_shape(self, name: str) -> tuple[int, ...]:
        declared = self._declared_shape(name)
        return declared if declared is not None else self.constant_value(name).shape

    def _unread(self, name: str, node: onnx.NodeProto) -> None:
        """Drop one read of `name` by `node`, found by identity: protobuf's == compares contents."""
        readers = self._readers[name]
        for i, reader in enumerate(readers):
            if reader is node:
                del readers[i]
                return

    @staticmethod
    def _reads(node: onnx.NodeProto) -> list[str]:
        reads = [n for n in node.input if n]
        reads.extend(_outer_scope_reads(node))
        return reads


def store_new_values(
    graph: onnx.GraphProto, new_values: dict[str, np.ndarray], *, subgraphs_only: bool = False
) -> None:
    """Store the pending values of the tensors in `graph` and its subgraphs (all of them, or
    only the subgraphs', whose tensors a streamed write does not reach)."""
    if not subgraphs_only:
        for tensor in graph.initializer:
            if tensor.name in new_values:
                tensor.raw_data = new_values.pop(tensor.name).tobytes()
    for node in graph.node:
        for body in subgraphs(node):
            store_new_values(body, new_values)


def _delete_where(field, doomed) -> None:
    """Delete the elements of a repeated protobuf field for which doomed(index, item) holds.

    Deletes in place from the back: rebuilding the field would copy every tensor in it.
    """
    for i in reversed([i for i, item in enumerate(field) if doomed(i, item)]):
        del field[i]
