"""Input statistics measured on calibration data, for the rounding of 16-bit folds.

`bnfold optimize --calibration DATA` (`fold(..., calibration=DATA)`): onnxruntime runs the
original model, graph optimizations off, on the calibration inputs, and the per-channel mean and
variance of each Conv's data input (axis 1; every other axis pooled) replace what
bnfold.folding.correction would read from the graph. Tensors are exposed CHUNK at a time, one
session each, so memory stays bounded on large models.

Measured on six float16 networks (BENCHMARKS.md) the graph's statistics did as well: use it
where the graph says nothing (a network's first conv, after MaxPool or a squeeze-and-excitation
gate) or to check that claim on your own model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.folding.correction import InputMoments
from bnfold.graph.protos import is_onnx_op
from bnfold.io.view import whole_model, with_outputs
from bnfold.verification.inputs import ORT_TYPES, check_feed, load_input_sets
from bnfold.verification.runtime import (
    DEFAULT_PROVIDERS,
    input_declarations,
    load_session,
    run_named,
    takes_custom_ops,
)

CHUNK = 64  # tensors measured per session
SOURCE = "the calibration inputs"


@takes_custom_ops
def measure(model: onnx.ModelProto | str, calibration: str | Path | Iterable[dict]) -> dict[str, InputMoments]:
    """Per-channel moments of the data input of every Conv in `model`'s main graph, over the
    calibration inputs: a path (an .npz of arrays by input name, or onnx test-data folders, as
    `verify --inputs` takes) or feeds (dicts of arrays by input name). `custom_ops`: paths of
    onnxruntime custom-op libraries the sessions register."""
    try:
        graph_model = whole_model(model)  # our copy: each chunk's outputs are set on it
    except BnfoldError as exc:
        raise BnfoldError(f"--calibration: {exc}") from None
    session = load_session(graph_model, "calibration", DEFAULT_PROVIDERS)
    declared = input_declarations(session)
    unknown = next((v for v in declared if v.type not in ORT_TYPES), None)
    if unknown is not None:
        raise BnfoldError(f"input '{unknown.name}' has type {unknown.type}, which --calibration cannot read")
    specs = {v.name: (ORT_TYPES[v.type], v.shape) for v in declared}
    if isinstance(calibration, str | Path):
        feeds = load_input_sets(Path(calibration), specs)
    else:
        feeds = [check_feed(feed, specs, "calibration feed") for feed in calibration]
    if not feeds:
        raise BnfoldError("the calibration data holds no input set")
    for feed in feeds:
        for value in declared:
            _refuse_wrong_shape(value, np.shape(feed[value.name]))
    graph_inputs = {v.name for v in graph_model.graph.input}
    names = list(dict.fromkeys(n.input[0] for n in graph_model.graph.node if is_onnx_op(n, "Conv") and n.input))
    totals: dict[str, list] = {}
    for name in (n for n in names if n in graph_inputs):
        for feed in feeds:
            _add(totals, name, feed[name])
    inner = [n for n in names if n not in graph_inputs]
    for start in range(0, len(inner), CHUNK):
        chunk = inner[start : start + CHUNK]
        exposed = load_session(with_outputs(graph_model, chunk), "calibration", DEFAULT_PROVIDERS)
        for feed in feeds:
            for name, values in run_named(exposed, feed, "the model on the calibration inputs").items():
                _add(totals, name, values)
    return {name: _moments(*total) for name, total in totals.items()}


def _refuse_wrong_shape(value, shape: tuple[int, ...]) -> None:
    """A calibration array must have the input's rank and its fixed sizes: another channel
    count would measure statistics of another tensor, or none at all."""
    if value.shape is None:
        return
    fixed = [d if isinstance(d, int) and d >= 0 else None for d in value.shape]
    if len(shape) != len(fixed) or any(f is not None and f != d for f, d in zip(fixed, shape)):
        declared = "x".join("?" if f is None else str(f) for f in fixed) or "scalar"
        raise BnfoldError(
            f"--calibration: input '{value.name}' is {'x'.join(map(str, shape)) or 'scalar'} in the data; "
            f"the model takes {declared}"
        )


def _add(totals: dict, name: str, values: np.ndarray) -> None:
    """Accumulate count, Σx and Σx² per channel (axis 1) of one tensor, in float64."""
    values = np.asarray(values)
    if values.ndim < 2 or (values.dtype.kind != "f" and str(values.dtype) != "bfloat16"):
        return
    per_channel = np.moveaxis(values.astype(np.float64), 1, 0).reshape(values.shape[1], -1)
    count, total, squares = totals.get(name, (0, 0.0, 0.0))
    totals[name] = (
        count + per_channel.shape[1],
        total + per_channel.sum(axis=1),
        squares + (per_channel**2).sum(axis=1),
    )


def _moments(count: int, total: np.ndarray, squares: np.ndarray) -> InputMoments:
    mean = total / max(count, 1)
    return InputMoments(mean, np.maximum(squares / max(count, 1) - mean**2, 0.0), SOURCE)
