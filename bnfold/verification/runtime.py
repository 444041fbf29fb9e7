"""The onnxruntime adapter: the only module of bnfold that imports onnxruntime.

Sessions run with graph optimizations disabled: at its default level onnxruntime fuses Conv+BN
itself, and a check of the original would then compare bnfold against onnxruntime's own fold.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import os
import re
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx

from bnfold.errors import NO_RUNTIME, BnfoldError, MissingFile, one_line
from bnfold.io.source import check_external_data
from bnfold.io.view import EMPTY_DATA, LARGE_WEIGHTS, is_stub, split_weights
from bnfold.verification.inputs import InputSpec

try:
    import onnxruntime as ort
except ImportError as exc:  # bnfold installs without a runtime; the extras name the two builds
    raise BnfoldError(f"{NO_RUNTIME} ({one_line(exc)})") from exc

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


class ModelLoadError(BnfoldError):
    """onnxruntime cannot load one of the two models; `role` says which."""

    def __init__(self, role: str, message: str):
        super().__init__(message)
        self.role = role  # "reference" or "candidate"


def check_providers(providers: Sequence[str]) -> None:
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise BnfoldError(f"provider {missing[0]} is not available; have {', '.join(available)}")


_CUSTOM_OPS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("custom_op_libraries", default=())


@contextlib.contextmanager
def custom_op_libraries(paths: Sequence[str | os.PathLike]):
    """Within: every session registers these onnxruntime custom-op libraries
    (`SessionOptions.register_custom_ops_library`), for models with ops of another domain."""
    for path in paths:
        if not Path(path).is_file():
            raise MissingFile(f"--custom-lib {path}: no such file")
    # absolute: the dynamic loader searches the system's paths for a bare name, and
    # str(Path("./libx.so")) is the bare name "libx.so" (a user's ./libc.so.6 loaded the system's)
    libraries = tuple(str(Path(p).absolute()) for p in paths)
    token = _CUSTOM_OPS.set(libraries)
    try:
        yield
    finally:
        _CUSTOM_OPS.reset(token)


def takes_custom_ops(function):
    """`function` with one more keyword, `custom_ops` (paths of custom-op libraries), registered in
    every session it creates (custom_op_libraries)."""

    @functools.wraps(function)
    def with_libraries(*args, custom_ops: Sequence[str | os.PathLike] = (), **kwargs):
        with custom_op_libraries(custom_ops):
            return function(*args, **kwargs)

    return with_libraries


_STDERR_LOCK = threading.Lock()
_MISSING_LIBRARY = re.compile(  # Linux's loader; Windows' LoadLibrary names only the provider's DLL
    r"([\w.+-]+\.so[\w.]*): cannot open shared object file|trying to load \"([^\"]+)\""
)


@contextlib.contextmanager
def _provider_log(providers: Sequence[str]):
    """Within, for a provider other than the CPU's: onnxruntime's own log lines (coloured, written
    straight to file descriptor 2 while a GPU provider loads: "Failed to load library
    libonnxruntime_providers_cuda.so with error: libcublasLt.so.12: cannot open…") go into the
    list this yields, not into a pipeline's stderr. The CPU provider logs nothing there."""
    lines: list[str] = []
    if all(p == "CPUExecutionProvider" for p in providers):
        yield lines
        return
    with _STDERR_LOCK, tempfile.TemporaryFile() as log:  # one redirection at a time (verify loads two)
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            if any(p in _NVIDIA for p in providers):
                lines.extend(_preload_nvidia_libraries())
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            lines.extend(re.sub(r"\x1b\[[0-9;]*m", "", log.read().decode(errors="replace")).splitlines())


_NVIDIA = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@functools.cache
def _preload_nvidia_libraries() -> tuple[str, ...]:
    """Load CUDA and cuDNN from NVIDIA's pip packages (`onnxruntime-gpu[cuda,cudnn]`), which the
    dynamic loader does not search, with onnxruntime's own helper (1.21 and newer); once. Its
    messages (printed on stdout, where the --json report goes) come back as log lines."""
    if not hasattr(ort, "preload_dlls"):
        return ()
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        try:
            ort.preload_dlls()
        except Exception as exc:  # a helper that fails leaves the provider to say what is missing
            print(one_line(exc))
    return tuple(said.getvalue().splitlines())


def missing_library(log: Sequence[str]) -> str | None:
    """The shared library a provider could not load, as onnxruntime's log names it (the last
    named: the provider's own library fails because of the one it needs, libcublasLt.so.12)."""
    found = [m.group(1) or m.group(2) for line in log for m in _MISSING_LIBRARY.finditer(line)]
    return found[-1] if found else None


def make_session(
    model: onnx.ModelProto | str | Path,
    *,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    optimize: bool = False,
    threads: int = 0,
    arrays: dict[str, np.ndarray] | None = None,
) -> ort.InferenceSession:
    """A session on a ModelProto or a model file (a path lets onnxruntime read external data).
    `optimize` turns on every graph optimization, onnxruntime's default (what a deployment runs:
    its Conv+BN fusion, and the QDQ fusions that make integer kernels; `bnfold bench`);
    `threads` caps its intra-op threads (0: onnxruntime's default, every core). A ModelProto's
    large initializers reach onnxruntime as arrays (split_weights); `arrays` gives them for a
    skeleton that split_weights made already."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4  # fatal only: its errors come back as exceptions, one line each
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    for library in _CUSTOM_OPS.get():
        try:
            options.register_custom_ops_library(library)
        except Exception as exc:
            raise BnfoldError(f"--custom-lib {library}: onnxruntime cannot load it ({one_line(exc)})") from None
    with _provider_log(providers) as log:
        session = _session(model, options, providers, arrays)
    session._bnfold_log = log  # what onnxruntime said while it loaded the providers
    return session


def _session(model, options: ort.SessionOptions, providers: Sequence[str], arrays) -> ort.InferenceSession:
    if not isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(str(model), options, providers=list(providers))
    if arrays is None:
        model, arrays = split_weights(model)
    if not arrays:
        return ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))
    if sum(a.nbytes for a in arrays.values()) > LARGE_WEIGHTS:
        # onnxruntime would repack every weight into a copy of its own, per session: read them
        # where they lie instead (a 2.3 GB model's verification: 13.7 GB peak with repacking)
        options.add_session_config_entry("session.disable_prepacking", "1")
    held = []
    for tensor in model.graph.initializer:
        if is_stub(tensor):
            value = ort.OrtValue.ortvalue_from_numpy(arrays[tensor.name])
            options.add_initializer(tensor.name, value)
            held.append(value)
    with tempfile.TemporaryDirectory(prefix="bnfold-session-") as folder:
        (Path(folder) / EMPTY_DATA).touch()
        path = Path(folder) / "model.onnx"
        path.write_bytes(model.SerializeToString())
        session = ort.InferenceSession(str(path), options, providers=list(providers))
    session._bnfold_arrays = (options, held, arrays)  # what onnxruntime reads the weights from
    return session


def describe(model) -> str:
    """How reports name a model: its path, or its graph's name when it is in memory."""
    return str(model) if not isinstance(model, onnx.ModelProto) else (model.graph.name or "<in memory>")


def load_session(
    model, role: str, providers, *, optimize: bool = False, check_locations: bool = True, threads: int = 0
) -> ort.InferenceSession:
    """make_session, with the external-data check first and a ModelLoadError naming the role.
    `model` may also be a (skeleton, arrays) pair from split_weights."""
    model, arrays = model if isinstance(model, tuple) else (model, None)
    if check_locations and not isinstance(model, onnx.ModelProto):
        check_external_data(model)  # onnxruntime reads external data itself: check it first
    try:
        return make_session(model, providers=providers, optimize=optimize, threads=threads, arrays=arrays)
    except Exception as exc:
        raise ModelLoadError(role, f"onnxruntime cannot load {describe(model)}: {one_line(exc)}") from None


def providers_used(sessions, requested: Sequence[str]) -> list[str]:
    """The providers the sessions really run on; a BnfoldError when one that was asked for is
    not among them (onnxruntime falls back to the CPU when a GPU provider cannot start)."""
    used = list(dict.fromkeys(p for s in sessions for p in s.get_providers()))
    missing = [p for p in requested if p not in used]
    if missing:
        library = missing_library([line for s in sessions for line in getattr(s, "_bnfold_log", ())])
        why = f" ({library} cannot be loaded: see the README's 'Installing' for the GPU libraries)" if library else ""
        raise BnfoldError(f"provider {missing[0]} was asked for but onnxruntime runs on {', '.join(used)}{why}")
    return used


def signature(session: ort.InferenceSession, kind: str) -> list[tuple[str, str]]:
    """(name, type) of a session's "inputs" or "outputs", in the model's order."""
    return [(v.name, v.type) for v in getattr(session, f"get_{kind}")()]


def input_declarations(session: ort.InferenceSession) -> list[InputSpec]:
    """The model's inputs as onnxruntime reads them: name, type string, declared shape."""
    return [InputSpec(v.name, v.type, v.shape) for v in session.get_inputs()]


def run_session(session: ort.InferenceSession, feed: dict, label: str, names=None) -> list[np.ndarray]:
    """Run once (for the outputs `names`, default all: onnxruntime still runs every node);
    bfloat16 arrays go in as OrtValues (the only way onnxruntime's Python API takes them). A
    failure is one clear line."""
    feed = ort_feed(feed)
    try:
        if any(isinstance(v, ort.OrtValue) for v in feed.values()):
            values = {
                k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()
            }
            return [v.numpy() for v in session.run_with_ort_values(names, values)]
        return session.run(names, feed)
    except Exception as exc:
        raise BnfoldError(f"onnxruntime could not run {label}: {one_line(exc)}") from None


def refusal(session: ort.InferenceSession, feed: dict, label: str) -> str | None:
    """None when `session` runs on `feed`, else onnxruntime's one-line error (how input sizes
    are searched: bnfold.verification.inputs.choose_feeds)."""
    try:
        run_session(session, feed, label)
    except BnfoldError as exc:
        return str(exc)
    return None


def run_named(session: ort.InferenceSession, feed: dict, label: str, names: list[str] | None = None) -> dict:
    """run_session, with each output by its name (of `names`, default all)."""
    names = names or [value.name for value in session.get_outputs()]
    return dict(zip(names, run_session(session, feed, label, names)))


def ort_feed(feed: dict) -> dict:
    """A feed as onnxruntime takes it: bfloat16 arrays as OrtValues of the ONNX type."""
    return {k: _bfloat16_value(v) if v.dtype == ml_dtypes.bfloat16 else v for k, v in feed.items()}


def _bfloat16_value(array: np.ndarray) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), onnx.TensorProto.BFLOAT16)


class SessionPair:
    """The reference's and the candidate's sessions, created and run side by side: onnxruntime
    releases the GIL while it works, and each session gets half the cores, which on 2 cores runs
    a ResNet-50 pair 1.7× faster than one after the other with every core each (bench/run.py)."""

    def __init__(
        self, models, providers, *, check_locations: bool = True, cores: int | None = None, plain_reference=None
    ):
        """`cores`: how many cores this pair may use (default: all; a batch of `--jobs N` gives
        each model its share). `plain_reference`: the reference without what a probe adds, for
        the trials that need only its outputs (onnxruntime runs every node of a session)."""
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bnfold-verify")
        threads = max(1, (cores or os.cpu_count() or 2) // 2)
        jobs = [*zip(models, ("reference", "candidate"))]
        if plain_reference is not None:
            jobs.append((plain_reference, "reference"))

        def load(job):  # in a pool thread, with the caller's context (custom-op libraries)
            model, role, context = job
            return context.run(load_session, model, role, providers, check_locations=check_locations, threads=threads)

        try:
            loaded = list(self._pool.map(load, [(*job, contextvars.copy_context()) for job in jobs]))
        except BaseException:
            self._pool.shutdown()
            raise
        self.sessions = loaded[:2]
        self.plain = loaded[2] if plain_reference is not None else loaded[0]

    def try_reference(self, feed: dict) -> str | None:
        """None when the reference runs on `feed`, else onnxruntime's one-line error."""
        return refusal(self.plain, feed, "the reference")

    def run(self, feed: dict, labels: tuple[str, str], plain: bool = False) -> tuple[dict, dict]:
        """Both models' outputs on `feed`, by name; with `plain`, the plain reference's."""
        sessions = (self.plain if plain else self.sessions[0], self.sessions[1])
        want, got = self._pool.map(lambda i: run_named(sessions[i], feed, labels[i]), range(2))
        return want, got

    def __enter__(self) -> SessionPair:
        return self

    def __exit__(self, *exc_info) -> None:
        self._pool.shutdown()
