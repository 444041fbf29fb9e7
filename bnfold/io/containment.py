"""Which files a model may make bnfold (and onnxruntime) read.

A tensor stored as external data names a file by a `location` the model itself chooses, so
before any byte of external data is read every location must be a plain relative path that
stays inside the model's folder: not absolute, no `..`, not through a symlink that leads out,
not a hard link (which could be a second name for any file on the disk), and within the file's
size. onnxruntime is a second loader of the same file, so `source.check_external_data` runs
before it is given a path too.
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


def checked_locations(path: Path, tensors: list[onnx.TensorProto]) -> Path:
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
