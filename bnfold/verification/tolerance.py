"""The tolerance policy: when does a candidate's output count as the reference's? Pure numpy.

An output element passes when

    |candidate − reference| ≤ atol · S + rtol · |reference|,

where S is the largest finite |reference| of that output in that trial (1 if the output is all
zero). Errors are judged against the output's own magnitude, so logits in the thousands and
probabilities below one are judged alike. Defaults, per output dtype, measured on the sample
models (BENCHMARKS.md): correct float32 folds drift ≤ 5e-7 · S, the mildest seeded folding
mistake (one channel's bias 3% off) ≥ 2.9e-4 · S, so atol = 5e-5 sits 100× above the one and 6×
below the other. float16 and bfloat16 keep 11 and 8 significant bits; integer and bool outputs
must match exactly. NaN and ±Inf must sit at the same positions in both.

When the two disagree, the model's own noise wins, up to a cap. An output that fails the policy
gets a second look (`bnfold.verification.noise`): a difference within NOISE_FACTOR times how far
onnxruntime's own float32 rewrites move the reference passes, because on that model a fold cannot
be told from float32 noise any closer. The relaxed bound min(NOISE_FACTOR · noise, NOISE_CAP · atol)
can reach 1e-3 · S for float32, past the mildest seeded mistake above, so on a noisy model such a
mild mistake may pass; the cap keeps every other measured mistake failing (ε 1e-3 for 1e-5 moves
outputs ≥ 5e-3 · S; a dropped β or a wrong axis far more), and a model noisier than the cap fails
with that reason. An explicit atol is taken literally: no second look.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    atol: float  # a fraction of the output's largest magnitude
    rtol: float  # a fraction of each element's own magnitude


DEFAULT_TOLERANCE = {
    "float64": Tolerance(1e-10, 0.0),
    "float32": Tolerance(5e-5, 0.0),
    "float16": Tolerance(1e-2, 0.0),
    "bfloat16": Tolerance(8e-2, 0.0),
}
EXACT = Tolerance(0.0, 0.0)
NOISE_FACTOR = 4.0  # a failing output passes within this many times the model's own noise
NOISE_CAP = 20.0  # …but never beyond this many times the policy's atol


@dataclass
class OutputComparison:
    """One output over all trials; the error figures are the worst trial's."""

    name: str
    dtype: str
    shape: list
    passed: bool = True
    reason: str = ""  # why it failed, when it failed for something other than numbers
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    rel_l2_error: float = 0.0
    cosine_similarity: float = 1.0
    mismatched: int = 0
    elements: int = 0
    scale: float = 0.0  # S: the largest finite |reference| in the worst trial
    needed_atol: float = 0.0  # the smallest atol (with this rtol) that would have passed
    atol: float = 0.0
    rtol: float = 0.0
    noise: float | None = None  # this model's own float32 noise (as an atol), when measured


def compare(
    name: str, want: np.ndarray, got: np.ndarray, atol: float | None = None, rtol: float | None = None
) -> OutputComparison:
    """Compare one output of one trial under the tolerance policy."""
    result = OutputComparison(name, str(want.dtype), list(want.shape), elements=int(want.size))
    if got.shape != want.shape or got.dtype != want.dtype:
        result.passed = False
        result.reason = f"candidate gives {got.dtype} {list(got.shape)}"
        return result
    default = DEFAULT_TOLERANCE.get(str(want.dtype), EXACT)
    tolerance = Tolerance(default.atol if atol is None else atol, default.rtol if rtol is None else rtol)
    result.atol, result.rtol = tolerance.atol, tolerance.rtol
    if want.dtype.kind not in "fc":
        result.mismatched = int((want != got).sum())
        result.passed = result.mismatched == 0
        result.max_abs_error = float(np.abs(want.astype(np.float64) - got.astype(np.float64)).max(initial=0.0))
        return result
    w, g = want.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(w) & np.isfinite(g)
    # NaN and ±Inf must agree position by position (equal_nan: NaN == NaN; inf == inf)
    special_mismatch = int((~finite & ~((w == g) | (np.isnan(w) & np.isnan(g)))).sum())
    w_f, g_f = w[finite], g[finite]
    error = np.abs(g_f - w_f)
    scale = float(np.abs(w_f).max(initial=0.0)) or 1.0
    allowed = tolerance.atol * scale + tolerance.rtol * np.abs(w_f)
    result.scale = scale
    result.mismatched = int((error > allowed).sum()) + special_mismatch
    result.passed = result.mismatched == 0
    result.max_abs_error = float(error.max(initial=0.0))
    nonzero = np.abs(w_f) > 0
    result.max_rel_error = float((error[nonzero] / np.abs(w_f[nonzero])).max(initial=0.0))
    norm = float(np.linalg.norm(w_f))
    result.rel_l2_error = float(np.linalg.norm(g_f - w_f)) / norm if norm else float(np.linalg.norm(g_f))
    denominator = norm * float(np.linalg.norm(g_f))
    if denominator:
        result.cosine_similarity = float(np.dot(w_f, g_f)) / denominator
    else:  # an all-zero output: similar only to another all-zero output
        result.cosine_similarity = 1.0 if norm == 0 and not g_f.any() else 0.0
    result.needed_atol = float(np.maximum(error - tolerance.rtol * np.abs(w_f), 0).max(initial=0.0)) / scale
    if special_mismatch:
        result.reason = f"NaN/Inf at {special_mismatch} different positions"
    return result


def worst(trials: list[OutputComparison]) -> OutputComparison:
    """The trial that represents an output: the worst failing one, else the closest call."""
    failed = [t for t in trials if not t.passed]
    return max(failed or trials, key=lambda t: (t.mismatched, t.needed_atol))
