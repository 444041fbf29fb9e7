"""Proving that two models compute the same function: `verify` runs both in onnxruntime.

- `tolerance`: the policy that judges one output (pure numpy; no onnxruntime).
- `inputs`: which inputs to feed: generated from the models' signatures, or loaded from files.
- `runtime`: the onnxruntime adapter, the only module of bnfold that imports onnxruntime.
- `precision`: the arithmetic each tensor is computed in, read from the graph.
- `regions`: what the candidate rewrote, the probe that runs each rewrite in isolation, and the
  yardstick (the reference's rewritten parameters rounded the other way).
- `sites`: what is read off both graphs (the rewrite's sites, the discontinuities after them)
  and the yardsticks the rules measure against.
- `verdict`: the verdict as a declared table of rules, each reading a measurement.
- `localize`: the first tensor that differs, when the graphs cannot be compared node by node.
- `stored`, `golden`: inputs and outputs other tools saved (.npz, Polygraphy's JSON, onnx test
  data), and one model judged against stored outputs.
- `evidence`: what was run, saved in onnx's test-data layout.
- `report`: the verdict, as a table and as JSON.
- `verify`: the check itself, tying them together.
"""
