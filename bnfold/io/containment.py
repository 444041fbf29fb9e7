"""Which files a model may make bnfold (and onnxruntime) read.

A tensor stored as external data names a file by a `location` the model itself chooses, so
before any byte of external data is read every location must be a plain relative path that
stays inside the model's folder: not absolute, no `..`, no NUL, not through a symlink that
leads out, not a hard link (which could be a second name for any file on the disk), each key
given once, and offset and length within the file's size. onnxruntime is a second loader of the
same file, so `source.check_external_data` runs before it is given a path too.

The model's folder is the folder the model file is named in (where onnxruntime looks too). A
symlink may lead from there into the folder the model file itself resolves to: a Hugging Face
hub cache keeps `snapshots/<rev>/model.onnx` and its data as links into `blobs/`, both.

Checked and read through one handle: each data file is opened once, by walking its resolved
path from the root without following any link (so nothing swapped in after the check is
opened), and its size and kind are taken from that handle; every read goes through it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx

from bnfold.errors import BnfoldError
from bnfold.graph.protos import subgraphs


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


def external_locations(tensors) -> set[str]:
    return {entry.value for tensor in tensors for entry in tensor.external_data if entry.key == "location"}


class DataFile:
    """A vetted external data file, open for reading; `path` is for messages."""

    def __init__(self, path: Path, fd: int, size: int):
        self.path, self.fd, self.size = path, fd, size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_locations(path: Path, tensors: list[onnx.TensorProto]) -> dict[str, DataFile]:
    """Every external-data location of `tensors`, checked (module docstring) and opened once."""
    base = Path(os.path.abspath(path)).parent  # where locations are looked up, like onnxruntime
    allowed = {Path(os.path.realpath(base)), path.resolve().parent}
    opened: dict[str, DataFile] = {}
    try:
        for tensor in tensors:
            info = external_fields(path, tensor)
            location = info["location"]
            if location not in opened:
                opened[location] = _open_inside(path, base / location, location, allowed)
            end = info["offset"] + (info["length"] or 0)
            if end > opened[location].size:
                raise BnfoldError(f"{path}: tensor '{tensor.name}' reaches past the end of {location!r}")
    except BaseException:
        for data in opened.values():
            data.close()
        raise
    return opened


def external_fields(path: Path, tensor: onnx.TensorProto) -> dict:
    """A tensor's external-data entries as {"location", "offset", "length" (None if absent)},
    or a one-line refusal when they are malformed."""
    keys = [entry.key for entry in tensor.external_data]
    repeated = next((key for key in keys if keys.count(key) > 1), None)
    if repeated:
        raise BnfoldError(f"{path}: tensor '{tensor.name}' gives its external-data key '{repeated}' twice; refused")
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    why = _unsafe_location(location)
    if why:
        raise BnfoldError(f"{path}: tensor '{tensor.name}' has external data at {location!r}: {why}; refused")
    try:
        offset, length = int(info.get("offset") or 0), info.get("length")
        length = None if length is None else int(length)
    except ValueError:
        raise BnfoldError(f"{path}: tensor '{tensor.name}' has a malformed external-data offset or length") from None
    if offset < 0 or (length is not None and length < 0):
        raise BnfoldError(f"{path}: tensor '{tensor.name}' has a negative external-data offset or length")
    return {"location": location, "offset": offset, "length": length}


def _open_inside(path: Path, target: Path, location: str, allowed: set[Path]) -> DataFile:
    real = Path(os.path.realpath(target))
    if not any(folder in real.parents for folder in allowed):
        raise BnfoldError(f"{path}: external data {location!r} leads outside the model's folder; refused")
    try:
        fd = _open_without_links(real)
    except FileNotFoundError:
        raise BnfoldError(f"{path}: external data file {location!r} is missing") from None
    except OSError:
        raise BnfoldError(f"{path}: external data {location!r} changed while it was opened; refused") from None
    status = os.fstat(fd)
    why = ""
    if not stat.S_ISREG(status.st_mode):
        why = "is not a regular file"
    elif status.st_nlink > 1:
        why = "is a hard link"
    if why:
        os.close(fd)
        raise BnfoldError(f"{path}: external data {location!r} {why}; refused")
    return DataFile(target, fd, status.st_size)


def _open_without_links(real: Path) -> int:
    """Open `real` (a resolved path) walking from the root with O_NOFOLLOW at every step: if any
    part was swapped for a link since it was resolved, this fails instead of following it."""
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i, part in enumerate(real.parts[1:], 1):
            last = i == len(real.parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | (0 if last else os.O_DIRECTORY) | getattr(os, "O_NONBLOCK", 0)
            child = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unsafe_location(location: str) -> str:
    if not location:
        return "no location"
    if "\0" in location:
        return "a NUL character"
    for flavour in (PurePosixPath(location), PureWindowsPath(location)):
        if flavour.is_absolute() or flavour.drive or flavour.root:
            return "an absolute path"
        if ".." in flavour.parts:
            return "a path with '..'"
    return ""
