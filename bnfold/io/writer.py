"""Writing a model tensor by tensor: folded tensors straight from their arrays, stubs' bytes
copied file to file, never the whole model serialized at once (which also works past
protobuf's 2 GiB limit for one message). `write_skeleton` writes what onnx.checker needs to
see, without the large tensors' data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import BnfoldError
from bnfold.graph.protos import subgraphs
from bnfold.io.source import ModelSource
from bnfold.io.tensors import EXTERNAL_FIELDS, RAW_FIELDS, initializers, inlined, payload_size
from bnfold.io.wire import GRAPH_INITIALIZER, MODEL_GRAPH, TENSOR_RAW_DATA, field_header, shell

EXTERNAL_THRESHOLD = 1024  # tensors of at least this many bytes go to the data file
ALIGNMENT = 4096  # external tensors start at page boundaries, so they can be memory-mapped


class ModelWriter:
    """Writes a ModelProto in the protobuf wire format, one initializer at a time.

    Each main-graph initializer's data comes from, in this order: `pending` (arrays of the
    tensors the fold created), the `source` file it was opened from (a stub's bytes, copied
    file to file when the output keeps external data too), or the tensor itself. With a `data`
    file, tensors of at least EXTERNAL_THRESHOLD bytes go there, page-aligned, as external data
    at `location`. Every tensor's data is checked against its dims and type on the way.
    """

    def __init__(self, out, pending: dict[str, np.ndarray], source: ModelSource | None, data=None, location: str = ""):
        self.out, self.data, self.location = out, data, location
        self.pending, self.source = pending, source
        self.offset = 0  # in the data file

    def write(self, model: onnx.ModelProto) -> None:
        self.out.write(shell(model, {"graph"}).SerializeToString())
        graph = shell(model.graph, {"initializer"})
        if self.data is not None:
            self._externalize_nested(graph)
        self._write_graph_chunk([graph.SerializeToString()])
        for tensor in model.graph.initializer:
            self._write_tensor(tensor)

    def _write_graph_chunk(self, parts: list) -> None:
        length = sum(len(p) for p in parts)
        self.out.write(field_header(MODEL_GRAPH, length))
        for part in parts:
            self.out.write(part)

    def _write_tensor(self, tensor: onnx.TensorProto) -> None:
        values = self.pending.get(tensor.name)
        span = self.source.span(tensor) if self.source is not None else None
        if values is not None:
            payload = memoryview(values).cast("B")
        elif span is not None:
            payload = None  # read or copied from the file it lies in, below
        elif tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise BnfoldError(f"tensor '{tensor.name}' has external data that was not opened with the model")
        elif tensor.HasField("raw_data"):
            payload = tensor.raw_data
        else:  # values in typed fields (float_data, ...): rare and small; the model is not changed
            if self.data is not None and tensor.data_type != onnx.TensorProto.STRING:
                tensor = _copy(tensor)
                self._externalize_tensor(tensor)
            self._write_tensor_bytes([tensor.SerializeToString()])
            return
        expected = payload_size(tensor)
        size = span.length if payload is None else len(payload)
        if expected is not None and size < expected:
            raise BnfoldError(f"tensor '{tensor.name}' holds {size} bytes of data; its dims and type need {expected}")
        header = shell(tensor, RAW_FIELDS | EXTERNAL_FIELDS)
        if self.data is not None and size >= EXTERNAL_THRESHOLD:
            if payload is None:
                self._append_data(header, size, lambda: span.copy_to(self.data, tensor.name))
            else:
                self._append_data(header, size, lambda: self.data.write(payload))
            self._write_tensor_bytes([header.SerializeToString()])
            return
        if payload is None:
            payload = span.read(tensor.name)
        self._write_tensor_bytes([header.SerializeToString(), field_header(TENSOR_RAW_DATA, len(payload)), payload])

    def _write_tensor_bytes(self, parts: list) -> None:
        length = sum(len(p) for p in parts)
        self._write_graph_chunk([field_header(GRAPH_INITIALIZER, length), *parts])

    def _append_data(self, tensor: onnx.TensorProto, length: int, write: Callable[[], None]) -> None:
        """Write `length` bytes (by calling `write`) at the next page boundary of the data file
        and point `tensor` at them as its external data."""
        padding = -self.offset % ALIGNMENT
        self.data.write(b"\0" * padding)
        self.offset += padding
        write()
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)
        self.offset += length

    def _externalize_tensor(self, tensor: onnx.TensorProto) -> None:
        """Move a tensor held in the protobuf tree to the data file, if it is big enough."""
        if tensor.HasField("raw_data"):
            raw = tensor.raw_data
        else:
            raw = numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data
        if len(raw) < EXTERNAL_THRESHOLD:
            return
        for field in RAW_FIELDS:
            tensor.ClearField(field)
        self._append_data(tensor, len(raw), lambda: self.data.write(raw))

    def _externalize_nested(self, graph: onnx.GraphProto) -> None:
        """Subgraph initializers (If/Loop/Scan bodies) go to the data file too."""
        for node in graph.node:
            for body in subgraphs(node):
                for tensor in initializers(body):
                    if (
                        tensor.data_type != onnx.TensorProto.STRING
                        and tensor.data_location != onnx.TensorProto.EXTERNAL
                    ):
                        self._externalize_tensor(tensor)


def _copy(tensor: onnx.TensorProto) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    return copy


def write_skeleton(
    model: onnx.ModelProto, pending: dict[str, np.ndarray], source: ModelSource | None, folder: Path
) -> Path:
    """Write the model to `folder` as the checker should see it, cheaply: its graph whole, but
    each main-graph initializer of EXTERNAL_THRESHOLD bytes or more as a reference to one
    sparse file (no data is read, copied or written). Small tensors keep their values, so
    shape inference still propagates Reshape targets and axes. Tensor data sizes are what
    ModelWriter checks as it writes; everything else onnx.checker sees in full."""
    skeleton = shell(model, {"graph"})
    skeleton.graph.CopyFrom(shell(model.graph, {"initializer"}))
    longest = 0
    for tensor in model.graph.initializer:
        size = payload_size(tensor)
        span = source.span(tensor) if source is not None else None
        if size is not None and size >= EXTERNAL_THRESHOLD:
            stub = shell(tensor, RAW_FIELDS | EXTERNAL_FIELDS)
            stub.data_location = onnx.TensorProto.EXTERNAL
            stub.external_data.add(key="location", value="skeleton.data")
            stub.external_data.add(key="length", value=str(size))
            skeleton.graph.initializer.append(stub)
            longest = max(longest, size)
        elif tensor.name in pending:
            full = skeleton.graph.initializer.add()
            full.CopyFrom(tensor)
            full.raw_data = pending[tensor.name].tobytes()
        elif span is not None:
            skeleton.graph.initializer.append(inlined(tensor, span))
        else:
            skeleton.graph.initializer.append(tensor)
    with open(folder / "skeleton.data", "wb") as data:
        data.truncate(longest)  # sparse: no blocks are written
    path = folder / "skeleton.onnx"
    path.write_bytes(skeleton.SerializeToString())
    return path
