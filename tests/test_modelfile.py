"""Model files: where output goes, and that writing is all-or-nothing."""

from __future__ import annotations

import os
import stat

import pytest

import onnx

from bnfold.errors import BnfoldError
from bnfold.modelfile import StagedModel, output_path
from builders import conv_bn_model


def write(dest, *, external: bool = False):
    with StagedModel(conv_bn_model(), dest, external=external) as staged:
        staged.commit()
    return staged


def test_default_output_is_beside_the_input(tmp_path):
    assert output_path(tmp_path / "net.onnx", None) == tmp_path / "net.folded.onnx"
    assert output_path(tmp_path / "net", None) == tmp_path / "net.folded.onnx"


def test_output_into_an_existing_folder(tmp_path):
    (tmp_path / "out").mkdir()
    assert output_path(tmp_path / "net.onnx", tmp_path / "out") == tmp_path / "out" / "net.folded.onnx"


def test_output_may_not_be_the_input_even_through_a_link(tmp_path):
    model = tmp_path / "net.onnx"
    model.write_bytes(b"model")
    (tmp_path / "alias.onnx").symlink_to(model)
    for target in (model, tmp_path / "alias.onnx", tmp_path / "." / "net.onnx"):
        with pytest.raises(BnfoldError, match="refusing to overwrite the input"):
            output_path(model, target)


def test_write_replaces_the_destination_with_usual_permissions(tmp_path):
    dest = tmp_path / "m.onnx"
    dest.write_bytes(b"old")
    write(dest)
    assert onnx.load(str(dest)) == conv_bn_model()
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    # Renaming a file over a directory fails after the temporary file was written.
    dest = tmp_path / "occupied"
    dest.mkdir()
    (dest / "keep").write_bytes(b"x")
    with pytest.raises(BnfoldError, match="cannot write"):
        write(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]
    assert [p.name for p in dest.iterdir()] == ["keep"]
