"""What both models are fed: inputs generated from the reference's signature, or loaded from
.npz files and onnx test-data folders. Pure numpy and onnx; the signature comes from the
runtime (`runtime.input_declarations`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import BnfoldError
from bnfold.verification import stored

DEFAULT_TRIALS = 3
DEFAULT_INT_RANGE = (0, 10)
SYMBOLIC_BATCH = (1, 2)  # a symbolic first dimension (the batch), by trial: a rewrite that only works
# at batch 1 shows at batch 2
SYMBOLIC_OTHER = 16  # any other symbolic dimension, unless the model does not run at that size
# Sizes tried in order for the other symbolic dimensions until onnxruntime runs the reference:
# detectors want multiples of 32, audio front ends enough samples for their reflect padding.
SYMBOLIC_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# …and, as the third trial's size, one that is no power of two, where the model runs at it: odd
# (a stride-2 SAME padding written as fixed pads is right at even sizes only), else three times
# the first size (96 for a detector that wants multiples of 32: odd sizes after five halvings).
UNEVEN = (lambda size: size + 1, lambda size: 3 * size)
COMPARISONS = ("Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual")
PASS_THROUGH = ("Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten")
MAX_INPUT_BYTES = 1 << 30  # all inputs of one trial together; more is refused rather than allocated

# onnxruntime's input type strings → numpy dtypes bnfold can generate
ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(bfloat16)": "bfloat16",
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class InputSpec:
    """A model input as declared: its name, onnxruntime type string and shape (None: unknown;
    a dimension may be a symbol or None)."""

    name: str
    type: str
    shape: list | None


@dataclass
class Choice:
    """How generated inputs were chosen: the sizes of the non-batch symbolic dimensions by
    trial (alternating), the sizes onnxruntime refused, integer inputs' values by input."""

    sizes: tuple[int, ...] = (SYMBOLIC_OTHER,)
    refused: tuple[int, ...] = ()
    controls: dict[str, list[int]] | None = None
    state_batch: bool = False  # the batch is the first symbolic axis of an input whose axis 0 is fixed
    batches: tuple[int, ...] = SYMBOLIC_BATCH  # the symbolic batch's sizes, by trial
    batch_error: str = ""  # why not batch 2, when the reference runs at batch 1 only (verify sets it)


def choose_feeds(
    declared, trials, seed, shapes, int_range, model, runs, batches=SYMBOLIC_BATCH
) -> tuple[list[dict], Choice]:
    """`trials` generated feeds onnxruntime can run. Non-batch symbolic dimensions take the first
    of SYMBOLIC_SIZES at which `runs(feed)` (None, or onnxruntime's error) succeeds, the next
    one too when it runs, and an uneven size (UNEVEN) when it runs, alternating by trial;
    integer inputs the graph compares with constants take those constants (with the default
    int range). `batches`: the symbolic batch's sizes by trial (verify asks again with (1,)
    when the reference refuses batch 2)."""
    controls = control_values(model, declared) if model is not None and int_range == DEFAULT_INT_RANGE else {}
    choice = Choice(controls=controls, batches=batches)
    free = any(_symbolic(v, a) and a > 0 for v in declared if v.name not in shapes for a in range(len(v.shape or [])))

    def feed(trial: int, size: int) -> dict:
        specs = input_specs(declared, shapes, trial, size, choice.state_batch, choice.batches)
        generated = generate_inputs(specs, np.random.default_rng([seed, trial]), int_range)
        for name, values in controls.items():
            generated[name] = np.full_like(generated[name], values[trial % len(values)])
        return generated

    if free:
        working, refused, first_error = _search_sizes(choice, feed, runs)
        if len(working) == 2 and trials > 2:
            working.append(_uneven_size(working[0], lambda size: runs(feed(2, size))))
            working = [size for size in working if size]
        if not working:
            raise BnfoldError(
                f"onnxruntime could not run the reference at any size tried for its symbolic dimensions "
                f"({', '.join(map(str, SYMBOLIC_SIZES))}): {first_error}; pass --input-shape NAME:DIMS or --inputs"
            )
        choice.sizes, choice.refused = tuple(working), refused
    return [feed(t, choice.sizes[t % len(choice.sizes)]) for t in range(trials)], choice


def _search_sizes(choice: Choice, feed, runs) -> tuple[list[int], tuple[int, ...], str]:
    """The first size of SYMBOLIC_SIZES the reference runs at and the next one if it runs too,
    the sizes refused before them, and the first refusal; tried again with a recurrent state's
    first free axis as the batch (choice.state_batch) when no size runs."""
    first_error = ""
    for choice.state_batch in (False, True):
        working, refused = [], ()
        for size in SYMBOLIC_SIZES:
            error = runs(feed(len(working), size))
            if error is None:
                working.append(size)
                if len(working) == 2:
                    break
            elif working:
                break
            else:
                refused += (size,)
                first_error = first_error or error
        if working:
            return working, refused, first_error
    return [], refused, first_error


def _uneven_size(first: int, runs) -> int | None:
    """The first of UNEVEN's sizes for `first` at which `runs(size)` succeeds (None when none does)."""
    for make in UNEVEN:
        if runs(make(first)) is None:
            return make(first)
    return None


def control_values(model: onnx.ModelProto, declared: list[InputSpec]) -> dict[str, list[int]]:
    """Integer inputs the graph compares with constants (a sample rate tested against 8000 and
    16000), with those constants, in the order the graph has them."""
    from bnfold.graph.protos import all_nodes

    wanted = {v.name for v in declared if v.type.startswith("tensor(int") or v.type.startswith("tensor(uint")}
    if not wanted:
        return {}
    nodes = list(all_nodes(model.graph))
    constants = {t.name: t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL}
    for node in nodes:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = value
    alias = {
        node.output[0]: node.input[0] for node in nodes if node.op_type in PASS_THROUGH and node.input and node.output
    }

    def root(name: str) -> str:
        for _ in range(len(alias) + 1):
            if name not in alias:
                break
            name = alias[name]
        return name

    found: dict[str, list[int]] = {}
    for node in nodes:
        if node.op_type not in COMPARISONS or len(node.input) != 2:
            continue
        for mine, other in (node.input, node.input[::-1]):
            source, constant = root(mine), constants.get(root(other)) or constants.get(other)
            if source in wanted and constant is not None:
                values = numpy_helper.to_array(constant)
                if values.size == 1 and values.dtype.kind in "iuf" and float(values) == int(values):
                    found.setdefault(source, [])
                    if int(values) not in found[source]:
                        found[source].append(int(values))
    return found


def input_specs(
    declared: list[InputSpec],
    shapes: dict[str, Sequence[int]],
    trial: int = 0,
    other: int = SYMBOLIC_OTHER,
    state_batch: bool = False,
    batches: tuple[int, ...] = SYMBOLIC_BATCH,
) -> dict:
    """name → (dtype, concrete shape) for every input, for trial number `trial`: a symbolic
    first dimension alternates between the SYMBOLIC_BATCH sizes, any other is `other`. With
    `state_batch`, an input whose first dimension is fixed takes its first symbolic one as the
    batch (a recurrent state of shape [layers, batch, hidden])."""
    unknown = set(shapes) - {value.name for value in declared}
    if unknown:
        raise BnfoldError(f"--input-shape names no input of the model: {', '.join(sorted(unknown))}")
    specs, symbols, total = {}, {}, 0
    for value in declared:
        dtype = ORT_TYPES.get(value.type)
        if dtype is None:
            raise BnfoldError(
                f"input '{value.name}' has type {value.type}, which bnfold cannot generate; pass --inputs"
            )
        if value.name in shapes:
            shape = list(shapes[value.name])
            if value.shape is not None and len(shape) != len(value.shape):
                raise BnfoldError(
                    f"--input-shape {value.name}: rank {len(shape)}, the model declares rank {len(value.shape)}"
                )
        elif value.shape is None:
            raise BnfoldError(f"input '{value.name}' declares no shape; pass --input-shape {value.name}:DIMS")
        else:
            shape = []
            free = [a for a in range(len(value.shape)) if _symbolic(value, a)]
            batch_axis = free[0] if state_batch and free else 0
            for axis, dim in enumerate(value.shape):
                if isinstance(dim, int) and dim >= 0:
                    shape.append(dim)
                    continue
                default = batches[trial % len(batches)] if axis == batch_axis else other
                shape.append(symbols.setdefault(dim, default) if dim else default)  # one symbol, one size
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        largest = [max(d, *SYMBOLIC_BATCH) if a == 0 and _symbolic(value, a) else d for a, d in enumerate(shape)]
        total += itemsize * float(np.prod(largest, dtype=np.float64))
        if total > MAX_INPUT_BYTES:
            raise BnfoldError(
                f"input '{value.name}' of shape {shape}: one trial's inputs together need more than "
                f"{MAX_INPUT_BYTES >> 30} GiB; pass a smaller --input-shape"
            )
        specs[value.name] = (dtype, tuple(shape))
    return specs


def _symbolic(value: InputSpec, axis: int) -> bool:
    return value.shape is not None and not (isinstance(value.shape[axis], int) and value.shape[axis] >= 0)


def shape_notes(
    declared: list[InputSpec], feeds: list[dict], shapes: dict[str, Sequence[int]], choice: Choice | None = None
) -> list[str]:
    """What each symbolic dimension was in the trials actually run, and why."""
    notes = []
    if choice is not None and choice.refused:
        refused = ", ".join(map(str, choice.refused))
        notes.append(f"note: onnxruntime does not run the reference with symbolic dimensions at {refused}")
    if choice is not None and choice.batch_error:
        notes.append(f"note: onnxruntime does not run the reference at batch 2 ({choice.batch_error}): "
                     "every trial is at batch 1; give --inputs to verify other batches")  # fmt: skip
    for name, values in (choice.controls if choice is not None else None or {}).items():
        shown = ", ".join(map(str, values))
        notes.append(f"note: input '{name}' takes {shown}: the values the graph compares it with")
    for value in declared:
        if value.name in shapes or value.shape is None:
            continue
        for axis, dim in enumerate(value.shape):
            if _symbolic(value, axis):
                sizes = sorted({int(np.shape(feed[value.name])[axis]) for feed in feeds if value.name in feed})
                *others, last = map(str, sizes)
                used = f"{', '.join(others)} and {last}" if others else last
                notes.append(f"note: input '{value.name}' axis {axis} is {dim or 'unknown'!s}: used {used}")
    return notes


def generate_inputs(specs: dict, rng: np.random.Generator, int_range: tuple[int, int]) -> dict:
    """Standard normal floats (not zeros: they would hide a dropped scale), integers uniform in
    int_range (token ids, indices), random booleans. Generated in their own width (float32 and
    float64 directly, 16-bit floats through float32, booleans through bytes), so a trial never
    holds more than its inputs and one input's float32 copy."""
    feed = {}
    for name, (dtype, shape) in specs.items():
        if dtype == "bfloat16":
            feed[name] = rng.standard_normal(shape, dtype=np.float32).astype(ml_dtypes.bfloat16)
        elif np.dtype(dtype).kind == "f":
            wide = np.float64 if np.dtype(dtype) == np.float64 else np.float32
            feed[name] = rng.standard_normal(shape, dtype=wide).astype(dtype, copy=False)
        elif np.dtype(dtype).kind == "b":
            feed[name] = rng.integers(0, 2, shape, dtype=np.uint8).view(np.bool_)
        else:
            info = np.iinfo(dtype)
            low, high = max(int_range[0], info.min), min(int_range[1], info.max + 1)
            feed[name] = rng.integers(low, high, shape, dtype=dtype)
    return feed


def describe_inputs(declared: list[InputSpec], feeds: list[dict]) -> list[dict]:
    """The generated inputs of the first trial, for the report."""
    return [
        {"name": v.name, "dtype": str(feeds[0][v.name].dtype), "shape": list(np.shape(feeds[0][v.name])),
         "source": "generated"}
        for v in declared
    ]  # fmt: skip


def load_input_sets(path: Path, specs: dict) -> list[dict]:
    """Input sets from an .npz (arrays by input name, or `in.NAME` beside `out.NAME`), Polygraphy's
    saved inputs (.json, one set per iteration), or an onnx test-data folder: a folder of
    `input_K.pb` files, or a model folder of `test_data_set_N` folders (bnfold.verification.stored).
    Pickles are refused."""
    if path.is_dir():
        sets = sorted((p for p in path.glob("test_data_set_*") if p.is_dir()), key=stored.test_data_position) or [path]
        return [_load_test_data_set(folder, specs) for folder in sets]
    if not path.is_file():
        raise BnfoldError(f"{path}: no such input file or folder")
    if path.suffix.lower() == ".json":
        return [check_feed(feed, specs, path) for feed in stored.polygraphy_inputs(path)]
    arrays = stored.npz_arrays(path)
    inputs = stored.with_prefix(arrays, stored.INPUT_PREFIX)
    return [check_feed(arrays if inputs is None else inputs, specs, path)]


def _load_test_data_set(folder: Path, specs: dict) -> dict:
    files = sorted(folder.glob("input_*.pb"), key=stored.test_data_position)
    if not files:
        raise BnfoldError(f"{folder}: no input_*.pb files")
    arrays = {}
    for index, file in enumerate(files):
        name, value = stored.read_tensor_file(file)
        arrays[name or (list(specs)[index] if index < len(specs) else f"input_{index}")] = value
    return check_feed(arrays, specs, folder)


def check_comparable(feeds: list[dict], source: str) -> list[dict]:
    """Given input sets that can show a difference: at least one, and no float input without a
    finite value (a model fed only NaN gives NaN wherever it computes, and NaN agrees with NaN)."""
    if not feeds:
        raise BnfoldError(f"{source}: holds no input set, so there is nothing to compare")
    for number, feed in enumerate(feeds):
        for name, array in feed.items():
            array = np.asarray(array)
            if array.dtype.kind == "f" or array.dtype == ml_dtypes.bfloat16:
                values = array.astype(np.float32) if array.dtype == ml_dtypes.bfloat16 else array
                if array.size and not np.isfinite(values).any():
                    raise BnfoldError(
                        f"{source}: input '{name}' of set {number} holds no finite value, so it can show no difference"
                    )
    return feeds


def check_feed(arrays: dict, specs: dict, source: Path | str) -> dict:
    """One trial's arrays, checked against the model's inputs (bfloat16 converted)."""
    missing = [n for n in specs if n not in arrays]
    if missing:
        found = ", ".join(f"'{k}'" for k in arrays) or "none"
        wanted = ", ".join(f"'{n}'" for n in specs)
        raise BnfoldError(f"{source}: no array for input '{missing[0]}' (found {found}; the model takes {wanted})")
    feed = {}
    for name, (dtype, _) in specs.items():
        array = np.asarray(arrays[name])
        if dtype == "bfloat16":
            array = array.astype(np.float32).astype(ml_dtypes.bfloat16)
        elif array.dtype != np.dtype(dtype):
            raise BnfoldError(f"{source}: input '{name}' is {array.dtype}, the model takes {np.dtype(dtype)}")
        feed[name] = array
    return feed
