"""Tensor data: how many bytes a tensor's dims and type need, reading its values, and copying
byte spans between files."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import BnfoldError
from bnfold.graph.protos import subgraphs
from bnfold.io.containment import DataFile
from bnfold.io.wire import shell

RAW_FIELDS = {"raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"}
EXTERNAL_FIELDS = {"external_data", "data_location"}

_T = onnx.TensorProto
PLAIN_DTYPES = {  # ONNX types whose raw data is exactly numpy's little-endian layout
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
_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(onnx.TensorProto, name)
}


@dataclass(frozen=True)
class Span:
    """Where a tensor's raw bytes lie: `length` bytes at `offset` in an open, vetted file
    (bnfold.io.containment.DataFile): every read goes through that handle."""

    file: DataFile
    offset: int
    length: int

    def read(self, name: str) -> bytes:
        data = os.pread(self.file.fd, self.length, self.offset)
        if len(data) != self.length:
            raise BnfoldError(f"tensor '{name}': its external data ends early")
        return data

    def read_into(self, buffer, name: str) -> None:
        """Fill a writable buffer of `length` bytes (no intermediate copy)."""
        done = 0
        view = memoryview(buffer).cast("B")
        while done < self.length:
            got = os.preadv(self.file.fd, [view[done:]], self.offset + done)
            if got == 0:
                raise BnfoldError(f"tensor '{name}': its external data ends early")
            done += got

    def copy_to(self, target, name: str) -> None:
        """Append the bytes to the open file `target`, in the kernel where it can."""
        target.flush()
        copied = 0
        while copied < self.length:
            sent = _copy_range(self.file.fd, target, self.offset + copied, self.length - copied)
            if sent == 0:
                raise BnfoldError(f"tensor '{name}': its external data ends early")
            copied += sent


def _copy_range(source: int, target, offset: int, length: int) -> int:
    """Copy bytes between files in the kernel where it can (no trip through Python objects)."""
    chunk = min(length, 1 << 30)
    if hasattr(os, "copy_file_range"):
        try:
            return os.copy_file_range(source, target.fileno(), chunk, offset)
        except OSError:
            pass  # another file system, or not supported here: copy through a buffer
    data = os.pread(source, min(chunk, 1 << 24), offset)
    target.write(data)
    target.flush()
    return len(data)


def elements(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count


def payload_size(tensor: onnx.TensorProto) -> int | None:
    """How many bytes of raw data a tensor's dims and type need, or None if not fixed (strings,
    unknown types)."""
    count = elements(tensor)
    if tensor.data_type in _BITS:
        return (count * _BITS[tensor.data_type] + 7) // 8
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:
        return None


def payload_bytes(graph: onnx.GraphProto) -> int:
    """The bytes of tensor data in a graph's initializers, from their dims (no data is read)."""
    return sum(payload_size(t) or 0 for t in graph.initializer)


def initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """The initializers of a graph and of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for sub in subgraphs(node):
            yield from initializers(sub)


def external_length(tensor: onnx.TensorProto, length: int | None) -> int:
    """An external tensor's length in bytes: as given, else what its dims and type need."""
    if length is not None:
        return length
    expected = payload_size(tensor)
    if expected is None:
        raise BnfoldError(f"tensor '{tensor.name}' stores external data without a length")
    return expected


def read_tensor(tensor: onnx.TensorProto, span: Span | None = None) -> np.ndarray:
    """A tensor's values (read-only), its data from `span` when given, else from the tensor.
    numpy's own types come straight from the bytes, with one copy at most."""
    dtype = PLAIN_DTYPES.get(tensor.data_type) if sys.byteorder == "little" else None
    if dtype is not None and (span is not None or tensor.HasField("raw_data")):
        if span is not None and span.length == elements(tensor) * dtype.itemsize:
            values = np.empty(elements(tensor), dtype=dtype)
            span.read_into(values, tensor.name)
            values.flags.writeable = False
            return values.reshape(tuple(tensor.dims))
        if span is None:
            values = np.frombuffer(tensor.raw_data, dtype=dtype)
            if values.size == elements(tensor):
                return values.reshape(tuple(tensor.dims))
    if span is None:
        return numpy_helper.to_array(tensor)  # typed fields, strings, 4-bit types, a size mismatch
    return numpy_helper.to_array(inlined(tensor, span))


def inlined(tensor: onnx.TensorProto, span: Span) -> onnx.TensorProto:
    """A new TensorProto holding the tensor's data from `span` (the tensor is not changed)."""
    copy = shell(tensor, RAW_FIELDS | EXTERNAL_FIELDS)
    copy.raw_data = span.read(tensor.name)
    return copy
