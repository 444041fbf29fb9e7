"""Reading and writing model files: one clear error for bad input, atomic writes for output.

Model files may come from anywhere. A tensor stored as external data names a file by a
`location` the model itself chooses, so before any byte of external data is read every
location must be a plain relative path that stays inside the model's folder: not absolute,
no `..`, not through a symlink that leads out, not a hard link (which could be a second name
for any file on the disk), and within the file's size. onnxruntime is a second loader of the
same file, so `check_external_data` runs before it is given a path too.
"""

from __future__ import annotations

import glob
import mmap
import os
import re
import secrets
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import BnfoldError, first_line
from bnfold.graph import subgraphs

SUFFIX = ".folded.onnx"


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file with its external data, or raise BnfoldError saying why it is not one."""
    return read_model(path)[0]


def read_model(path: str | os.PathLike, *, load_external: bool = True) -> tuple[onnx.ModelProto, list[Path]]:
    """The model with its external data loaded, and the data files it was read from.

    With `load_external=False` the main graph's initializers keep their data where it is: in
    an external data file, or in the model file itself (see _parse); read_tensor reads one on
    demand, and StagedModel copies the rest file to file. The few other external tensors
    (subgraph initializers, Constant values) are loaded."""
    path = Path(path)
    model, in_file = _parse(path)
    external = _declared_external(model, in_file)
    data_files = []
    if external:
        folder = _checked_locations(path, external)
        data_files = sorted(folder / location for location in _external_locations(external))
    if load_external:
        external = list(external_tensors(model))  # the model file's own tensors too
    else:
        external = list(external_tensors(model, main_initializers=False))
    if not external:
        return model, data_files
    try:
        for tensor in external:
            onnx.external_data_helper.load_external_data_for_tensor(tensor, str(path.resolve().parent))
            tensor.ClearField("data_location")  # unset is DEFAULT
            del tensor.external_data[:]
    except Exception as exc:
        raise BnfoldError(f"{path}: cannot read its external data ({first_line(exc)})") from None
    return model, data_files


def check_external_data(path: str | os.PathLike) -> None:
    """Refuse a model file whose external data would be read from outside its folder."""
    path = Path(path)
    external = _declared_external(*_parse(path))  # cheap: large raw data is not read (see _parse)
    if external:
        _checked_locations(path, external)


def _declared_external(model: onnx.ModelProto, in_file: set[int]) -> list[onnx.TensorProto]:
    """The tensors the model itself stores as external data: not those _parse left in the
    model file (`in_file`: their positions among the main graph's initializers)."""
    initializers = model.graph.initializer
    main = [t for i, t in enumerate(initializers) if i not in in_file and t.data_location == onnx.TensorProto.EXTERNAL]
    return main + list(external_tensors(model, main_initializers=False))


def _parse(path: Path) -> tuple[onnx.ModelProto, set[int]]:
    """Parse a model file, leaving the raw data of its large main-graph initializers in the file.

    Those tensors come back as external data whose location is the model file itself, at the
    offset of their bytes in it (the set holds their positions among the initializers). So a
    weight is never copied into the protobuf tree: it is read only if folded, and otherwise
    copied file to file when the output is written (modelfile._ModelWriter)."""
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
                    light = _light_model(data, path.resolve().name) if _is_utf8(path.resolve().name) else None
        model = onnx.ModelProto()
        if light is None:
            model = onnx.load(str(path), load_external_data=False)
            in_file: set[int] = set()
        else:
            serialized, in_file = light
            model.ParseFromString(serialized)
    except Exception as exc:  # protobuf DecodeError, I/O, recursion limits: all the user's file
        raise BnfoldError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
    # An empty or foreign file can parse as an empty ModelProto; that is no model either.
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise BnfoldError(f"{path}: not an ONNX model (no IR version or no graph)")
    if not _text_is_valid(model):
        raise BnfoldError(f"{path}: not a valid ONNX model (a name or text field is not UTF-8)")
    return model, in_file


def _is_utf8(name: str) -> bool:
    """Whether a file name can be an ONNX string (a Linux name may hold any bytes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# The protobuf wire format, as far as reading and writing a model needs it: a field is a varint
# key (field number << 3 | wire type) then its value: a varint (type 0), 8 bytes (1), a varint
# length and that many bytes (2), or 4 bytes (5). Groups (3, 4) are obsolete and absent from
# ONNX; a file that has them is left to protobuf's own parser.
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14


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


def _light_model(data, location: str) -> tuple[bytes, set[int]] | None:
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
                values = value if _is_repeated(field) else [value]
                if field.type == field.TYPE_STRING:
                    if not all(isinstance(v, str) for v in values):
                        return False
                elif field.type == field.TYPE_MESSAGE:
                    pending.extend(values)
    except UnicodeDecodeError:
        return False
    return True


def external_tensors(model: onnx.ModelProto, *, main_initializers: bool = True) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model stored as external data: initializers and Constant values of
    the graph, its subgraphs and its functions (without the main graph's initializers if asked)."""

    def in_graph(graph: onnx.GraphProto, initializers: bool = True) -> Iterator[onnx.TensorProto]:
        if initializers:
            yield from (t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        yield from in_nodes(graph.node)

    def in_nodes(nodes) -> Iterator[onnx.TensorProto]:
        for node in nodes:
            for attr in node.attribute:
                tensors = [attr.t] if attr.HasField("t") else list(attr.tensors)
                yield from (t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL)
            for graph in subgraphs(node):
                yield from in_graph(graph)

    yield from in_graph(model.graph, main_initializers)
    for function in model.functions:
        yield from in_nodes(function.node)


def _external_locations(tensors) -> set[str]:
    return {entry.value for tensor in tensors for entry in tensor.external_data if entry.key == "location"}


def _is_repeated(field) -> bool:
    # protobuf 5.29+ has is_repeated; `label` is gone in protobuf 7
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == field.LABEL_REPEATED


def _checked_locations(path: Path, tensors: list[onnx.TensorProto]) -> Path:
    """The model's folder, after every external-data location checked (module docstring)."""
    folder = path.resolve().parent
    sizes: dict[str, int] = {}
    for tensor in tensors:
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        why = _unsafe_location(location)
        if why:
            raise BnfoldError(f"{path}: tensor '{tensor.name}' has external data at {location!r}: {why}; refused")
        if location not in sizes:
            target = folder / location
            real = Path(os.path.realpath(target))
            if folder not in real.parents:
                raise BnfoldError(f"{path}: external data {location!r} leads outside the model's folder; refused")
            try:
                status = real.stat()
            except OSError:
                raise BnfoldError(f"{path}: external data file {location!r} is missing") from None
            if not stat.S_ISREG(status.st_mode):
                raise BnfoldError(f"{path}: external data {location!r} is not a regular file; refused")
            if status.st_nlink > 1:
                raise BnfoldError(f"{path}: external data {location!r} is a hard link; refused")
            sizes[location] = status.st_size
        try:
            end = int(info.get("offset") or 0) + int(info.get("length") or 0)
        except ValueError:
            raise BnfoldError(f"{path}: tensor '{tensor.name}' has a malformed external-data offset or length") from None
        if end > sizes[location]:
            raise BnfoldError(f"{path}: tensor '{tensor.name}' reaches past the end of {location!r}")
    return folder


def _unsafe_location(location: str) -> str:
    if not location:
        return "no location"
    for flavour in (PurePosixPath(location), PureWindowsPath(location)):
        if flavour.is_absolute() or flavour.drive or flavour.root:
            return "an absolute path"
        if ".." in flavour.parts:
            return "a path with '..'"
    return ""


def output_path(model_path: str | os.PathLike, output: str | os.PathLike | None) -> Path:
    """Where the folded model goes: `-o` as given (a folder gets `<name>.folded.onnx` inside
    it), else beside the input. Refuses any path that is the input itself."""
    src = Path(model_path)
    stem = src.name[: -len(".onnx")] if src.name.endswith(".onnx") else src.name
    if output is None:
        dst = src.with_name(stem + SUFFIX)
    else:
        dst = Path(output)
        if dst.is_dir():
            dst = dst / (stem + SUFFIX)
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise BnfoldError(f"{dst}: refusing to overwrite the input model; choose another -o")
    return dst


SINGLE_FILE_LIMIT = 2**31 - 2**26  # protobuf's 2 GiB message limit, with room for the graph
EXTERNAL_THRESHOLD = 1024  # tensors of at least this many bytes go to the data file
ALIGNMENT = 4096  # external tensors start at page boundaries, so they can be memory-mapped


def serialized_size(model: onnx.ModelProto) -> int:
    """The model's size as one protobuf message. protobuf refuses to even compute it past
    2 GiB; then the tensor bytes, which dominate it, stand in (and are past the limit too)."""
    try:
        return model.ByteSize()
    except Exception:
        return sum(len(t.raw_data) for t in _initializers(model.graph))


class StagedModel:
    """A model written under temporary names in its destination folder, to be checked and then
    committed with one rename.

    The model is streamed to disk, never serialized whole (modelfile's `_ModelWriter`): the
    new tensors' data comes straight from their arrays (`new_values`, see GraphIndex), tensors
    from an input data file (`source_folder`) are copied file to file, the rest are written one
    at a time. This is what keeps a fold as cheap as reading and writing the file, and works
    past protobuf's 2 GiB limit for one message.

    With external data, the tensors go to `<output name>.<8 hex>.data`: a new file every time,
    so nothing is ever appended to or overwritten in a data file another model may read. It is
    written under a temporary name and renamed into place before the model is; the model's
    rename is the commit. So at every moment the output path holds the previous model (with
    its own data file intact) or the new one (with its data complete); after the commit the
    previous output's bnfold-named data file is removed. Used as a context manager, anything
    not committed is removed on exit.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        dest: Path,
        *,
        external: bool,
        new_values: dict[str, np.ndarray] | None = None,
        source_folder: Path | None = None,
    ):
        self.dest = dest
        self.data_path: Path | None = None
        self._committed = False
        self.path = self._temporary(".tmp")
        try:
            if external:
                self.data_path = dest.with_name(f"{dest.name}.{secrets.token_hex(4)}.data")
                staging = self._temporary(".data.tmp")
                try:
                    with open(self.path, "wb") as out, open(staging, "wb") as data:
                        _ModelWriter(out, new_values or {}, source_folder, data, self.data_path.name).write(model)
                        _sync(data)
                        _sync(out)
                    os.chmod(staging, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
                    os.replace(staging, self.data_path)
                except BaseException:
                    _unlink(staging)
                    raise
            else:
                with open(self.path, "wb") as out:
                    _ModelWriter(out, new_values or {}, source_folder).write(model)
                    _sync(out)
                if self.path.stat().st_size > SINGLE_FILE_LIMIT:
                    raise BnfoldError(
                        "the folded model is over 2 GiB, more than one ONNX file can hold; use --external-data auto"
                    )
            self.bytes = self.path.stat().st_size + (self.data_path.stat().st_size if self.data_path else 0)
        except OSError as exc:
            self.discard()
            raise BnfoldError(f"cannot write {dest}: {exc.strerror or exc}") from None
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        previous = _bnfold_data_files(self.dest)
        os.chmod(self.path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        try:
            os.replace(self.path, self.dest)
        except OSError as exc:
            raise BnfoldError(f"cannot write {self.dest}: {exc.strerror or exc}") from None
        self._committed = True
        _fsync_directory(self.dest.parent)
        for old in previous - {self.data_path}:
            _unlink(old)

    def discard(self) -> None:
        if not self._committed:
            _unlink(self.path)
            if self.data_path is not None:
                _unlink(self.data_path)

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.discard()

    def _temporary(self, suffix: str) -> Path:
        try:
            fd, name = tempfile.mkstemp(prefix=f".{self.dest.name}.", suffix=suffix, dir=self.dest.parent)
        except OSError as exc:
            raise BnfoldError(f"cannot write {self.dest}: {exc.strerror or exc}") from None
        os.close(fd)
        return Path(name)


def _sync(file) -> None:
    file.flush()
    os.fsync(file.fileno())


# A message field that occurs several times is merged by every parser (protobuf's encoding
# spec: "Last One Wins" for scalars, merge for messages), so a GraphProto can be written as a
# shell and then one chunk per initializer, each chunk small enough to hold in memory.


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_header(number: int, length: int) -> bytes:
    return _varint(number << 3 | 2) + _varint(length)


def _shell(message, skip: set[str]):
    """A copy of `message` without the fields in `skip`, made field by field so that the
    skipped ones (a graph's initializers, a tensor's data) are never touched or copied."""
    shell = type(message)()
    for field in message.DESCRIPTOR.fields:
        name = field.name
        if name in skip:
            continue
        if _is_repeated(field):
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


class _ModelWriter:
    """Writes a ModelProto in the protobuf wire format, one initializer at a time (StagedModel).

    Each main-graph initializer's data comes from, in this order: `new_values` (arrays of the
    tensors the fold created), its external data file in `source_folder` (copied file to file
    when the output keeps external data too), or the tensor itself. With a `data` file, tensors
    of at least EXTERNAL_THRESHOLD bytes go there, page-aligned, as external data at `location`.
    Every tensor's data is checked against its dims and type on the way (`_payload_size`).
    """

    def __init__(self, out, new_values: dict[str, np.ndarray], source_folder: Path | None, data=None, location: str = ""):
        self.out, self.data, self.location = out, data, location
        self.new_values, self.source_folder = new_values, source_folder
        self.offset = 0  # in the data file

    def write(self, model: onnx.ModelProto) -> None:
        self.out.write(_shell(model, {"graph"}).SerializeToString())
        graph = _shell(model.graph, {"initializer"})
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
        expected = _payload_size(tensor)
        size = _external_info(tensor)[2] if payload is None else len(payload)
        if expected is not None and size < expected:
            raise BnfoldError(
                f"tensor '{tensor.name}' holds {size} bytes of data; its dims and type need {expected}"
            )
        header = _shell(tensor, _RAW_FIELDS | _EXTERNAL_FIELDS)
        if self.data is not None and size >= EXTERNAL_THRESHOLD:
            offset = self._data_offset()
            if payload is None:
                self._copy_external(tensor)
            else:
                self.data.write(payload)
            self._point_to_data(header, offset, size)
            self.offset += size
            self._write_tensor_bytes([header.SerializeToString()])
            return
        if payload is None:
            payload = _external_bytes(tensor, self.source_folder)
        self._write_tensor_bytes([header.SerializeToString(), _field_header(_TENSOR_RAW_DATA, len(payload)), payload])

    def _write_tensor_bytes(self, parts: list) -> None:
        length = sum(len(p) for p in parts)
        self._write_graph_chunk([_field_header(_GRAPH_INITIALIZER, length), *parts])

    def _data_offset(self) -> int:
        padding = -self.offset % ALIGNMENT
        self.data.write(b"\0" * padding)
        self.offset += padding
        return self.offset

    def _point_to_data(self, tensor: onnx.TensorProto, offset: int, length: int) -> None:
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)

    def _externalize_tensor(self, tensor: onnx.TensorProto) -> None:
        """Move a tensor held in the protobuf tree to the data file, if it is big enough."""
        raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data
        if len(raw) < EXTERNAL_THRESHOLD:
            return
        offset = self._data_offset()
        self.data.write(raw)
        for field in _RAW_FIELDS:
            tensor.ClearField(field)
        self._point_to_data(tensor, offset, len(raw))
        self.offset += len(raw)

    def _externalize_nested(self, graph: onnx.GraphProto) -> None:
        """Subgraph initializers (If/Loop/Scan bodies) go to the data file too."""
        for node in graph.node:
            for body in subgraphs(node):
                for tensor in _initializers(body):
                    if tensor.data_type != onnx.TensorProto.STRING and tensor.data_location != onnx.TensorProto.EXTERNAL:
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
    """(location, offset, length) of an external tensor, already checked by _checked_locations."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    offset = int(info.get("offset") or 0)
    length = info.get("length")
    if length is None:
        expected = _payload_size(tensor)
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
    header = _shell(tensor, _RAW_FIELDS | _EXTERNAL_FIELDS)
    header.raw_data = _external_bytes(tensor, folder)
    return numpy_helper.to_array(header)


_T = onnx.TensorProto
_PLAIN_DTYPES = {  # ONNX types whose raw data is exactly numpy's little-endian layout
    _T.FLOAT: np.dtype(np.float32), _T.DOUBLE: np.dtype(np.float64), _T.FLOAT16: np.dtype(np.float16),
    _T.INT8: np.dtype(np.int8), _T.INT16: np.dtype(np.int16), _T.INT32: np.dtype(np.int32), _T.INT64: np.dtype(np.int64),
    _T.UINT8: np.dtype(np.uint8), _T.UINT16: np.dtype(np.uint16), _T.UINT32: np.dtype(np.uint32),
    _T.UINT64: np.dtype(np.uint64), _T.BOOL: np.dtype(np.bool_),
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
    _ModelWriter checks as it writes; everything else onnx.checker sees in full."""
    skeleton = _shell(model, {"graph"})
    skeleton.graph.CopyFrom(_shell(model.graph, {"initializer"}))
    longest = 0
    for tensor in model.graph.initializer:
        size = _payload_size(tensor)
        if size is not None and size >= EXTERNAL_THRESHOLD:
            stub = _shell(tensor, _RAW_FIELDS | _EXTERNAL_FIELDS)
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
            small = skeleton.graph.initializer.add()
            small.CopyFrom(_shell(tensor, _RAW_FIELDS | _EXTERNAL_FIELDS))
            small.raw_data = _external_bytes(tensor, source_folder)
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


def _payload_size(tensor: onnx.TensorProto) -> int | None:
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
    return sum(_payload_size(t) or 0 for t in graph.initializer)


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for sub in subgraphs(node):
            yield from _initializers(sub)


def _bnfold_data_files(model_path: Path) -> set[Path]:
    """The data files bnfold wrote for an existing output: named `<name>.<8 hex>.data`."""
    candidates = set(model_path.parent.glob(glob.escape(model_path.name) + ".*.data"))
    if not candidates or not model_path.is_file():
        return set()  # nothing to clean up: no need to parse the previous output
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:
        return set()
    pattern = re.compile(re.escape(model_path.name) + r"\.[0-9a-f]{8}\.data")
    locations = _external_locations(external_tensors(model))
    return {model_path.with_name(loc) for loc in locations if pattern.fullmatch(loc)}


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable; not every platform or file system allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
