"""Reading ONNX protos: how nodes are named in reports, their subgraphs and attributes."""

from __future__ import annotations

from collections.abc import Iterator

import onnx

ONNX_DOMAINS = ("", "ai.onnx")


def node_label(node: onnx.NodeProto) -> str:
    """How the report names a node: `Conv 'conv1'`, or by its first output when unnamed."""
    if node.name:
        return f"{node.op_type} '{node.name}'"
    first = node.output[0] if node.output else "?"
    return f"{node.op_type} (output '{first}')"


def is_onnx_op(node: onnx.NodeProto, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in ONNX_DOMAINS


def int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def float_attr(node: onnx.NodeProto, name: str, default: float) -> float:
    return next((float(a.f) for a in node.attribute if a.name == name), default)


def str_attr(node: onnx.NodeProto, name: str, default: str) -> str:
    return next((a.s.decode() for a in node.attribute if a.name == name), default)


def ints_attr(node: onnx.NodeProto, name: str) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == name), None)


def set_float_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    for attr in node.attribute:
        if attr.name == name:
            attr.f = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


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


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of a graph and of its subgraphs."""
    for node in graph.node:
        yield node
        for body in subgraphs(node):
            yield from all_nodes(body)


def outer_scope_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs use without defining them (read from the enclosing scope)."""
    names: set[str] = set()
    for sub in subgraphs(node):
        defined = {v.name for v in sub.input}
        defined.update(t.name for t in sub.initializer)
        defined.update(t.values.name for t in sub.sparse_initializer)
        used = {v.name for v in sub.output}
        for inner in sub.node:
            used.update(n for n in inner.input if n)
            used |= outer_scope_reads(inner)
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


def delete_where(field, doomed) -> None:
    """Delete the elements of a repeated protobuf field for which doomed(index, item) holds.

    Deletes in place from the back: rebuilding the field would copy every tensor in it.
    """
    for i in reversed([i for i, item in enumerate(field) if doomed(i, item)]):
        del field[i]
