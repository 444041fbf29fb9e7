"""Inputs and outputs stored by other tools, read without pickles and without their packages.

- `.npz`: arrays by name. A file holding both a run's inputs and its outputs (bnfold's own
  `sample_models/*.npz`, what a training script saves) names them `in.NAME` and `out.NAME`.
- Polygraphy's JSON (`polygraphy run --save-inputs/--save-outputs`, `polygraphy.json`): inputs are
  a list of feeds, one per iteration; outputs are a `RunResults`, a list of (runner, iterations),
  each iteration's `outputs` mapping names to arrays. An array is an object with its `np.save`
  bytes in base64 under `array`, marked `"polygraphy_class": "ndarray"` (older files: a key
  `__polygraphy_encoded_ndarray`); a `LazyArray` (formerly `LazyNumpyArray`) wraps one under
  `values`.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np

from bnfold.errors import BnfoldError, MissingFile, first_line

INPUT_PREFIX, OUTPUT_PREFIX = "in.", "out."
MARKER, LEGACY_PREFIX = "polygraphy_class", "__polygraphy_encoded_"


def npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file, by name; pickles are refused."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise BnfoldError(f"{path}: not a readable .npz file ({first_line(exc)})") from None
    for name, value in arrays.items():
        if not isinstance(value, np.ndarray):  # a member that is not .npy comes back as its bytes
            raise BnfoldError(f"{path}: member '{name}' is not a .npy array")
    return arrays


def with_prefix(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray] | None:
    """The arrays named `prefix`NAME, by NAME; None when the file does not use the prefixes."""
    if not any(name.startswith((INPUT_PREFIX, OUTPUT_PREFIX)) for name in arrays):
        return None
    return {name.removeprefix(prefix): a for name, a in arrays.items() if name.startswith(prefix)}


def polygraphy_inputs(path: Path) -> list[dict[str, np.ndarray]]:
    """The feeds of a Polygraphy inputs file, one per iteration."""
    feeds = _read_json(path)
    if not isinstance(feeds, list) or not all(_is_feed(f) for f in feeds):
        raise BnfoldError(f"{path}: not Polygraphy inputs (a JSON list of feeds, one per iteration)")
    return feeds


def polygraphy_outputs(path: Path) -> tuple[str, list[dict[str, np.ndarray]]]:
    """The first runner of a Polygraphy RunResults file, and its outputs per iteration."""
    results = _read_json(path)
    runs = results.get("lst") if isinstance(results, dict) else None
    if not isinstance(runs, list) or not runs or not all(isinstance(r, list) and len(r) == 2 for r in runs):
        raise BnfoldError(f"{path}: not Polygraphy outputs (a RunResults of runners and their iterations)")
    runner, iterations = runs[0]
    outputs = [it.get("outputs") if isinstance(it, dict) else None for it in iterations]
    if not all(_is_feed(o) for o in outputs):
        raise BnfoldError(f"{path}: runner '{runner}' has an iteration without outputs")
    return str(runner), outputs


def _is_feed(value) -> bool:
    return isinstance(value, dict) and all(isinstance(a, np.ndarray) for a in value.values())


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_hook=_decode)
    except BnfoldError:
        raise
    except RecursionError:
        raise BnfoldError(f"{path}: not a readable JSON file (nested too deeply)") from None
    except (OSError, ValueError) as exc:
        raise BnfoldError(f"{path}: not a readable JSON file ({first_line(exc)})") from None


def _check_npy_size(data: bytes) -> None:
    """Refuse a .npy whose header claims more elements than its bytes hold, before numpy
    allocates them (a header can claim petabytes)."""
    if not data.startswith(b"\x93NUMPY"):
        return  # an .npz (zip), read by np.load with its own checks
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(stream)
    needed = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if dtype.hasobject or needed > len(data) - stream.tell():
        raise ValueError(f"its header claims shape {tuple(shape)} of {dtype}, more than its {len(data)} bytes")


def _decode(obj: dict):
    """A Polygraphy array (or lazy array) as numpy; any other object as it is."""
    kind = obj.get(MARKER) or next((k.removeprefix(LEGACY_PREFIX) for k in obj if k.startswith(LEGACY_PREFIX)), None)
    if kind == "ndarray" and isinstance(obj.get("array"), str):
        try:
            data = base64.b64decode(obj["array"].encode(), validate=True)
            _check_npy_size(data)
            value = np.load(io.BytesIO(data), allow_pickle=False)
            if not isinstance(value, np.ndarray):  # an old file's .npz: its one array
                value = next((v for v in (value[k] for k in value.files) if isinstance(v, np.ndarray)), None)
        except Exception as exc:  # numpy's header parser raises what its tokenizer does, too
            raise BnfoldError(f"an array in Polygraphy's format that numpy cannot read ({first_line(exc)})") from None
        if value is None:
            raise BnfoldError("an array in Polygraphy's format that holds no array")
        return value
    if kind in ("LazyArray", "LazyNumpyArray"):  # today's name, and older Polygraphy's
        return obj.get("values")
    return obj


def load_outputs(
    path: Path, output_names: list[str] = ()
) -> tuple[str, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]] | None]:
    """Stored outputs, one set per trial: (where they came from, the sets, the inputs stored
    with them or None). An .npz names them `out.NAME` (and may hold `in.NAME`); a .json is
    Polygraphy's RunResults (its first runner); a folder is onnx test data (`output_K.pb`
    beside `input_K.pb`, in one folder or in `test_data_set_N` folders), where an unnamed
    `output_K.pb` is the model's output K (`output_names`), as onnx's own test runner pairs them."""
    if path.is_dir():
        folders = sorted((p for p in path.glob("test_data_set_*") if p.is_dir()), key=test_data_position) or [path]
        return str(path), [_test_data_outputs(folder, output_names) for folder in folders], None
    if not path.is_file():
        raise MissingFile(f"{path}: no such file or folder of stored outputs")
    if path.suffix.lower() == ".json":
        runner, outputs = polygraphy_outputs(path)
        return f"{path} (Polygraphy runner '{runner}')", outputs, None
    arrays = npz_arrays(path)
    outputs = with_prefix(arrays, OUTPUT_PREFIX)
    if not outputs:
        raise BnfoldError(f"{path}: no stored outputs: an .npz names them out.NAME (and their inputs in.NAME)")
    inputs = with_prefix(arrays, INPUT_PREFIX)
    return str(path), [outputs], [inputs] if inputs else None


def read_tensor_file(file: Path) -> tuple[str, np.ndarray]:
    """The name and values of one onnx test-data file (`input_K.pb`, `output_K.pb`)."""
    import onnx
    from onnx import numpy_helper

    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(file.read_bytes())
    except Exception as exc:
        raise BnfoldError(f"{file}: not a TensorProto ({first_line(exc)})") from None
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
        # onnx would resolve its location against the working directory: any file there, read
        # and copied on by --save-inputs
        raise BnfoldError(f"{file}: its data is declared external; test data must hold its values itself")
    try:
        return tensor.name, numpy_helper.to_array(tensor)
    except Exception as exc:
        raise BnfoldError(f"{file}: not a TensorProto ({first_line(exc)})") from None


def test_data_position(file: Path) -> int:
    """K of `input_K.pb`, `output_K.pb` or `test_data_set_K` (numbers, not text: 2 before 10)."""
    number = file.name.split(".")[0].rsplit("_", 1)[-1]
    return int(number) if number.isdigit() else 0


def _test_data_outputs(folder: Path, output_names: list[str]) -> dict[str, np.ndarray]:
    outputs = {}
    for file in sorted(folder.glob("output_*.pb"), key=test_data_position):
        name, value = read_tensor_file(file)
        if not name:
            k = test_data_position(file)
            if k >= len(output_names):
                raise BnfoldError(f"{file}: the tensor has no name, and the model has no output {k} to pair it with")
            name = output_names[k]
        outputs[name] = value
    if not outputs:
        raise BnfoldError(f"{folder}: no output_*.pb files")
    return outputs
