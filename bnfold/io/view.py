"""One view of a model for verification: its skeleton and large weights apart, its inferred
types, and copies of it with other outputs. A skeleton is the ModelProto with each large
initializer a data-less stub (`is_stub`), its values in an array beside it: onnxruntime takes
those arrays as they are (runtime.make_session), and the graph is all that is ever copied."""

from __future__ import annotations

import mmap
import platform
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from bnfold.errors import BnfoldError
from bnfold.io.source import ModelSource, load_model
from bnfold.io.tensors import payload_bytes
from bnfold.io.wire import shell

EMPTY_DATA = "bnfold-weights-passed-as-arrays.data"
SHARED_MIN = 4096  # initializers this large reach onnxruntime as arrays over their bytes
LARGE_WEIGHTS = 1 << 30  # past this, sessions read the weights as they lie (no repacked copies)
SHARED_TYPES = {  # …when numpy holds their type natively
    t: helper.tensor_dtype_to_np_dtype(t)
    for t in (
        onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
        onnx.TensorProto.INT64, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
    )
}  # fmt: skip


def split_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A skeleton of `model` and its large main-graph initializers as arrays by name (one copy
    of their bytes, which several sessions can share), for make_session: onnxruntime takes each
    array as it is (SessionOptions.add_initializer) instead of a serialized copy of the whole
    model, 0.03 s where serializing and parsing ResNet-50's 100 MB took 0.7 s. In the skeleton
    each of them is a stub naming an empty data file, so a tensor onnxruntime did not take
    fails to load: it never reads as zeros."""
    skeleton = shell(model, {"graph"})
    skeleton.graph.CopyFrom(shell(model.graph, {"initializer"}))
    arrays = {}
    for tensor in model.graph.initializer:
        raw = tensor.raw_data if tensor.data_type in SHARED_TYPES else b""
        if len(raw) < SHARED_MIN or tensor.data_location == onnx.TensorProto.EXTERNAL:
            skeleton.graph.initializer.append(tensor)
            continue
        arrays[tensor.name] = np.frombuffer(raw, SHARED_TYPES[tensor.data_type]).reshape(tuple(tensor.dims))
        stub = skeleton.graph.initializer.add()
        stub.CopyFrom(shell(tensor, {"raw_data"}))
        _to_stub(stub, len(raw))
    return skeleton, arrays


# Whether onnxruntime may read weights from arrays that are not aligned to their element size
# (a view of a model file at a raw_data offset): loads of any alignment are what x86-64 and
# ARM64 do; elsewhere such a tensor is copied.
UNALIGNED_OK = platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64")


def weights_apart(model: onnx.ModelProto | str | Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """split_weights for a ModelProto; for a model file, the skeleton as ModelSource parses it
    and each large initializer as a read-only view of the file where its bytes lie (mmap): the
    model is never held whole, and onnxruntime reads the weights from the page cache. For
    ResNet-50's 100 MB this takes 0.01 s, where loading and splitting took 0.2 s (fresh memory
    is slow to fault in)."""
    if isinstance(model, onnx.ModelProto):
        return split_weights(model)
    arrays, maps = {}, {}
    with ModelSource.open(model) as source:
        skeleton = source.model
        for tensor in skeleton.graph.initializer:
            span = source.span(tensor)
            if span is None:
                continue  # holds its own data
            dtype = SHARED_TYPES.get(tensor.data_type)
            if dtype is None:
                tensor.raw_data = span.read(tensor.name)
                continue
            if UNALIGNED_OK or span.offset % np.dtype(dtype).itemsize == 0:
                if span.file.path not in maps:
                    maps[span.file.path] = mmap.mmap(span.file.fd, 0, access=mmap.ACCESS_READ)
                count = span.length // np.dtype(dtype).itemsize
                array = np.frombuffer(maps[span.file.path], dtype, count, span.offset).reshape(tuple(tensor.dims))
            else:
                array = np.empty(tuple(tensor.dims), dtype)
                span.read_into(array, tensor.name)
                array.flags.writeable = False
            arrays[tensor.name] = array
            _to_stub(tensor, span.length)
    return skeleton, arrays


def _to_stub(tensor: onnx.TensorProto, length: int) -> None:
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, text in (("location", EMPTY_DATA), ("offset", "0"), ("length", str(length))):
        tensor.external_data.add(key=key, value=text)


def is_stub(tensor: onnx.TensorProto) -> bool:
    """Whether a tensor of a skeleton has its values in the arrays beside it."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == EMPTY_DATA for e in tensor.external_data
    )


def whole_model(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """A copy of `model` with all its data, for the caller to change (extra outputs); a
    BnfoldError past 2 GiB, which no ModelProto can hold."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    loaded = load_model(Path(model))
    if payload_bytes(loaded.graph) < 2**30:  # far from the limit: no need to size it (0.14 s per 100 MB)
        return loaded
    try:
        loaded.ByteSize()
    except ValueError:
        raise BnfoldError(f"{model}: over 2 GiB, more than a model in memory can hold") from None
    return loaded


def with_outputs(model: onnx.ModelProto, names: list[str], types: dict | None = None) -> onnx.ModelProto:
    """`model` (the caller's own copy) with exactly `names` as its outputs, typed from `types`
    where it has them, the graph as it is."""
    del model.graph.output[:]
    for name in names:
        typed = types is not None and name in types
        model.graph.output.append(
            onnx.ValueInfoProto(name=name, type=types[name]) if typed else onnx.ValueInfoProto(name=name)
        )
    return model


def exposing(model: onnx.ModelProto, names, types: dict | None = None) -> onnx.ModelProto:
    """`model` (the caller's own copy) with `names` added to its outputs where they are not
    already, typed from `types` where it has them."""
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            typed = types is not None and name in types
            model.graph.output.append(
                onnx.ValueInfoProto(name=name, type=types[name]) if typed else onnx.ValueInfoProto(name=name)
            )
            present.add(name)
    return model


def inferred_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """The type of every tensor onnx's shape inference (not strict) finds, inputs included; a
    skeleton is enough (inference reads only small constants). The declared ones when inference
    fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception:  # a model inference cannot read: what it declares
        inferred = model.graph
    return {v.name: v.type for v in (*inferred.input, *inferred.value_info, *inferred.output)}
