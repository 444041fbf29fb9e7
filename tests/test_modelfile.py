"""Model files: where output goes, and that writing is all-or-nothing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import conv_bn_model
from onnx import numpy_helper

from bnfold import fold, optimize
from bnfold.errors import BnfoldError
from bnfold.io.output import StagedModel, output_path
from bnfold.io.source import load_model, parse


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


# ---- the streamed write: what optimize() writes is exactly what fold() returns ------------------
SAMPLES = sorted((Path(__file__).resolve().parents[1] / "sample_models").glob("*.onnx"))


def with_external_data_loaded(path: Path) -> onnx.ModelProto:
    return inlined(onnx.load(str(path)))  # loads and inlines external data


def inlined(model: onnx.ModelProto) -> onnx.ModelProto:
    for tensor in model.graph.initializer:
        assert tensor.data_location == onnx.TensorProto.DEFAULT
        tensor.ClearField("data_location")  # onnx.load sets it when it inlines external data
    return model


@pytest.mark.parametrize("external", ["never", "always"])
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_streamed_output_is_the_folded_model(sample, external, tmp_path):
    written = optimize(sample, tmp_path / "out.onnx", verify=False, external_data=external)
    assert written.written
    expected = fold(sample).model
    assert with_external_data_loaded(tmp_path / "out.onnx") == expected


def test_external_input_tensors_are_copied_file_to_file(tmp_path):
    model = conv_bn_model(cin=64, cout=64)  # a 147 kB weight
    untouched = numpy_helper.from_array(np.arange(4096, dtype=np.float32), "unused")  # not folded, kept
    model.graph.initializer.append(untouched)
    onnx.save(model, str(tmp_path / "in.onnx"), save_as_external_data=True, location="in.data", size_threshold=0)
    optimize(tmp_path / "in.onnx", tmp_path / "out.onnx", verify=False)
    assert with_external_data_loaded(tmp_path / "out.onnx") == inlined(fold(tmp_path / "in.onnx").model)
    out = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    stored = {t.name: {e.key: e.value for e in t.external_data} for t in out.graph.initializer}
    assert set(stored) == {"W_bnfold", "B_bnfold", "unused"}
    assert stored["B_bnfold"] == {}  # 256 bytes: below the 1 kB threshold, stays in the model file
    data = (tmp_path / stored["unused"]["location"]).read_bytes()
    start = int(stored["unused"]["offset"])
    assert data[start : start + 16384] == untouched.raw_data


def test_every_tensor_in_a_data_file_starts_at_a_page_boundary(tmp_path):
    # Aligned tensors can be memory-mapped; the first one always starts at 0, so look at all.
    model = conv_bn_model(cin=64, cout=64)
    for k, size in enumerate((300, 1000, 5000)):  # sizes that leave the next offset unaligned
        model.graph.initializer.append(numpy_helper.from_array(np.ones(size, np.float32), f"kept_{k}"))
    onnx.save(model, str(tmp_path / "in.onnx"))
    optimize(tmp_path / "in.onnx", tmp_path / "out.onnx", verify=False, external_data="always")
    out = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    offsets = [int(e.value) for t in out.graph.initializer for e in t.external_data if e.key == "offset"]
    assert len(offsets) == 4 and all(offset % 4096 == 0 for offset in offsets), offsets


def test_the_checker_skeleton_keeps_small_tensors_whole_and_stubs_large_ones(tmp_path):
    # Small tensors (Reshape targets, axes, biases) must keep their values for shape inference.
    from bnfold.io.source import ModelSource
    from bnfold.io.writer import EXTERNAL_THRESHOLD, write_skeleton

    model = conv_bn_model(cin=64, cout=64)
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, -1], np.int64), "target"))
    onnx.save(model, str(tmp_path / "in.onnx"))
    source = ModelSource.open(tmp_path / "in.onnx")
    skeleton = onnx.load(str(write_skeleton(source.model, {}, source, tmp_path)), load_external_data=False)
    originals = {t.name: t for t in model.graph.initializer}
    for tensor in skeleton.graph.initializer:
        original = originals[tensor.name]
        if len(original.raw_data) >= EXTERNAL_THRESHOLD:
            assert tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.raw_data
        else:
            assert tensor.data_location != onnx.TensorProto.EXTERNAL
            assert np.array_equal(numpy_helper.to_array(tensor), numpy_helper.to_array(original)), tensor.name
    assert {t.name for t in skeleton.graph.initializer} == set(originals)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in skeleton.graph.initializer)


def test_a_tensor_stored_in_typed_fields_is_written_inline_and_as_external_data(tmp_path):
    model = conv_bn_model()
    weight = next(t for t in model.graph.initializer if len(t.dims) == 4)
    values = numpy_helper.to_array(weight)
    weight.ClearField("raw_data")
    weight.float_data.extend(values.ravel().tolist())  # the old way of storing values
    onnx.save(model, str(tmp_path / "typed.onnx"))
    for external in ("never", "always"):
        out = tmp_path / f"typed_{external}.onnx"
        optimize(tmp_path / "typed.onnx", out, verify=False, external_data=external)
        assert numpy_helper.to_array(with_external_data_loaded(out).graph.initializer[0]).size  # loads


def test_a_tensor_with_too_little_data_is_refused(tmp_path):
    model = conv_bn_model()
    gamma = next(t for t in model.graph.initializer if "gamma" in t.name or t.name.endswith("scale"))
    gamma.raw_data = gamma.raw_data[:-4]  # one float short of its dims
    path = tmp_path / "short.onnx"
    onnx.save(model, str(path))
    with pytest.raises(BnfoldError):
        optimize(path, tmp_path / "out.onnx", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.onnx"]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_the_light_parse_gives_the_model_onnx_load_gives(sample):
    # parse leaves large raw data in the file; loading it back must give exactly onnx.load's model.
    _, left_in_file = parse(sample)
    assert left_in_file or sample.stat().st_size < 100_000  # the larger samples have tensors left in the file
    assert load_model(sample) == onnx.load(str(sample))


def test_a_hard_linked_model_file_folds(tmp_path):
    # Its own tensors are read from the model file: that is no external data to refuse.
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(cin=64, cout=64), str(path))
    os.link(path, tmp_path / "alias.onnx")
    result = optimize(path, tmp_path / "out.onnx", verify=False)
    assert result.written and result.report.folded == 1


@pytest.mark.parametrize("damage", ["truncated", "bad length"])
def test_a_damaged_file_is_one_clear_error(tmp_path, damage):
    data = bytearray(onnx.load(str(SAMPLES[0])).SerializeToString())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[1] = 0xFF  # the first field's length now runs past the end
    path = tmp_path / "damaged.onnx"
    path.write_bytes(bytes(data))
    with pytest.raises(BnfoldError, match="damaged.onnx: not"):
        load_model(path)


def test_a_model_file_whose_name_is_not_utf8_still_folds(tmp_path):
    # Its tensors cannot be referenced by that name inside the model: it is parsed the usual way.
    path = tmp_path / b"m\xff.onnx".decode("utf-8", "surrogateescape")
    onnx.save(conv_bn_model(cin=64, cout=64), os.fsencode(path))
    result = optimize(path, tmp_path / "out.onnx", verify=False)
    assert result.written and result.report.folded == 1
