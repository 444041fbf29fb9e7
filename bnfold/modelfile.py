"""Reading and writing model files: one clear error for bad input, atomic writes for output."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from bnfold.errors import BnfoldError, first_line

SUFFIX = ".folded.onnx"


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file, or raise BnfoldError saying why it is not one."""
    path = Path(path)
    if not path.exists():
        raise BnfoldError(f"{path}: no such file")
    if path.is_dir():
        raise BnfoldError(f"{path}: is a directory, not an ONNX model")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, bad external data, I/O: all the user's file
        raise BnfoldError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
    # An empty or foreign file can parse as an empty ModelProto; that is no model either.
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise BnfoldError(f"{path}: not an ONNX model (no IR version or no graph)")
    return model


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


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> int:
    """Write `model` atomically; return the number of bytes written."""
    try:
        data = model.SerializeToString()
    except ValueError as exc:  # protobuf refuses messages over 2 GiB
        raise BnfoldError(f"cannot serialize the folded model: {first_line(exc)}") from None
    write_atomic(data, Path(path))
    return len(data)


def write_atomic(data: bytes, dest: Path) -> None:
    """Write to a temporary file in the destination folder, fsync, then rename over `dest`.

    A rename within one file system is atomic, so `dest` is either untouched or complete, even
    if the process is killed mid-write; the temporary file is removed on any failure.
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        raise BnfoldError(f"cannot write {dest}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, dest)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise BnfoldError(f"cannot write {dest}: {exc.strerror or exc}") from None
        raise
    _fsync_directory(dest.parent)


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
