"""Checking a fold the way bnfold's tests do, for a pipeline that wants its own numbers:

- `random_inputs`, `run`: inputs for a model, and one onnxruntime run with optimizations off
  (at its default level onnxruntime folds Conv+BN itself);
- `widen_floats`: a float16/bfloat16 (or float32) model widened exactly, as a reference;
- `IR_VERSION`: the IR version every onnxruntime bnfold allows loads.

The model builders the tests and benchmarks share are in tests/builders.py.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from bnfold.verification.precision import widen_floats  # noqa: F401 (part of this module's kit)

# onnx >= 1.22 writes IR version 13 by default, which onnxruntime loads from 1.24 on (and 1.24 has
# no Python 3.10 build); models built here say 10, which every onnxruntime bnfold allows loads.
IR_VERSION = 10


def random_inputs(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    """Inputs for every non-initializer graph input with a static shape."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = [d.dim_value for d in tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        feeds[value.name] = rng.normal(0.3, 1.5, shape).astype(dtype)
    return feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run `model` once in onnxruntime with graph optimizations disabled (at its default level
    onnxruntime folds Conv+BN itself, and a comparison would measure that fold instead)."""
    from bnfold.verification.runtime import make_session

    return make_session(model).run(None, feeds)
