"""Where a model's bytes are, and the protobuf wire format as far as bnfold reads and writes it.

Reading: `light_model` walks a model file's wire format and hands protobuf only its structure;
each large main-graph initializer's raw data stays in the file, referenced as external data in
the model file itself, and is read by `read_tensor` only if a fold needs it.

Writing: `ModelWriter` streams a model tensor by tensor: folded tensors straight from their
arrays, tensors in a data file copied file to file, never the whole model serialized at once.
`write_skeleton` writes what onnx.checker needs to see, without the large tensors' data.

A field is a varint key (field number << 3 | wire type) then its value: a varint (type 0),
8 bytes (1), a varint length and that many bytes (2), or 4 bytes (5). Groups (3, 4) are
obsolete and absent from ONNX; a file that has them is left to protobuf's own parser. A
message field that occurs several times is merged by every parser (protobuf's encoding spec:
"Last One Wins" for scalars, merge for messages), so a GraphProto can be written as a shell
and then one chunk per initializer.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import BnfoldError
from bnfold.graph.protos import subgraphs

EXTERNAL_THRESHOLD = 1024  # tensors of at least this many bytes go to the data file
ALIGNMENT = 4096  # external tensors start at page boundaries, so they can be memory-mapped

# field numbers in onnx.proto
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14


# ---- reading ------------------------------------------------------------------------------------
class _NotPlain(Exception):
    """The wire format holds something the light parse does not handle: protobuf parses it."""


def _varint_at(data, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise _NotPlain
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data, start: int, end: int):
    """(field number, wire type, field start, value start, field end) for each field."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint_at(data, pos, end)
        number, wire = key >> 3, key & 7
        value_start = pos
        if wire == 0:
            _, pos = _varint_at(data, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, value_start = _varint_at(data, pos, end)
            pos = value_start + length
        else:
            raise _NotPlain
        if pos > end:
            raise _NotPlain
        yield number, wire, field_start, value_start, pos


def light_model(data, location: str) -> tuple[bytes, set[int]] | None:
    """The serialized model with each large main-graph initializer's raw_data replaced by an
    external-data reference into the file itself (`location`, the offset of its bytes); and
    the positions of those initializers. None when the file is not plain wire format."""
    try:
        out, in_file, position = bytearray(), set(), 0
        for number, wire, field_start, start, end in _fields(data, 0, len(data)):
            if number != _MODEL_GRAPH or wire != 2:
                out += data[field_start:end]
                continue
            graph = bytearray()
            for inner, inner_wire, inner_start, value_start, value_end in _fields(data, start, end):
                tensor = None
                if inner == _GRAPH_INITIALIZER and inner_wire == 2:
                    tensor = _light_tensor(data, value_start, value_end, location)
                    if tensor is not None:
                        in_file.add(position)
                    position += 1
                if tensor is None:
                    graph += data[inner_start:value_end]
                else:
                    graph += _field_header(_GRAPH_INITIALIZER, len(tensor)) + tensor
            out += _field_header(_MODEL_GRAPH, len(graph)) + graph
        return bytes(out), in_file
    except _NotPlain:
        return None


def _light_tensor(data, start: int, end: int, location: str) -> bytes | None:
    """A TensorProto's bytes with its raw_data as a reference to where it lies in the file,
    or None to keep the tensor as it is (small, already external, or unusual)."""
    rest, raw = bytearray(), None
    for number, wire, field_start, value_start, value_end in _fields(data, start, end):
        if number == _TENSOR_RAW_DATA and wire == 2 and raw is None:
            raw = (value_start, value_end - value_start)
        elif number in (_TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION):
            return None
        else:
            rest += data[field_start:value_end]
    if raw is None or raw[1] < EXTERNAL_THRESHOLD:
        return None
    for key, value in (("location", location), ("offset", str(raw[0])), ("length", str(raw[1]))):
        entry = _field_header(1, len(key)) + key.encode() + _field_header(2, len(value.encode())) + value.encode()
        rest += _field_header(_TENSOR_EXTERNAL_DATA, len(entry)) + entry
    rest += _varint(_TENSOR_DATA_LOCATION << 3) + _varint(onnx.TensorProto.EXTERNAL)
    return bytes(rest)


def is_repeated(field) -> bool:
    # protobuf 5.29+ has is_repeated; `label` is gone in protobuf 7
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == field.LABEL_REPEATED


# ---- writing ------------------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_header(number: int, length: int) -> bytes:
    return _varint(number << 3 | 2) + _varint(length)


def shell(message, skip: set[str]):
    """A copy of `message` without the fields in `skip`, made field by field so that the
    skipped ones (a graph's initializers, a tensor's data) are never touched or copied."""
    shell = type(message)()
    for field in message.DESCRIPTOR.fields:
        name = field.name
        if name in skip:
            continue
        if is_repeated(field):
            if len(getattr(message, name)):
                getattr(shell, name).extend(getattr(message, name))
        elif message.HasField(name):
            if field.type == field.TYPE_MESSAGE:
                getattr(shell, name).CopyFrom(getattr(message, name))
            else:
                setattr(shell, name, getattr(message, name))
    return shell


_RAW_FIELDS = {"raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"}
_EXTERNAL_FIELDS = {"external_data", "data_location"}


class ModelWriter:
    """Writes a ModelProto in the protobuf wire format, one initializer at a time (StagedModel).

    Each main-graph initializer's data comes from, in this order: `new_values` (arrays of the
    tensors the fold created), its external data file in `source_folder` (copied file to file
    when the output keeps external data too), or the tensor itself. With a `data` file, tensors
    of at least EXTERNAL_THRESHOLD bytes go there, page-aligned, as external data at `location`.
    Every tensor's data is checked against its dims and type on the way (`payload_size`).
    """

    def __init__(
        self, out, new_values: dict[str, np.ndarray], source_folder: Path | None, data=None, location: str = ""
    ):
        self.out, self.data, self.location = out, data, location
        self.new_values, self.source_folder = new_values, source_folder
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
        self.out.write(_field_header(_MODEL_GRAPH, length))
        for part in parts:
            self.out.write(part)

    def _write_tensor(self, tensor: onnx.TensorProto) -> None:
        values = self.new_values.get(tensor.name)
        external = tensor.data_location == onnx.TensorProto.EXTERNAL
        if values is not None:
            payload = memoryview(values).cast("B")
        elif external:
            payload = None  # read or copied from the input's data file below
        elif tensor.HasField("raw_data"):
            payload = tensor.raw_data
        else:  # values in typed fields (float_data, ...): rare and small; the model is not changed
            if self.data is not None and tensor.data_type != onnx.TensorProto.STRING:
                tensor = _copy(tensor)
                self._externalize_tensor(tensor)
            self._write_tensor_bytes([tensor.SerializeToString()])
            return
        expected = payload_size(tensor)
        size = _external_info(tensor)[2] if payload is None else len(payload)
        if expected is not None and size < expected:
            raise BnfoldError(f"tensor '{tensor.name}' holds {size} bytes of data; its dims and type need {expected}")
        header = shell(tensor, _RAW_FIELDS | _EXTERNAL_FIELDS)
        if self.data is not None and size >= EXTERNAL_THRESHOLD:
            if payload is None:
                self._append_data(header, size, lambda: self._copy_external(tensor))
            else:
                self._append_data(header, size, lambda: self.data.write(payload))
            self._write_tensor_bytes([header.SerializeToString()])
            return
        if payload is None:
            payload = _external_bytes(tensor, self.source_folder)
        self._write_tensor_bytes([header.SerializeToString(), _field_header(_TENSOR_RAW_DATA, len(payload)), payload])

    def _write_tensor_bytes(self, parts: list) -> None:
        length = sum(len(p) for p in parts)
        self._write_graph_chunk([_field_header(_GRAPH_INITIALIZER, length), *parts])

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
        raw = (
            tensor.raw_data
            if tensor.HasField("raw_data")
            else numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data
        )
        if len(raw) < EXTERNAL_THRESHOLD:
            return
        for field in _RAW_FIELDS:
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

    def _copy_external(self, tensor: onnx.TensorProto) -> None:
        location, offset, length = _external_info(tensor)
        with open(self.source_folder / location, "rb") as source:
            self.data.flush()
            copied = 0
            while copied < length:
                sent = _copy_range(source, self.data, offset + copied, length - copied)
                if sent == 0:
                    raise BnfoldError(f"tensor '{tensor.name}': its external data ends early")
                copied += sent


# ---- tensor data -------------------------------------------------------------------------------
def _copy(tensor: onnx.TensorProto) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    return copy


def _copy_range(source, target, offset: int, length: int) -> int:
    """Copy bytes between files in the kernel where it can (no trip through Python objects)."""
    chunk = min(length, 1 << 30)
    if hasattr(os, "copy_file_range"):
        try:
            return os.copy_file_range(source.fileno(), target.fileno(), chunk, offset)
        except OSError:
            pass  # another file system, or not supported here: copy through a buffer
    source.seek(offset)
    data = source.read(min(chunk, 1 << 24))
    target.write(data)
    target.flush()
    return len(data)


def _external_info(tensor: onnx.TensorProto) -> tuple[str, int, int]:
    """(location, offset, length) of an external tensor (modelfile checked the location)."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    offset = int(info.get("offset") or 0)
    length = info.get("length")
    if length is None:
        expected = payload_size(tensor)
        if expected is None:
            raise BnfoldError(f"tensor '{tensor.name}' stores external data without a length")
        length = expected
    return info["location"], offset, int(length)


def read_tensor(tensor: onnx.TensorProto, folder: Path | None = None) -> np.ndarray:
    """A tensor's values (read-only), reading external data from `folder` without loading it
    into the tree. numpy's own types come straight from the bytes, with one copy at most."""
    dtype = _PLAIN_DTYPES.get(tensor.data_type) if sys.byteorder == "little" else None
    external = tensor.data_location == onnx.TensorProto.EXTERNAL
    if dtype is not None and (external or tensor.HasField("raw_data")):
        if external:
            location, offset, length = _external_info(tensor)
            values = np.fromfile(folder / location, dtype=dtype, count=length // dtype.itemsize, offset=offset)
        else:
            values = np.frombuffer(tensor.raw_data, dtype=dtype)
        if values.size == _elements(tensor):
            return values.reshape(tuple(tensor.dims))
    if not external:
        return numpy_helper.to_array(tensor)  # typed fields, strings, 4-bit types, a size mismatch
    return numpy_helper.to_array(_inlined(tensor, folder))


def _inlined(tensor: onnx.TensorProto, folder: Path) -> onnx.TensorProto:
    """An external tensor as a new TensorProto holding its data (the model is not changed)."""
    inlined = shell(tensor, _RAW_FIELDS | _EXTERNAL_FIELDS)
    inlined.raw_data = _external_bytes(tensor, folder)
    return inlined


_T = onnx.TensorProto
_PLAIN_DTYPES = {  # ONNX types whose raw data is exactly numpy's little-endian layout
    _T.FLOAT: np.dtype(np.float32),
    _T.DOUBLE: np.dtype(np.float64),
    _T.FLOAT16: np.dtype(np.float16),
    _T.INT8: np.dtype(np.int8),
    _T.INT16: np.dtype(np.int16),
    _T.INT32: np.dtype(np.int32),
    _T.INT64: np.dtype(np.int64),
    _T.UINT8: np.dtype(np.uint8),
    _T.UINT16: np.dtype(np.uint16),
    _T.UINT32: np.dtype(np.uint32),
    _T.UINT64: np.dtype(np.uint64),
    _T.BOOL: np.dtype(np.bool_),
}


def _elements(tensor: onnx.TensorProto) -> int:
    elements = 1
    for dim in tensor.dims:
        elements *= dim
    return elements


def _external_bytes(tensor: onnx.TensorProto, folder: Path) -> bytes:
    location, offset, length = _external_info(tensor)
    with open(folder / location, "rb") as source:
        source.seek(offset)
        data = source.read(length)
    if len(data) != length:
        raise BnfoldError(f"tensor '{tensor.name}': its external data ends early")
    return data


def write_skeleton(
    model: onnx.ModelProto, new_values: dict[str, np.ndarray], source_folder: Path | None, folder: Path
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
        if size is not None and size >= EXTERNAL_THRESHOLD:
            stub = shell(tensor, _RAW_FIELDS | _EXTERNAL_FIELDS)
            stub.data_location = onnx.TensorProto.EXTERNAL
            stub.external_data.add(key="location", value="skeleton.data")
            stub.external_data.add(key="length", value=str(size))
            skeleton.graph.initializer.append(stub)
            longest = max(longest, size)
        elif tensor.name in new_values:
            full = skeleton.graph.initializer.add()
            full.CopyFrom(tensor)
            full.raw_data = new_values[tensor.name].tobytes()
        elif tensor.data_location == onnx.TensorProto.EXTERNAL:
            skeleton.graph.initializer.append(_inlined(tensor, source_folder))
        else:
            skeleton.graph.initializer.append(tensor)
    with open(folder / "skeleton.data", "wb") as data:
        data.truncate(longest)  # sparse: no blocks are written
    path = folder / "skeleton.onnx"
    path.write_bytes(skeleton.SerializeToString())
    return path


_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(onnx.TensorProto, name)
}


def payload_size(tensor: onnx.TensorProto) -> int | None:
    """How many bytes of raw data a tensor's dims and type need, or None if not fixed (strings,
    unknown types)."""
    elements = _elements(tensor)
    if tensor.data_type in _BITS:
        return (elements * _BITS[tensor.data_type] + 7) // 8
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return elements * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:
        return None


def payload_bytes(graph: onnx.GraphProto) -> int:
    """The bytes of tensor data in a graph's initializers, from their dims (no data is read)."""
    return sum(payload_size(t) or 0 for t in graph.initializer)


def initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for sub in subgraphs(node):
            yield from initializers(sub)
