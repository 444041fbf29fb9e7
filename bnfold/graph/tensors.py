"""The data of the tensors a fold creates, and fresh names for them.

New tensors hold no data in the GraphProto while the model is folded: their values wait here
as arrays, to be streamed to the output file (bnfold.io) or put into the tree at the end
(`store_pending`). Copying them into the tree while folding would double the memory of every
folded weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx

from bnfold.graph.protos import subgraphs

TensorReader = Callable[[onnx.TensorProto], np.ndarray]


class TensorStore:
    """Pending values by tensor name (shared by the graphs of one model), and how to read the
    model's own initializers (`read_stored`: their data may be outside the tree)."""

    def __init__(self, read_stored: TensorReader):
        self.pending: dict[str, np.ndarray] = {}
        self.read_stored = read_stored

    def put(self, name: str, values: np.ndarray) -> None:
        self.pending[name] = np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<"), copy=False)

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        pending = self.pending.get(tensor.name)
        return pending if pending is not None else self.read_stored(tensor)

    def is_pending(self, tensor: onnx.TensorProto) -> bool:
        return tensor.name in self.pending

    def drop(self, names: Iterable[str]) -> None:
        for name in names:
            self.pending.pop(name, None)


def store_pending(graph: onnx.GraphProto, pending: dict[str, np.ndarray], *, subgraphs_only: bool = False) -> None:
    """Put the pending values of the tensors in `graph` and its subgraphs into the tree (all of
    them, or only the subgraphs', whose tensors a streamed write does not reach)."""
    if not subgraphs_only:
        for tensor in graph.initializer:
            if tensor.name in pending:
                tensor.raw_data = pending.pop(tensor.name).tobytes()
    for node in graph.node:
        for body in subgraphs(node):
            store_pending(body, pending)


class Names:
    """Fresh names that shadow none of a model's names. Each base remembers how far its
    numbering got, so many tensors from one base cost linear time, not quadratic."""

    def __init__(self, taken: Iterable[str]):
        self._taken = set(taken)
        self._next: dict[str, int] = {}

    def fresh(self, base: str) -> str:
        # Names are only ever added, so every `base_k` skipped before is still taken.
        k = self._next.get(base, 0)
        name = base if k == 0 else f"{base}_{k}"
        while name in self._taken:
            k += 1
            name = f"{base}_{k}"
        self._next[base] = k
        self._taken.add(name)
        return name
