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
import stat
from pathlib import Path

import numpy as np
import onnx

from bnfold.errors import BnfoldError, MissingFile, first_line
from bnfold.io import wire
from bnfold.io.containment import DataFile, external_fields, external_tensors, open_locations
from bnfold.io.tensors import EXTERNAL_FIELDS, Span, external_length, payload_size, read_tensor


class ModelSource:
    def __init__(self, path: Path, model: onnx.ModelProto, spans: dict, files: list[DataFile]):
        self.path = path
        self.model = model
        self.data_files = [f.path for f in files[1:]]  # the external data files the model reads
        self._files = files  # the model file, then its data files: open, read through these only
        self._spans = spans  # stub name → (the stub, where its bytes lie)

    @classmethod
    def open(cls, path: str | os.PathLike) -> ModelSource:
        """Parse a model file for folding, or raise BnfoldError saying why it is not one."""
        path = Path(path)
        model, left, itself = parse(path, keep_open=True)
        files = [itself]
        try:
            initializers = model.graph.initializer
            _refuse_repeated_names(path, initializers)
            spans = {initializers[i].name: (initializers[i], Span(itself, *where)) for i, where in left.items()}
            main = [t for t in initializers if t.data_location == onnx.TensorProto.EXTERNAL]
            nested = list(external_tensors(model, main_initializers=False))
            opened = open_locations(path, main + nested) if main or nested else {}
            files += opened.values()
            for tensor in main:  # stubs, read on demand
                spans[tensor.name] = (tensor, _span(path, tensor, opened))
                _inline(tensor, None)
            for tensor in nested:  # subgraphs' and Constants' own: few and small, into the tree
                _inline(tensor, _span(path, tensor, opened).read(tensor.name))
            for tensor in initializers:
                _refuse_wrong_size(path, tensor, spans.get(tensor.name, (None, None))[1])
        except BaseException:
            for file in files:
                file.close()
            raise
        return cls(path, model, spans, files)

    def span(self, tensor: onnx.TensorProto) -> Span | None:
        """Where a stub's bytes lie; None for a tensor that holds its own data (or is new)."""
        entry = self._spans.get(tensor.name)
        return entry[1] if entry is not None and entry[0] is tensor else None

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        """A tensor's values (read-only), read from the file for a stub."""
        return read_tensor(tensor, self.span(tensor))

    @property
    def bytes_on_disk(self) -> int:
        return sum(f.size for f in self._files)

    def close(self) -> None:
        for file in self._files:
            file.close()

    def __enter__(self) -> ModelSource:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file with all its data in the tree, or raise BnfoldError saying why it is
    not one."""
    with ModelSource.open(path) as source:
        for stub, span in source._spans.values():
            stub.raw_data = span.read(stub.name)
        return source.model


def check_external_data(path: str | os.PathLike) -> None:
    """Refuse a model file whose external data would be read from outside its folder."""
    path = Path(path)
    external = list(external_tensors(parse(path)[0]))  # cheap: large raw data is not read
    for file in (open_locations(path, external) if external else {}).values():
        file.close()


def parse(path: Path, *, keep_open: bool = False):
    """Parse a model file, leaving the raw data of its large main-graph initializers in the
    file: they come back as stubs, with where their bytes lie by initializer position. With
    `keep_open`, also the open model file (a DataFile) those positions refer to."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block
    except FileNotFoundError:
        raise MissingFile(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BnfoldError(f"{path}: is a directory, not an ONNX model") from None
    except OSError as exc:
        raise BnfoldError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    itself = DataFile(path, fd, os.fstat(fd).st_size)
    try:
        model, left = _parse_open(path, itself)
    except BaseException:
        itself.close()
        raise
    if not keep_open:
        itself.close()
        return model, left
    return model, left, itself


def _parse_open(path: Path, itself: DataFile) -> tuple[onnx.ModelProto, dict]:
    kind = os.fstat(itself.fd).st_mode
    if stat.S_ISDIR(kind):
        raise BnfoldError(f"{path}: is a directory, not an ONNX model")
    if not stat.S_ISREG(kind):
        raise BnfoldError(f"{path}: is not a regular file (a FIFO, a device or a socket), not an ONNX model")
    try:
        model, left = onnx.ModelProto(), {}
        if itself.size:
            with mmap.mmap(itself.fd, 0, access=mmap.ACCESS_READ) as data:
                light = wire.light_model(data)
                if light is None:
                    model.ParseFromString(bytes(data))  # protobuf's own parser, and its error
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


def _refuse_wrong_size(path: Path, tensor: onnx.TensorProto, span: Span | None) -> None:
    """An initializer's raw data must be exactly what its dims and type need: onnxruntime
    refuses anything else, and a size that is off would be read differently by every reader."""
    if any(d < 0 for d in tensor.dims):
        raise BnfoldError(f"{path}: tensor '{tensor.name}' has a negative dimension {list(tensor.dims)}")
    if span is None and not tensor.HasField("raw_data"):
        return  # typed fields (float_data, …) or no data: numpy_helper checks those
    size = span.length if span is not None else len(tensor.raw_data)
    expected = payload_size(tensor)
    if expected is not None and size != expected:
        raise BnfoldError(
            f"{path}: tensor '{tensor.name}' holds {size} bytes of data; its dims {list(tensor.dims)} "
            f"and type need {expected}"
        )


def _inline(tensor: onnx.TensorProto, data: bytes | None) -> None:
    """The tensor without its external-data fields, holding `data` (None: a stub)."""
    for field in EXTERNAL_FIELDS:
        tensor.ClearField(field)
    if data is not None:
        tensor.raw_data = data


def _span(path: Path, tensor: onnx.TensorProto, opened: dict[str, DataFile]) -> Span:
    fields = external_fields(path, tensor)
    file = opened[fields["location"]]
    length = external_length(tensor, fields["length"])
    if fields["offset"] + length > file.size:
        raise BnfoldError(f"{path}: tensor '{tensor.name}' reaches past the end of {fields['location']!r}")
    return Span(file, fields["offset"], length)


def _refuse_repeated_names(path: Path, initializers) -> None:
    """Two initializers of one name: onnx.checker refuses the model, and which one a runtime
    reads is its own choice (onnxruntime: the last), so no fold could be trusted."""
    seen: set[str] = set()
    for tensor in initializers:
        if tensor.name in seen:
            raise BnfoldError(f"{path}: two initializers are named '{tensor.name}'; refused")
        seen.add(tensor.name)


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


def is_onnx_ir(model) -> bool:
    """Whether `model` is an onnx_ir object (without importing onnx_ir)."""
    return type(model).__module__.split(".")[0] == "onnx_ir"


def as_model(model) -> onnx.ModelProto | Path:
    """What the library accepts as a model, as a ModelProto or a path: a path or str, an
    onnx.ModelProto, an `onnx_ir` model (`torch.onnx.export(..., dynamo=True).model`), or
    anything with a `model_proto` (PyTorch's ONNXProgram). Neither onnx_ir nor torch is a
    dependency: they are only touched when such an object is given."""
    if isinstance(model, (str, os.PathLike)):
        return Path(model)
    if isinstance(model, onnx.ModelProto):
        return model
    proto = getattr(model, "model_proto", None)  # torch.onnx.ONNXProgram
    if isinstance(proto, onnx.ModelProto):
        return proto
    if is_onnx_ir(model):
        import onnx_ir

        return onnx_ir.to_proto(model)
    raise TypeError(
        f"expected an ONNX model (a path, an onnx.ModelProto, an onnx_ir model or an ONNXProgram), "
        f"not {type(model).__name__}"
    )
