"""Model files in and out. Only this package knows where a tensor's bytes lie.

- `wire`: the protobuf wire format, as far as bnfold reads and writes it itself.
- `tensors`: tensor data: its size from dims and type, reading values, copying byte spans.
- `containment`: which external-data locations a model may name (inside its own folder).
- `source`: a model file opened for folding (`ModelSource`): its structure as a ModelProto whose
  large initializers are data-less stubs, their values on demand (`read`), and where their
  bytes lie for copying (`span`); and `load_model` for a model loaded whole.
- `output`: where the folded model goes, the streamed writer, the checker's skeleton, and the
  staged, atomic commit.
- `view`: one view of a model for verification: its skeleton with the large weights apart (as
  arrays onnxruntime takes as they are), its inferred types, copies with other outputs.
"""
