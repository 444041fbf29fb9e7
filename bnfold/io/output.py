"""Where the folded model goes, and writing it all-or-nothing: staged under temporary names
in the destination folder, checked, then committed with one rename."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import secrets
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.io.containment import external_locations, external_tensors
from bnfold.io.source import ModelSource
from bnfold.io.tensors import initializers
from bnfold.io.writer import ModelWriter
from bnfold.supervise import JOURNAL

SUFFIX = ".folded.onnx"


def output_path(model_path: str | os.PathLike, output: str | os.PathLike | None) -> Path:
    """Where the folded model goes: `-o` as given (a folder, or a name ending in `/`, gets
    `<name>.folded.onnx` inside it), else beside the input. A missing folder on the way is
    created, as a batch creates its output folder. Refuses a path that is the input itself, or
    anything but a regular file (or a link to one)."""
    src = Path(model_path)
    if output is None:
        dst = src.with_name(folded_name(src))
    else:
        dst = Path(output)
        folder = dst if str(output).endswith(("/", os.sep)) else dst.parent
        if not folder.is_dir():
            try:
                folder.mkdir(parents=True)
            except OSError as exc:
                raise BnfoldError(f"{folder}: cannot create the folder ({exc.strerror or exc})") from None
        if dst.is_dir():
            dst = dst / folded_name(src)
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise BnfoldError(f"{dst}: refusing to overwrite the input model; choose another -o")
    refuse_unless_replaceable(dst)
    return dst


def folded_name(model_path: Path) -> str:
    """`net.onnx` → `net.folded.onnx`: the output's name in a folder, or beside the input."""
    name = model_path.name
    return (name[: -len(".onnx")] if name.endswith(".onnx") else name) + SUFFIX


def refuse_unless_replaceable(dst: Path) -> None:
    """bnfold replaces an existing output by renaming a new file over it: fine for a regular
    file or a link to one, never for a device, a FIFO or a socket (as root, `-o /dev/null` would
    otherwise replace the system's device node)."""
    try:
        status = os.stat(dst)  # through a link: what it points to
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BnfoldError(f"{dst}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(status.st_mode):
        raise BnfoldError(f"{dst}: exists and is not a regular file; refusing to replace it")


def refuse_to_write_over(dest: Path, keep: list[Path]) -> None:
    """write_text's refusals, to ask before any work is done."""
    refuse_unless_replaceable(dest)
    if any(os.path.abspath(dest) == os.path.abspath(path) for path in keep) or _any_same(dest, keep):
        raise BnfoldError(f"{dest}: is one of the models; choose another name for the report")


def write_text(dest: Path, text: str, *, keep: list[Path]) -> None:
    """A small file of text (the HTML report) written all or nothing: staged beside `dest`, then
    renamed over it. Never over one of `keep` (the models this run reads or writes), nor over a
    file that is not a regular file."""
    refuse_to_write_over(dest, keep)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staged = _hidden_name(dest, ".tmp")
        try:
            with open(staged, "x", encoding="utf-8") as out:
                out.write(text)
                _sync(out)
            os.chmod(staged, 0o666 & ~_umask())
            os.replace(staged, dest)
            _unstage(staged)
        finally:
            _unlink(staged)
    except OSError as exc:
        raise BnfoldError(f"cannot write {dest}: {exc.strerror or exc}") from None


def refuse_input_data(dst: Path, data_files: list[Path]) -> None:
    """The output may not be one of the files the input reads its tensors from."""
    if not dst.exists():
        return
    for data in data_files:
        if data.exists() and os.path.samefile(dst, data):
            raise BnfoldError(f"{dst}: is the input's external data file; choose another -o")


SINGLE_FILE_LIMIT = 2**31 - 2**26  # protobuf's 2 GiB message limit, with room for the graph


def serialized_size(model: onnx.ModelProto) -> int:
    """The model's size as one protobuf message. protobuf refuses to even compute it past
    2 GiB; then the tensor bytes, which dominate it, stand in (and are past the limit too)."""
    try:
        return model.ByteSize()
    except Exception:
        return sum(len(t.raw_data) for t in initializers(model.graph))


class StagedModel:
    """A model written under temporary names in its destination folder, to be checked and then
    committed with one rename.

    The model is streamed to disk, never serialized whole (`ModelWriter`): the new tensors'
    data comes straight from their arrays (`pending`, see bnfold.graph.tensors), stubs' bytes
    are copied file to file from where the `source` found them, the rest are written one at a
    time. This is what keeps a fold as cheap as reading and writing the file, and works
    past protobuf's 2 GiB limit for one message.

    With external data, the tensors go to `<output name>.<8 hex>.data`, the hex from the SHA-256
    of its bytes: nothing is ever appended to a data file, and one of that name that another
    model may read holds the same bytes. Until the commit it is a hidden
    `.<output name>.<8 random hex>.tmp` beside the hidden staged model, which names it (so the
    staged model can be verified); the two names have one length, and the commit writes the model
    again with the final name in place of the hidden one, renames the data file into place, then
    the model: the model's rename is the commit. So at every moment the output
    path holds the previous model (with its own data file intact) or the new one (with its data
    complete), and a run killed before the commit leaves no visible file; after the commit the
    previous output's bnfold-named data file is removed. Used as a context manager, anything
    not committed is removed on exit.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        dest: Path,
        *,
        external: bool,
        pending: dict[str, np.ndarray] | None = None,
        source: ModelSource | None = None,
    ):
        self.dest = dest
        self.data_path: Path | None = None  # the data file's name once committed
        self._hidden_data: Path | None = None  # …and until then
        self._committed = False
        self.path = self._temporary(".tmp")
        with self._discarded_on_error():
            if external:
                # hidden until the commit names it after its content (a random name of one length)
                self._hidden_data = _hidden_name(dest, ".tmp")
                with open(self.path, "wb") as out, open(self._hidden_data, "xb") as data:
                    ModelWriter(out, pending or {}, source, data, self._hidden_data.name).write(model)
                    _sync(data)
                    _sync(out)
                os.chmod(self._hidden_data, 0o666 & ~_umask())
            else:
                with open(self.path, "wb") as out:
                    ModelWriter(out, pending or {}, source).write(model)
                    _sync(out)
                if self.path.stat().st_size > SINGLE_FILE_LIMIT:
                    raise BnfoldError(
                        "the folded model is over 2 GiB, more than one ONNX file can hold; use --external-data auto"
                    )
            self.bytes = self.path.stat().st_size + (self._hidden_data.stat().st_size if self._hidden_data else 0)

    @contextlib.contextmanager
    def _discarded_on_error(self):
        """Whatever goes wrong while staging removes what was staged; an OSError becomes one line."""
        try:
            yield
        except OSError as exc:
            self.discard()
            raise BnfoldError(f"cannot write {self.dest}: {exc.strerror or exc}") from None
        except BaseException:
            self.discard()
            raise

    @classmethod
    def copy(cls, src: Path, dest: Path) -> StagedModel:
        """A staged copy of the file `src`, byte for byte (a model with nothing to fold)."""
        staged = cls.__new__(cls)
        staged.dest, staged.data_path, staged._hidden_data, staged._committed = dest, None, None, False
        staged.path = staged._temporary(".tmp")
        with staged._discarded_on_error():
            with open(src, "rb") as data, open(staged.path, "wb") as out:
                shutil.copyfileobj(data, out, 1 << 24)
                _sync(out)
            staged.bytes = staged.path.stat().st_size
        return staged

    def commit(self, keep: list[Path] = ()) -> None:
        """Rename the staged model over the destination; then remove the data file the previous
        output there used, unless it is one of `keep` (the files the input was read from: a copy
        of a previous output reads the same data file)."""
        previous = {old for old in _bnfold_data_files(self.dest) if not _any_same(old, keep)}
        os.chmod(self.path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        try:
            if self._hidden_data is not None:
                self._name_the_data_file()
            os.replace(self.path, self.dest)
            _unstage(self.path, self.data_path)
        except OSError as exc:
            raise BnfoldError(f"cannot write {self.dest}: {exc.strerror or exc}") from None
        self._committed = True
        _fsync_directory(self.dest.parent)
        for old in previous - {self.data_path}:
            _unlink(old)

    def _name_the_data_file(self) -> None:
        """The staged model again, naming the data file by its final name, then the data file
        renamed to that name. The final name is `<output>.<8 hex of its SHA-256>.data`: the same
        input and options give the same files, byte for byte, and a data file of that name holds
        those bytes whoever wrote it (so replacing one changes nothing another model reads).
        Both names have one length: every offset in the model file stays."""
        hidden = self._hidden_data.name.encode()
        staged = self.path.read_bytes()  # with external data the model file holds only the structure
        if not staged.count(hidden):  # every tensor was too small for the data file
            _unlink(self._hidden_data)
            self._hidden_data = None
            return
        digest = _digest(self._hidden_data)
        self.data_path = self.dest.with_name(f"{self.dest.name}.{digest[:8]}.data")
        if self.data_path.exists() and not _holds(self.data_path, digest):
            path, self.data_path = self.data_path, None
            raise BnfoldError(
                f"{path} exists with other bytes than its name says (edited, or another program's): "
                "bnfold does not replace it; move it away or write to another output name"
            )
        final = self.data_path.name.encode()
        renamed = self._temporary(".tmp")
        try:
            with open(renamed, "wb") as out:
                out.write(staged.replace(hidden, final))
                _sync(out)
            os.chmod(renamed, 0o666 & ~_umask())
            os.replace(renamed, self.path)
            _unstage(renamed)
        except BaseException:
            _unlink(renamed)
            raise
        if not self.data_path.exists():  # …else one of the same bytes that another model may read
            _stage(self.data_path)  # until the model's rename commits it
        os.replace(self._hidden_data, self.data_path)
        _unstage(self._hidden_data)
        self._hidden_data = None

    def discard(self) -> None:
        if self._committed:
            return
        _unlink(self.path)
        if self._hidden_data is not None:
            _unlink(self._hidden_data)
        elif self.data_path is not None:
            _unlink(self.data_path)  # renamed into place, but the model never was

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.discard()

    def _temporary(self, suffix: str) -> Path:
        """A new empty hidden file beside the destination, `.<name>.<8 random hex><suffix>`,
        known to discard_staged before it exists."""
        for _ in range(100):
            path = _hidden_name(self.dest, suffix)
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                return path
            except FileExistsError:
                _unstage(path)
            except OSError as exc:
                _unstage(path)
                raise BnfoldError(f"cannot write {self.dest}: {exc.strerror or exc}") from None
        raise BnfoldError(f"cannot write {self.dest}: no free temporary name beside it")


# The files this process has staged and neither committed nor removed. A name is added before
# its file is created and leaves when the file is renamed or removed, so a batch worker told to
# stop (bnfold.batch) removes every one of them, whatever line it was at. Under the `bnfold`
# command each change is also journaled, for the parent process to remove them after a native
# crash (bnfold.supervise).
_STAGED: set[Path] = set()


def _hidden_name(dest: Path, suffix: str) -> Path:
    path = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}{suffix}")
    _stage(path)
    return path


def _stage(path: Path) -> None:
    _STAGED.add(path)
    _journal("+", path)


def _unstage(*paths: Path | None) -> None:
    for path in paths:
        if path in _STAGED:
            _STAGED.discard(path)
            _journal("-", path)


def _journal(sign: str, path: Path) -> None:
    journal = os.environ.get(JOURNAL)
    if journal:
        with open(journal, "a", encoding="utf-8", errors="surrogateescape") as f:
            f.write(f"{sign}{os.path.abspath(path)}\n")


def discard_staged() -> None:
    """Remove every hidden file this process staged and did not commit."""
    for path in list(_STAGED):
        _unlink(path)


def _digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in large pieces (it was just written: in the page cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _holds(path: Path, digest: str) -> bool:
    """Whether the file at `path` holds the bytes whose SHA-256 is `digest`."""
    try:
        return _digest(path) == digest
    except OSError:
        return False


def _any_same(path: Path, others) -> bool:
    return any(other.exists() and path.exists() and os.path.samefile(path, other) for other in others)


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
    locations = external_locations(external_tensors(model))
    return {model_path.with_name(loc) for loc in locations if pattern.fullmatch(loc)}


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    _unstage(path)


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
