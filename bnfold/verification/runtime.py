"""The onnxruntime adapter: the only module of bnfold that imports onnxruntime.

Sessions run with graph optimizations disabled: at its default level onnxruntime fuses Conv+BN
itself, and a check of the original would then compare bnfold against onnxruntime's own fold.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort

from bnfold.errors import BnfoldError, one_line
from bnfold.io.source import check_external_data, load_model
from bnfold.verification.inputs import InputSpec

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


def make_session(
    model: onnx.ModelProto | str | Path,
    *,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    optimize: bool = False,
    threads: int = 0,
) -> ort.InferenceSession:
    """A session on a ModelProto or a model file (a path lets onnxruntime read external data).
    `optimize` turns on onnxruntime's BASIC graph optimizations (float32-exact rewrites);
    `threads` caps its intra-op threads (0: onnxruntime's default, every core)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4  # fatal only: its errors come back as exceptions, one line each
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=list(providers))


def whole_model(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """A copy of `model` with all its data, for the caller to change (extra outputs); a
    BnfoldError past 2 GiB, which no ModelProto can hold."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    loaded = load_model(Path(model))
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


def describe(model) -> str:
    """How reports name a model: its path, or its graph's name when it is in memory."""
    return str(model) if not isinstance(model, onnx.ModelProto) else (model.graph.name or "<in memory>")


def load_session(
    model, role: str, providers, *, optimize: bool = False, check_locations: bool = True, threads: int = 0
) -> ort.InferenceSession:
    """make_session, with the external-data check first and a ModelLoadError naming the role."""
    if check_locations and not isinstance(model, onnx.ModelProto):
        check_external_data(model)  # onnxruntime reads external data itself: check it first
    try:
        return make_session(model, providers=providers, optimize=optimize, threads=threads)
    except Exception as exc:
        raise ModelLoadError(role, f"onnxruntime cannot load {describe(model)}: {one_line(exc)}") from None


def providers_used(sessions, requested: Sequence[str]) -> list[str]:
    """The providers the sessions really run on; a BnfoldError when one that was asked for is
    not among them (onnxruntime falls back to the CPU when a GPU provider cannot start)."""
    used = list(dict.fromkeys(p for s in sessions for p in s.get_providers()))
    missing = [p for p in requested if p not in used]
    if missing:
        raise BnfoldError(f"provider {missing[0]} was asked for but onnxruntime runs on {', '.join(used)}")
    return used


def signature(session: ort.InferenceSession, kind: str) -> list[tuple[str, str]]:
    """(name, type) of a session's "inputs" or "outputs", in the model's order."""
    return [(v.name, v.type) for v in getattr(session, f"get_{kind}")()]


def input_declarations(session: ort.InferenceSession) -> list[InputSpec]:
    """The model's inputs as onnxruntime reads them: name, type string, declared shape."""
    return [InputSpec(v.name, v.type, v.shape) for v in session.get_inputs()]


def run_session(session: ort.InferenceSession, feed: dict, label: str) -> list[np.ndarray]:
    """Run once; bfloat16 arrays go in as OrtValues (the only way onnxruntime's Python API
    takes them). A failure is one clear line."""
    feed = ort_feed(feed)
    try:
        if any(isinstance(v, ort.OrtValue) for v in feed.values()):
            values = {
                k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()
            }
            return [v.numpy() for v in session.run_with_ort_values(None, values)]
        return session.run(None, feed)
    except Exception as exc:
        raise BnfoldError(f"onnxruntime could not run {label}: {one_line(exc)}") from None


def run_named(session: ort.InferenceSession, feed: dict, label: str) -> dict:
    """run_session, with each output by its name."""
    names = [value.name for value in session.get_outputs()]
    return dict(zip(names, run_session(session, feed, label)))


def ort_feed(feed: dict) -> dict:
    """A feed as onnxruntime takes it: bfloat16 arrays as OrtValues of the ONNX type."""
    return {k: _bfloat16_value(v) if v.dtype == ml_dtypes.bfloat16 else v for k, v in feed.items()}


def _bfloat16_value(array: np.ndarray) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), onnx.TensorProto.BFLOAT16)


class SessionPair:
    """The reference's and the candidate's sessions, created and run side by side: onnxruntime
    releases the GIL while it works, and each session gets half the cores, which on 2 cores runs
    a ResNet-50 pair 1.7× faster than one after the other with every core each (bench/run.py)."""

    def __init__(self, models, providers, *, check_locations: bool = True, cores: int | None = None):
        """`cores`: how many cores this pair may use (default: all; a batch of `--jobs N` gives
        each model its share)."""
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bnfold-verify")
        threads = max(1, (cores or os.cpu_count() or 2) // 2)
        roles = ("reference", "candidate")
        self.sessions = list(
            self._pool.map(
                lambda pair: load_session(
                    pair[0], pair[1], providers, check_locations=check_locations, threads=threads
                ),
                zip(models, roles),
            )
        )

    def try_reference(self, feed: dict) -> str | None:
        """None when the reference runs on `feed`, else onnxruntime's one-line error."""
        try:
            run_session(self.sessions[0], feed, "the reference")
        except BnfoldError as exc:
            return str(exc)
        return None

    def run(self, feed: dict, labels: tuple[str, str]) -> tuple[dict, dict]:
        """Both models' outputs on `feed`, by name."""
        want, got = self._pool.map(lambda pair: run_named(pair[0], feed, pair[1]), zip(self.sessions, labels))
        return want, got

    def __enter__(self) -> SessionPair:
        return self

    def __exit__(self, *exc_info) -> None:
        self._pool.shutdown()
