"""A model file opened for folding: its structure, and its tensors' values on demand.

`ModelSource.open` parses the file once, leaving the raw data of large main-graph initializers
where it is (wire.light_model): in the model file itself, or in the external data files the
model names (after containment checks). Such an initializer comes out as a *stub*, a
TensorProto with its name, type and dims but no data; `read` gives its values and `span` where
its bytes lie, for the writer to copy file to file. So a weight is read only if a fold needs it,
and the ModelProto that leaves this package refers to no file: the stubs' bytes are known only
to the ModelSource that made them.

`load_model` loads a model whole (every tensor's data in the tree), for `bnfold.fold`.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import onnx

from bnfold.errors import BnfoldError, first_line
from bnfold.io import wire
from bnfold.io.containment import checked_locations, external_locations, external_tensors
from bnfold.io.tensors import EXTERNAL_FIELDS, Span, external_info, read_tensor


class ModelSource:
    def __init__(self, path: Path, model: onnx.ModelProto, spans: dict, data_files: list[Path]):
        self.path = path
        self.model = model
        self.data_files = data_files  # the external data files the model reads
        self._spans = spans  # stub name → (the stub, where its bytes lie)

    @classmethod
    def open(cls, path: str | os.PathLike) -> ModelSource:
        """Parse a model file for folding, or raise BnfoldError saying why it is not one."""
        path = Path(path)
        model, left = parse(path)
        initializers = model.graph.initializer
        _refuse_repeated_names(path, initializers)
        itself = path.resolve()
        spans = {initializers[i].name: (initializers[i], Span(itself, *where)) for i, where in left.items()}
        data_files: list[Path] = []
        external = list(external_tensors(model))
        if external:
            folder = checked_locations(path, external)
            data_files = sorted(folder / location for location in external_locations(external))
            for tensor in initializers:
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    location, offset, length = external_info(tensor)
                    for field in EXTERNAL_FIELDS:
                        tensor.ClearField(field)
                    spans[tensor.name] = (tensor, Span(folder / location, offset, length))
            _load_external(path, external_tensors(model))  # subgraphs' and Constants' own: few, small
        return cls(path, model, spans, data_files)

    def span(self, tensor: onnx.TensorProto) -> Span | None:
        """Where a stub's bytes lie; None for a tensor that holds its own data (or is new)."""
        entry = self._spans.get(tensor.name)
        return entry[1] if entry is not None and entry[0] is tensor else None

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        """A tensor's values (read-only), read from the file for a stub."""
        return read_tensor(tensor, self.span(tensor))

    @property
    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in (self.path, *self.data_files))


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file with all its data in the tree, or raise BnfoldError saying why it is
    not one."""
    source = ModelSource.open(path)
    for stub, span in source._spans.values():
        stub.raw_data = span.read(stub.name)
    return source.model


def check_external_data(path: str | os.PathLike) -> None:
    """Refuse a model file whose external data would be read from outside its folder."""
    path = Path(path)
    external = list(external_tensors(parse(path)[0]))  # cheap: large raw data is not read
    if external:
        checked_locations(path, external)


def parse(path: Path) -> tuple[onnx.ModelProto, dict[int, tuple[int, int]]]:
    """Parse a model file, leaving the raw data of its large main-graph initializers in the
    file: they come back as stubs, with where their bytes lie by initializer position."""
    if not path.exists():
        raise BnfoldError(f"{path}: no such file")
    if path.is_dir():
        raise BnfoldError(f"{path}: is a directory, not an ONNX model")
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                light = None
            else:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    light = wire.light_model(data)
        model = onnx.ModelProto()
        if light is None:
            model = onnx.load(str(path), load_external_data=False)
            left: dict[int, tuple[int, int]] = {}
        else:
            serialized, left = light
            model.ParseFromString(serialized)
    except Exception as exc:  # protobuf DecodeError, I/O, recursion limits: all the user's file
        raise BnfoldError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
    # An empty or foreign file can parse as an empty ModelProto; that is no model either.
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise BnfoldError(f"{path}: not an ONNX model (no IR version or no graph)")
    if not _text_is_valid(model):
        raise BnfoldError(f"{path}: not a valid ONNX model (a name or text field is not UTF-8)")
    return model, left


def _refuse_repeated_names(path: Path, initializers) -> None:
    """Two initializers of one name: onnx.checker refuses the model, and which one a runtime
    reads is its own choice (onnxruntime: the last), so no fold could be trusted."""
    seen: set[str] = set()
    for tensor in initializers:
        if tensor.name in seen:
            raise BnfoldError(f"{path}: two initializers are named '{tensor.name}'; refused")
        seen.add(tensor.name)


def _load_external(path: Path, tensors) -> None:
    try:
        for tensor in tensors:
            onnx.external_data_helper.load_external_data_for_tensor(tensor, str(path.resolve().parent))
            tensor.ClearField("data_location")  # unset is DEFAULT
            del tensor.external_data[:]
    except Exception as exc:
        raise BnfoldError(f"{path}: cannot read its external data ({first_line(exc)})") from None


def _text_is_valid(model: onnx.ModelProto) -> bool:
    """Whether every string field is UTF-8. protobuf parses ONNX's proto2 strings unchecked,
    and a bad one then fails wherever it is first read (or comes back as bytes)."""
    pending = [model]
    try:
        while pending:
            message = pending.pop()
            if isinstance(message, onnx.TensorProto):  # ListFields would copy the tensor data
                texts = [message.name, message.doc_string, *(e.key for e in message.external_data)]
                texts += [e.value for e in message.external_data]
                if not all(isinstance(t, str) for t in texts):
                    return False
                continue
            for field, value in message.ListFields():
                values = value if wire.is_repeated(field) else [value]
                if field.type == field.TYPE_STRING:
                    if not all(isinstance(v, str) for v in values):
                        return False
                elif field.type == field.TYPE_MESSAGE:
                    pending.extend(values)
    except UnicodeDecodeError:
        return False
    return True
