"""Folding per-channel affine maps into linear ops, and merging parallel branches.

Every mechanism follows one protocol (`plan`): *match → named checks → plan*, answering a
`Plan` (computed before the graph is touched), a `Skip` (why the node stays) or `NOT_MINE`;
`planner` declares, per kind of node, the mechanisms in order and how their refusals combine.

- `affine`: the algebra, pure numpy (no ONNX).
- `sources`: where a per-channel affine map y = s·x + t comes from (BatchNormalization in
  inference mode, Mul/Add/Sub/Div by a per-channel constant), read as a `ChannelAffine` or a
  `Skip` saying why not.
- `linear`: the linear ops that absorb one (Conv, ConvTranspose, Gemm, MatMul): weight layout,
  geometry (pads with auto_pad resolved), both sides of their algebra, how they are cast.
- `linear_plan`: the plan of a fold into one linear op, and the edits that apply it.
- `checks`: the preconditions several plans share (one reader, no call-site attributes, the
  inference no-ops looked through).
- one module per mechanism: `backward` (affine after the linear op), `shape_ops` (the same
  through shape-only ops between them; the table of shape ops), `forward` (a BN before it;
  before a padded Conv, its scale only), `concat` (a BN after a channel Concat, split per
  input), `channel_last` (a BN over the last axis of a token Linear, through shape-only ops),
  `reparam` (sums of parallel branches merged into one Conv; `branches` is their algebra).
- `correction`: what a 16-bit fold knows about a conv's input, for bias correction.
- `planner`: the tables; `walk`: the pass over a model's graphs, subgraphs and functions, to a
  fixed point.
"""
