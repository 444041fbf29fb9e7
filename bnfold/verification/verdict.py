"""The verdict as a table of rules: run → measure → judge, with values between the steps.

`verify` runs both models and measures each tensor it compares (a `Measured`: the policy's
figures over all trials, and at a site how its channels move). `judge` then reads the table
`RULES` top to bottom for each tensor. A rule takes the measurement and the judgement so far
and returns a new `Judgement` with its sentence, or None when it has nothing to say; no rule
edits an earlier judgement, and the last one standing is the verdict (its rule is named in the
report). Sites are judged first, then the inputs of discontinuous ops, then the outputs: the
later rules of an output read how the sites and those inputs fared.

What a rule needs beyond the run (how far the reference moves when its parameters are rounded
the other way) is measured by `Evidence` on first use, so a verdict that no rule questions costs
no extra session.

Each row of `RULES` (at the end) names the tensors it judges and says in a sentence what it
decides (`Rule.says`, shown by the HTML report); docs/verification.md gives each rule's figures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property

from bnfold.verification.parameters import PARAMETER_FACTOR, Weights
from bnfold.verification.tolerance import (
    CHANNEL_FLOOR,
    ELEMENT_FLOOR,
    NOISE_CAP,
    NOISE_FACTOR,
    SHIFT_FACTOR,
    ChannelStats,
    Kind,
    OutputComparison,
)

SITE, BOUNDARY, OUTPUT = "site", "boundary", "output"


@dataclass(frozen=True)
class Measured:
    """What the run measured of one tensor: the policy's figures over all trials (the worst
    trial's, tolerance.judge), and at a site the largest per-channel shift and gain."""

    role: str
    comparison: OutputComparison
    channels: ChannelStats | None = None

    @property
    def name(self) -> str:
        return self.comparison.name


@dataclass(frozen=True)
class Judgement:
    """A verdict and the rule that reached it; `reason` says why it failed, `explained` why a
    difference the policy refuses passes, `noise` the yardstick the rule read."""

    passed: bool
    rule: str
    reason: str = ""
    explained: str = ""
    noise: float | None = None


@dataclass(frozen=True)
class Rule:
    name: str
    roles: tuple[str, ...]
    judge: Callable[[Measured, Judgement, Evidence], Judgement | None]
    says: str  # in a sentence, for the module's table and the HTML report


class Evidence:
    """What the rules may ask beyond the run, each measured once, on first use (a verdict no
    rule questions runs nothing more). `yardsticks` measures: sites.Yardsticks."""

    def __init__(self, yardsticks, structure):
        self.yardsticks = yardsticks
        self.structure = structure
        self.isolated = structure.rewrite.isolated  # every difference between the models lies in a rewritten node
        self.explains = structure.explains  # output → the boundary tensors (inputs of discontinuous ops) before it
        self.boundary_ops = structure.boundaries  # boundary tensor → the op it feeds
        self.sites: dict[str, OutputComparison] = {}  # judged sites, by name
        self.boundaries: dict[str, OutputComparison] = {}  # judged boundary tensors, by name

    @property
    def sites_pass(self) -> bool:
        return all(s.passed for s in self.sites.values())

    @cached_property
    def _at_sites(self) -> tuple[dict[str, float], dict[str, ChannelStats]]:
        return self.yardsticks.at_sites()  # one session for both figures

    @cached_property
    def _at_outputs(self) -> tuple[dict[str, float], dict[str, float]]:
        return self.yardsticks.at_outputs()  # one session (two, when the first moves nothing)

    @cached_property
    def weights(self) -> Weights:
        """Each site's weights against the exact fold of the reference's (parameters.py)."""
        return Weights(self.structure)

    # each site's noise (an atol) and channel figures; each output's noise, and the same as a
    # relative L2 error (how noisy the output is as a whole)
    site_noise = property(lambda self: self._at_sites[0])
    site_channels = property(lambda self: self._at_sites[1])
    output_noise = property(lambda self: self._at_outputs[0])
    output_spread = property(lambda self: self._at_outputs[1])


# ---- the rules ---------------------------------------------------------------------------------------
def _comparable(m: Measured, so_far: Judgement, ev: Evidence) -> Judgement | None:
    c = m.comparison
    return None if c.kind == Kind.NUMBERS else Judgement(False, "comparable", reason=c.reason)


def _policy(m: Measured, so_far: Judgement, ev: Evidence) -> Judgement | None:
    c = m.comparison
    if c.kind != Kind.NUMBERS:
        return None
    return Judgement(c.passed, "grid" if c.precision == "quantized" else "policy")


def _noise(m: Measured, so_far: Judgement, ev: Evidence) -> Judgement | None:
    """A failure by numbers within NOISE_FACTOR × how far the reference moves when the rewritten
    nodes' parameters are rounded the other way. At a site, capped at NOISE_CAP × the atol unless
    its channels are judged too (the channel rule then catches a mistake that hides in the
    noise of a model that cancels large numbers). At an output and a boundary, asked only once
    every site agrees, uncapped when every difference lies in a rewritten node (the sites bound
    the folds, and what follows them can only magnify their noise) or when the noise is a small
    part of the output as a whole (its relative L2 within the cap): S is a percentile, and a
    peaked output (a softmax over thousands of classes) has a tiny S and a large noise in its units."""
    c = m.comparison
    if c.stated or so_far.passed or c.kind != Kind.NUMBERS or c.precision == "quantized" or c.needed_atol is None:
        return None
    if m.role == SITE:
        noise = ev.site_noise.get(m.name)
        cap = None if m.channels is not None and m.channels.judged else NOISE_CAP
    else:
        if not ev.sites_pass:
            return None
        noise = ev.output_noise.get(m.name)
        # uncapped when the sites bound the folds, or when the model's own noise is small beside
        # the output as a whole (a softmax over 6625 classes: tiny S, tiny noise)
        quiet = ev.output_spread.get(m.name, float("inf")) <= NOISE_CAP * c.atol
        cap = None if ev.isolated or quiet else NOISE_CAP
    if noise is None:
        return None
    bound = NOISE_FACTOR * noise if cap is None else min(NOISE_FACTOR * noise, cap * c.atol)
    if c.needed_atol <= bound:
        return Judgement(True, "noise", noise=noise)
    if cap is not None and NOISE_FACTOR * noise > cap * c.atol:
        why = f"FAIL: this model's own {c.precision} noise ({noise:.1e}) is too large to tell a fold from noise"
        return Judgement(False, "noise", reason=why, noise=noise)
    why = f"FAIL: beyond {NOISE_FACTOR:.0f}× this model's own {c.precision} noise ({noise:.1e})"
    return Judgement(False, "noise", reason=why, noise=noise)


def _channel(m: Measured, so_far: Judgement, ev: Evidence) -> Judgement | None:
    """A passing site fails when a channel moves as a whole (its mean: a bias or a mean is off)
    or scales (its slope against the reference: a scale or a variance is off) by more than
    SHIFT_FACTOR × the reference's own at that site with its parameters rounded the other way,
    and more than its precision's floor. Under the floor no yardstick is run."""
    c, measured = m.comparison, m.channels
    if c.stated or not so_far.passed or measured is None or c.precision not in CHANNEL_FLOOR:
        return None
    floor_shift, floor_gain = CHANNEL_FLOOR[c.precision]
    if measured.shift <= floor_shift and measured.gain <= floor_gain:
        return None
    own = ev.site_channels.get(m.name)
    if own is None:
        return None
    for value, yardstick, floor, channel, how, what in (
        (measured.shift, own.shift, floor_shift, measured.shift_channel, "moves by {:.1e} of its RMS on average",
         "a bias or a mean is off"),
        (measured.gain, own.gain, floor_gain, measured.gain_channel, "is scaled by {:.1e} more or less",
         "a scale or a variance is off"),
    ):  # fmt: skip
        if value > max(SHIFT_FACTOR[c.precision] * yardstick, floor):
            why = (
                f"FAIL: channel {channel} {how.format(value)}, {value / max(yardstick, 1e-300):.1f}× what rounding "
                f"the parameters the other way does ({yardstick:.1e}): {what}"
            )
            return Judgement(False, "channel", reason=why, noise=so_far.noise)
    return None


def _elements(m: Measured, so_far: Judgement, ev: Evidence) -> Judgement | None:
    """A passing site with too few elements per channel for the channel rule (a Gemm's (N, C)
    output, an SE block's (N, C, 1, 1)) fails when its largest error, in units of S, is past
    SHIFT_FACTOR × the reference's own at that site and past its precision's floor: float16's
    atol lets one channel ×1.01 pass where a correct fold needs a fifth of that."""
    c, measured = m.comparison, m.channels
    if c.stated or not so_far.passed or c.kind != Kind.NUMBERS or c.precision not in ELEMENT_FLOOR:
        return None
    if measured is not None and measured.judged or c.needed_atol is None or c.needed_atol <= ELEMENT_FLOOR[c.precision]:
        return None
    noise = ev.site_noise.get(m.name)
    if noise is None or c.needed_atol <= SHIFT_FACTOR[c.precision] * noise:
        return None
    why = (
        f"FAIL: an error of {c.needed_atol:.1e} · S, {c.needed_atol / max(noise, 1e-300):.1f}× what rounding the "
        f"parameters the other way does ({noise:.1e}), at a site too small to judge by channel"
    )
    return Judgement(False, "elements", reason=why, noise=noise)


def _parameters(m: Measured, so_far: Judgement, ev: Evidence) -> Judgement | None:
    """A passing site whose channels the numbers cannot judge fails when the candidate makes it
    with the reference's linear op whose weights are not the reference's scaled by the affine
    maps after it, within PARAMETER_FACTOR epsilons of the weight type
    (bnfold.verification.parameters): a float16 SE block's one channel ×1.01 moves its 8
    elements about as far as rounding does, and its weights 10 epsilons."""
    if m.comparison.stated or not so_far.passed or m.channels is not None and m.channels.judged:
        return None
    check = ev.weights.check(m.name)
    if check is None or check.deviation <= PARAMETER_FACTOR:
        return None
    why = (
        f"FAIL: {check.node}'s weights of channel {check.channel} stand {check.deviation:.0f} {check.dtype} "
        f"epsilons from the reference's scaled by its affine maps (a correct fold rounds within "
        f"{PARAMETER_FACTOR:.0f}): a weight or a scale is off"
    )
    return Judgement(False, "parameters", reason=why, noise=so_far.noise)


def _discontinuity(m: Measured, so_far: Judgement, ev: Evidence) -> Judgement | None:
    """A failing output passes when a discontinuous op (TopK, NonMaxSuppression, a comparison,
    a QuantizeLinear, …) lies between the sites and it, every site agrees on every trial in
    which the output differs, and the inputs of the first such ops agree: near-ties that reorder,
    a value within noise of a rounding boundary, one box more."""
    c = m.comparison
    if c.stated or so_far.passed or not ev.isolated or not ev.sites_pass:
        return None
    if c.kind not in (Kind.NUMBERS, Kind.SHAPE):
        return None
    before = [ev.boundaries[b] for b in ev.explains.get(m.name.split("[")[0], []) if b in ev.boundaries]
    if not before or not all(b.passed for b in before):
        return None
    worst = max(before, key=lambda b: b.needed_atol or 0.0)
    what = f"the {c.reason}" if c.kind == Kind.SHAPE else f"{c.mismatched} of {c.elements} differ"
    explained = (
        f"ok: {what} after {ev.boundary_ops[worst.name]}, whose inputs agree within noise "
        f"(needed atol {worst.needed_atol:.1e}): near-ties or rounding boundaries"
    )
    return Judgement(True, "discontinuity", explained=explained, noise=so_far.noise)


RULES: tuple[Rule, ...] = (
    Rule(
        "comparable",
        (SITE, BOUNDARY, OUTPUT),
        _comparable,
        "no numbers to compare (missing, another type or shape, NaN elsewhere): FAIL",
    ),
    Rule("policy", (SITE, BOUNDARY, OUTPUT), _policy, "the tolerance policy of the precision it is computed in"),
    Rule(
        "noise",
        (SITE, BOUNDARY, OUTPUT),
        _noise,
        "a failure by numbers within NOISE_FACTOR × the reference's own noise passes",
    ),
    Rule("channel", (SITE,), _channel, "a channel moved or scaled past SHIFT_FACTOR × the reference's own: FAIL"),
    Rule("elements", (SITE,), _elements, "a small site's largest error past SHIFT_FACTOR × the reference's own: FAIL"),
    Rule(
        "parameters",
        (SITE,),
        _parameters,
        "a small site's weights past PARAMETER_FACTOR epsilons from the reference's folded exactly: FAIL",
    ),
    Rule("discontinuity", (OUTPUT,), _discontinuity, "a difference after a discontinuous op whose inputs agree passes"),
)


def judge_one(m: Measured, ev: Evidence, rules: tuple[Rule, ...] | None = None) -> OutputComparison:
    """The verdict on one tensor: every rule of `rules` (default RULES) for its role, in order;
    the row the report shows, with the rule whose judgement stands."""
    judgement = Judgement(False, "none", reason="FAIL: no rule judged it")  # a table must speak to pass
    for rule in RULES if rules is None else rules:
        if m.role in rule.roles:
            judgement = rule.judge(m, judgement, ev) or judgement
    c = m.comparison
    channels = m.channels or ChannelStats()
    return replace(
        c,
        passed=judgement.passed,
        reason=judgement.reason if not judgement.passed else "",
        explained=judgement.explained,
        noise=judgement.noise,
        rule=judgement.rule,
        channel_shift=channels.shift if m.channels is not None else c.channel_shift,
        channel_gain=channels.gain if m.channels is not None else c.channel_gain,
    )


def judge(
    sites: list[Measured], boundaries: list[Measured], outputs: list[Measured], ev: Evidence,
    rules: tuple[Rule, ...] | None = None,
) -> tuple[list[OutputComparison], list[OutputComparison]]:  # fmt: skip
    """Sites first, then the boundary tensors, then the outputs (which read both)."""
    judged_sites = [judge_one(m, ev, rules) for m in sites]
    ev.sites = {s.name: s for s in judged_sites}
    ev.boundaries = {b.name: judge_one(b, ev, rules) for b in boundaries}
    return [judge_one(m, ev, rules) for m in outputs], judged_sites
