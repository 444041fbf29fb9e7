"""Proving that two models compute the same function: `verify` runs both in onnxruntime.

- `tolerance`: the policy that judges one output (pure numpy; no onnxruntime).
- `inputs`: which inputs to feed: generated from the models' signatures, or loaded from files.
- `runtime`: the onnxruntime adapter, the only module of bnfold that imports onnxruntime.
- `noise`: a second look at a failing output against the model's own float32 noise.
- `report`: the verdict, as a table and as JSON.
- `verify`: the check itself, tying them together.
"""
