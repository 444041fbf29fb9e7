"""Saving what a verification ran, so that a failure can be replayed (`--inputs DIR`) and
attached to a bug report: onnx's test-data layout, `DIR/test_data_set_N/input_K.pb` (and
`output_K.pb`), each a TensorProto named after its input or output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import numpy_helper

from bnfold.errors import BnfoldError


def check_folder(folder: Path) -> Path:
    """`folder`, refused if it already holds anything (bnfold never writes over files it did not
    create); created only when there is something to save (claim_folder), so a run that fails
    leaves no empty folder behind."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise BnfoldError(f"{folder}: exists and is not an empty folder; choose a new one to save into")
    return folder


def claim_folder(folder: Path) -> Path:
    """check_folder, then the folder created."""
    check_folder(folder).mkdir(parents=True, exist_ok=True)
    return folder


def save_trials(folder: Path, trials: list[dict], kind: str) -> None:
    """One `test_data_set_N` per trial, one `{kind}_K.pb` per tensor (K in the given order);
    sequences and other non-tensor values are left out."""
    for number, values in enumerate(trials):
        trial = folder / f"test_data_set_{number}"
        trial.mkdir(exist_ok=True)
        position = 0
        for name, value in values.items():
            if not isinstance(value, np.ndarray):
                continue
            tensor = numpy_helper.from_array(value, name)
            (trial / f"{kind}_{position}.pb").write_bytes(tensor.SerializeToString())
            position += 1
