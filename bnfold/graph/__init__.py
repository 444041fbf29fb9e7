"""The graph being folded, one job per module:

- `protos`: reading ONNX nodes and graphs (labels, subgraphs, attributes, names).
- `index`: who produces and who reads each tensor; every edit goes through it, and it records
  the names that lost their last reader or producer, which `sweep` then removes if dead.
- `constants`: the values known before run time (initializers, Constant nodes, pure ops).
- `shapes`: declared and inferred shapes.
- `tensors`: the data of the tensors a fold creates, kept as arrays until they are written, and
  fresh names for them.
- `context`: the above for one graph, bundled, as folding rules receive it.
"""
