"""Values known before run time: initializers, Constant nodes, Identity chains, and pure ops
(bnfold.graph.index.PURE_OPS) over those, computed by onnx's reference evaluator when a fold
needs them (PyTorch's dynamo exporter builds a missing conv bias as Expand(CastLike(0, x),
Shape(W)); FrozenBatchNorm exports Sqrt/Reciprocal/Mul)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.graph.index import PURE_OPS, GraphIndex
from bnfold.graph.protos import ONNX_DOMAINS, is_onnx_op, node_label
from bnfold.graph.shapes import Shapes

MAX_EVALUATED_ELEMENTS = 1 << 24  # a constant subgraph larger than this is not evaluated


class NotConstant(Exception):
    """The tensor's value is not known before run time; the message says why."""


class Constants:
    """The constant values of one graph, decided and computed once per name.

    A name's status stays valid while the graph is folded: folds never rewrite a tensor in place,
    they add new ones; only a name that gets a new producer (the index tells) is looked at again.
    """

    def __init__(
        self,
        index: GraphIndex,
        shapes: Shapes,
        read: Callable[[onnx.TensorProto], np.ndarray],
        opset: int,
        parent: Constants | None = None,
    ):
        """`read` gives an initializer's values; `parent` is the enclosing graph's, for a
        subgraph (If/Loop/Scan body) that reads names from there."""
        self.index, self.shapes, self.read, self.opset, self.parent = index, shapes, read, opset, parent
        self._evaluated: dict[str, np.ndarray] = {}
        self._status: dict[str, str | None] = {}  # name → why it is not constant (None: it is)
        index.on_redefine.append(lambda name: self._status.pop(name, None))

    def value(self, name: str) -> np.ndarray:
        """The value of `name`. Whether it is constant is decided first, iteratively and once
        per name, so a long non-constant chain (a transformer's residual stream) costs one walk
        and no deep recursion."""
        reason = self.why_not(name)
        if reason is not None:
            raise NotConstant(reason)
        try:
            return self._compute(name)
        except RecursionError:
            raise NotConstant(f"'{name}' is computed by a constant chain too deep to evaluate") from None

    def why_not(self, name: str) -> str | None:
        """None when `name` is a constant bnfold can compute, else why not (memoized)."""
        stack, on_stack = [name], {name}
        while stack:
            current = stack[-1]
            if current in self._status:
                on_stack.discard(stack.pop())
                continue
            needs, reason = self._needs(current)
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

    # ---- internals -----------------------------------------------------------------------
    def _needs(self, name: str) -> tuple[list[str], str | None]:
        """The names `name`'s constant-ness depends on, or the reason it is not constant."""
        index = self.index
        if index.initializer(name) is not None:
            if index.is_overridable(name):
                return [], f"'{name}' is also a graph input, so a caller can override it at run time"
            return [], None
        node = index.producer(name)
        if node is None:
            if name in index.graph_inputs:
                return [], f"'{name}' is a graph input"
            if self.parent is not None:
                return [], self.parent.why_not(name)  # read from the enclosing scope
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
        if node.op_type == "Shape" and self.shapes.declared_shape(needs[0]) is not None:
            return [], None  # only the shape matters, and it is declared
        if node.op_type == "CastLike" and len(needs) == 2 and self.shapes.declared_type(needs[1]):
            return needs[:1], None  # only the second input's type matters, and it is declared
        return needs, None

    def _compute(self, name: str) -> np.ndarray:
        while True:
            if name in self._evaluated:
                return self._evaluated[name]
            tensor = self.index.initializer(name)
            if tensor is not None:
                return self.read(tensor)
            node = self.index.producer(name)
            if node is None:
                return self.parent.value(name)  # known constant in the enclosing scope
            if is_onnx_op(node, "Identity"):
                name = node.input[0]
            elif is_onnx_op(node, "Constant"):
                return constant_node_value(node)
            else:
                return self._evaluate(node, name)

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
                values.append(self.value(input_name))
        requested = _result_elements(node, values)
        if requested > MAX_EVALUATED_ELEMENTS:  # bounded before anything is computed
            raise NotConstant(f"'{name}' would be a constant of {requested:.0f} elements")
        try:
            feeds = {n: v for n, v in zip(node.input, values) if n}
            evaluated = self._alone(node) if _superseded(node.op_type, self.opset) else node
            outputs = ReferenceEvaluator(evaluated).run(None, feeds)
        except Exception as exc:  # the reference evaluator's own failures: not a usable constant
            raise NotConstant(f"'{name}' could not be computed ({type(exc).__name__})") from None
        for out, value in zip(node.output, outputs):
            value = np.asarray(value)
            if value.size > MAX_EVALUATED_ELEMENTS:
                raise NotConstant(f"'{name}' would be a constant of {value.size} elements")
            self._evaluated[out] = value
        return self._evaluated[name]

    def _alone(self, node: onnx.NodeProto) -> onnx.ModelProto:
        """`node` as a model of its own at this graph's opset: the reference evaluator then runs
        the op's version in force (given a bare node, it runs the latest: Unsqueeze-13 refuses
        the `axes` attribute of Unsqueeze-1 and -11, which Caffe2-style exports write)."""
        inputs = [onnx.ValueInfoProto(name=n) for n in dict.fromkeys(n for n in node.input if n)]
        outputs = [onnx.ValueInfoProto(name=n) for n in node.output if n]
        graph = onnx.helper.make_graph([node], "constant", inputs, outputs)
        return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", self.opset)])

    def _dtype(self, name: str) -> np.dtype:
        elem_type = self.shapes.declared_type(name)
        if elem_type:
            return onnx.helper.tensor_dtype_to_np_dtype(elem_type)
        return self.value(name).dtype

    def _static_shape(self, name: str) -> tuple[int, ...]:
        declared = self.shapes.declared_shape(name)
        return declared if declared is not None else self.value(name).shape


@functools.cache
def _superseded(op_type: str, opset: int) -> bool:
    """Whether the op's version in force at `opset` is older than the latest (which the reference
    evaluator runs for a bare node)."""
    try:
        return onnx.defs.get_schema(op_type, opset).since_version != onnx.defs.get_schema(op_type).since_version
    except onnx.defs.SchemaError:
        return False


BROADCASTING = ("Add", "Sub", "Mul", "Div", "Pow")


def _result_elements(node: onnx.NodeProto, values: list) -> float:
    """An upper bound on how many elements `node` computes from `values` (its inputs), known
    before computing them: broadcasting ops give the broadcast shape, Expand its shape input
    broadcast with its data, ConstantOfShape its shape, Concat the sum, Gather the indices times
    a slice; every other pure op gives at most as many elements as its inputs hold."""
    shapes = [np.shape(v) for v in values if v is not None]
    sizes = [float(np.prod(s, dtype=np.float64)) for s in shapes]
    try:
        if node.op_type in BROADCASTING:
            return float(np.prod(np.broadcast_shapes(*shapes), dtype=np.float64))
        if node.op_type == "Expand":
            target = tuple(int(d) for d in np.asarray(values[1]).reshape(-1))
            return float(np.prod(np.broadcast_shapes(shapes[0], target), dtype=np.float64))
        if node.op_type == "ConstantOfShape":
            return float(np.prod(np.asarray(values[0], dtype=np.float64)))
        if node.op_type == "Concat":
            return sum(sizes)
        if node.op_type == "Gather":
            return sizes[0] * max(sizes[1], 1.0)
    except ValueError:  # shapes that do not broadcast: the evaluator will say so
        return max(sizes, default=0.0)
    return max(sizes, default=0.0)


def constant_node_value(node: onnx.NodeProto) -> np.ndarray:
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
