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
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import onnx

from bnfold import wire
from bnfold.errors import BnfoldError, first_line
from bnfold.graph.protos import subgraphs

SUFFIX = ".folded.onnx"


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file with its external data, or raise BnfoldError saying why it is not one."""
    return read_model(path)[0]


def read_model(path: str | os.PathLike, *, load_external: bool = True) -> tuple[onnx.ModelProto, list[Path]]:
    """The model with its external data loaded, and the data files it was read from.

    With `load_external=False` the main graph's initializers keep their data where it is: in
    an external data file, or in the model file itself (see _parse); wire.read_tensor reads one on
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
    copied file to file when the output is written (wire.ModelWriter)."""
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
                    light = wire.light_model(data, path.resolve().name) if _is_utf8(path.resolve().name) else None
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
            raise BnfoldError(
                f"{path}: tensor '{tensor.name}' has a malformed external-data offset or length"
            ) from None
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


def serialized_size(model: onnx.ModelProto) -> int:
    """The model's size as one protobuf message. protobuf refuses to even compute it past
    2 GiB; then the tensor bytes, which dominate it, stand in (and are past the limit too)."""
    try:
        return model.ByteSize()
    except Exception:
        return sum(len(t.raw_data) for t in wire.initializers(model.graph))


class StagedModel:
    """A model written under temporary names in its destination folder, to be checked and then
    committed with one rename.

    The model is streamed to disk, never serialized whole (`wire.ModelWriter`): the
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
                        wire.ModelWriter(out, new_values or {}, source_folder, data, self.data_path.name).write(model)
                        _sync(data)
                        _sync(out)
                    os.chmod(staging, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
                    os.replace(staging, self.data_path)
                except BaseException:
                    _unlink(staging)
                    raise
            else:
                with open(self.path, "wb") as out:
                    wire.ModelWriter(out, new_values or {}, source_folder).write(model)
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
