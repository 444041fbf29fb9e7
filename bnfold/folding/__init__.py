"""Folding per-channel affine maps into linear ops, and merging parallel branches.

A fold is *match → named checks → build*, then a rewrite through the graph index:

- `affine`: the algebra, pure numpy (no ONNX).
- `sources`: where a per-channel affine map y = s·x + t comes from (BatchNormalization in
  inference mode, Mul/Add/Sub/Div by a per-channel constant), read as a `ChannelAffine` or a
  `Skip` saying why not.
- `linear`: the linear ops that absorb one (Conv, ConvTranspose, Gemm, MatMul), described by
  their weight layout only.
- `checks`: the preconditions several plans share (one reader, no call-site attributes, the
  inference no-ops looked through).
- `plan`: what every plan is (`Plan`) and what every refusal is (`Skip`).
- one module per mechanism: `backward` (affine after the linear op), `shape_ops` (the same
  through shape-only ops between them), `forward` (a BN before it; before a padded Conv, its
  scale only), `concat` (a BN after a channel Concat, split per input), `channel_last` (a BN
  over the last axis of a token Linear, through shape-only ops), `reparam` (below).
- `correction`: what a 16-bit fold knows about a conv's input, for `--bias-correction`.
- `planner`: which mechanism is tried for a node, in which order, and how refusals combine.
- `reparam`: sums of parallel branches (Add/Sub/Sum trees) merged into one Conv.
- `walk`: the pass over a model's graphs, subgraphs and functions.
"""
