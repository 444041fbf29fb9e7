"""What verification reads off both graphs before it runs anything (`Structure`: the rewrite,
its sites, the precision of each tensor, the inputs of the discontinuous ops after the sites),
and the yardsticks the verdict's rules measure against (`Yardsticks`): how far the reference
itself moves when parameters are rounded the other way. The rules are in
bnfold.verification.verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from bnfold.graph.protos import int_attr, node_label
from bnfold.io.view import exposing, inferred_types, weights_apart, whole_model
from bnfold.verification import regions
from bnfold.verification.parameters import bias_terms
from bnfold.verification.precision import FLOAT_ORDER, Precisions, narrower
from bnfold.verification.regions import Rewrite
from bnfold.verification.runtime import make_session, run_named
from bnfold.verification.tolerance import (
    NOISE_CAP,
    NOISE_FACTOR,
    UNIT_ROUNDOFF,
    ChannelStats,
    Kind,
    OutputComparison,
    Precision,
    bias_allowance,
    channel_stats,
    compare,
)

DISCONTINUOUS = (
    "TopK", "NonMaxSuppression", "ArgMax", "ArgMin", "Hardmax", "QuantizeLinear", "DynamicQuantizeLinear",
    "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal", "Round", "Floor", "Ceil", "Sign", "NonZero",
    "Unique", "Mod",
)  # fmt: skip
INTEGER_TYPES = {TensorProto.BOOL, *range(TensorProto.UINT8, TensorProto.INT64 + 1), TensorProto.UINT32}


@dataclass
class Structure:
    """What verification reads off both graphs before it runs anything."""

    rewrite: Rewrite
    reference: onnx.ModelProto | None = None  # a skeleton: large tensors are stubs, in `arrays`
    candidate: onnx.ModelProto | None = None
    arrays: tuple[dict, dict] = ({}, {})  # each model's large initializers (bnfold.io.view.weights_apart)
    sources: tuple = (None, None)  # the models as given: paths or ModelProtos
    types: dict[str, onnx.TypeProto] = field(default_factory=dict)  # the reference's, inferred
    their_types: dict[str, int] = field(default_factory=dict)  # the candidate's element types
    outputs: dict[str, Precision] = field(default_factory=dict)
    sites: dict[str, Precision] = field(default_factory=dict)
    boundaries: dict[str, str] = field(default_factory=dict)  # tensor → the discontinuous op it feeds
    # a rewritten If's condition → (the If, its rewritten branches): which ones the trials take
    conditions: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    explains: dict[str, list[str]] = field(default_factory=dict)  # output → its boundary tensors
    # 16-bit site → how far each channel's mean may move by its bias's arithmetic (channel_stats)
    allowances: dict[str, np.ndarray] = field(default_factory=dict)

    def probe(self) -> tuple[onnx.ModelProto, dict]:
        """The reference with the candidate's rewrite beside it, and the boundary tensors
        exposed: a skeleton and its arrays, for runtime.load_session (the candidate's session
        shares the candidate's arrays, and nothing is serialized but the graph)."""
        ours, theirs = self.arrays
        model = regions.probe(_copy(self.reference), self.candidate, self.rewrite, self.types, self.their_types)
        arrays = {**ours, **{name + regions.ISOLATED: array for name, array in theirs.items()}}
        return exposing(model, [*self.boundaries, *self._computed_conditions()], self.types), arrays

    def reference_exposing(self) -> tuple[onnx.ModelProto, dict]:
        """The reference alone, with the boundary tensors exposed: for trials that judge no site."""
        exposed = [*self.boundaries, *self._computed_conditions()]
        return exposing(_copy(self.reference), exposed, self.types), self.arrays[0]

    def _computed_conditions(self) -> list[str]:
        """The rewritten Ifs' conditions that are not graph inputs (those the feed holds)."""
        fed = {i.name for i in self.reference.graph.input}
        return [cond for cond in self.conditions if cond not in fed]

    def candidate_exposing(self) -> tuple[onnx.ModelProto, dict]:
        return exposing(_copy(self.candidate), list(self.boundaries), self.types), self.arrays[1]

    @property
    def weight_bytes(self) -> int:
        """The bytes of both models' large initializers."""
        return sum(a.nbytes for arrays in self.arrays for a in arrays.values())

    def whole_reference(self) -> onnx.ModelProto:
        """The reference with all its data, for the yardsticks (run only when something fails)."""
        return whole_model(self.sources[0])


def read_structure(reference, candidate) -> Structure:
    """Both models' skeletons and weights, their rewrite, and the precision of every output and
    site; a Structure with only its reason when the models cannot be read apart."""
    try:
        (ours, our_arrays), (theirs, their_arrays) = [weights_apart(m) for m in (reference, candidate)]
    except Exception:  # onnxruntime's own load error is the one to report
        return Structure(Rewrite(whole="the models cannot be read site by site"))
    rewrite = regions.find_rewrite(ours, theirs, (our_arrays, their_arrays))
    if rewrite.candidate is not None:  # the candidate under the reference's names
        theirs, their_arrays = rewrite.candidate, rewrite.arrays
    structure = Structure(rewrite, ours, theirs, (our_arrays, their_arrays), (reference, candidate))
    structure.types = inferred_types(ours)
    elem = {name: t.tensor_type.elem_type for name, t in structure.types.items() if t.HasField("tensor_type")}
    elem.update({t.name: t.data_type for t in ours.graph.initializer})
    reference_precisions = Precisions(ours, elem, our_arrays)
    structure.outputs = {o.name: reference_precisions.of_output(o.name) for o in ours.graph.output}
    if not rewrite.isolated:
        return structure
    candidate_types = {
        n: t.tensor_type.elem_type for n, t in inferred_types(theirs).items() if t.HasField("tensor_type")
    }
    candidate_types.update({t.name: t.data_type for t in theirs.graph.initializer})
    structure.their_types = candidate_types
    candidate_precisions = Precisions(theirs, candidate_types, their_arrays)
    # a site is judged by the narrower of the two arithmetics that compute it
    theirs_within = {id(node) for node in rewrite.candidate_nodes}
    ours_within = {id(node) for node in rewrite.reference_nodes}
    structure.sites = {
        s: narrower(candidate_precisions.arithmetic(s, theirs_within), reference_precisions.arithmetic(s, ours_within))
        for s in rewrite.sites
    }
    _find_boundaries(structure, elem)
    structure.conditions = _rewritten_branches(rewrite)
    sixteen = [site for site, precision in structure.sites.items() if precision.dtype in UNIT_ROUNDOFF]
    if sixteen:
        terms = bias_terms(ours, our_arrays, sixteen)
        structure.allowances = {s: bias_allowance(t, structure.sites[s].dtype) for s, t in terms.items()}
    return structure


def _rewritten_branches(rewrite: Rewrite) -> dict[str, tuple[str, list[str]]]:
    """Each rewritten If whose condition is computed or fed (not a constant): its condition, and
    which of its branches the candidate rewrote."""
    by_outputs = {tuple(n.output): n for n in rewrite.reference_nodes if n.op_type == "If"}
    found = {}
    for node in rewrite.candidate_nodes:
        theirs = by_outputs.get(tuple(node.output))
        if node.op_type != "If" or theirs is None or not node.input or not theirs.input:
            continue
        branches = {a.name: a.g.SerializeToString(deterministic=True) for a in theirs.attribute}
        changed = [a.name for a in node.attribute if branches.get(a.name) != a.g.SerializeToString(deterministic=True)]
        if changed:  # the reference's condition: the candidate's may be a tensor only it has
            found[theirs.input[0]] = (node_label(node), changed)
    return found


def _find_boundaries(structure: Structure, elem: dict[str, int]) -> None:
    """The float inputs of the first discontinuous ops after the sites, and which outputs they
    lie before."""
    graph = structure.reference.graph
    after_site = set(structure.rewrite.sites)
    after_jump: set[str] = set()
    for node in graph.node:  # graph order is topological
        inputs = [i for i in node.input if i]
        if _discontinuous(node):
            for name in inputs:
                if name in after_site and name not in after_jump and elem.get(name) in FLOAT_ORDER:
                    structure.boundaries.setdefault(name, node_label(node))
            if any(i in after_site for i in inputs):
                after_jump.update(o for o in node.output if o)
        elif any(i in after_jump for i in inputs):
            after_jump.update(o for o in node.output if o)
        if any(i in after_site for i in inputs):
            after_site.update(o for o in node.output if o)
    producer = {out: node for node in graph.node for out in node.output if out}
    for output in graph.output:
        seen, pending, found = set(), [output.name], []
        while pending:
            name = pending.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in structure.boundaries:
                found.append(name)
                continue
            node = producer.get(name)
            if node is not None:
                pending += [i for i in node.input if i]
        if found:
            structure.explains[output.name] = found


def _discontinuous(node: onnx.NodeProto) -> bool:
    if node.op_type == "Cast":
        return int_attr(node, "to", 0) in INTEGER_TYPES
    return node.op_type in DISCONTINUOUS


class Yardsticks:
    """How far the reference itself moves when parameters are rounded the other way, measured
    for the verdict's rules (bnfold.verification.verdict.Evidence asks, and keeps, each once):
    - at the sites, the reference's rewritten nodes re-rounded in isolation (regions.yardstick):
      the error a correct fold is entitled to there, as an atol and per channel;
    - at the outputs and boundary tensors, every parameter the rewritten nodes read re-rounded,
      end to end (regions.rerounded_end_to_end), against the reference's own outputs; where that
      moves nothing (the rewritten nodes read no float parameter), every float parameter."""

    def __init__(self, structure: Structure, feeds, references, outputs: list[str], providers):
        self.structure, self.feeds, self.references = structure, feeds, references
        self.outputs, self.providers = outputs, providers

    def at_sites(self) -> tuple[dict[str, float], dict[str, ChannelStats]]:
        """Each site's noise (as an atol) and channel figures, over every trial."""
        structure = self.structure
        if structure.reference is None or not structure.sites:
            return {}, {}
        model = regions.yardstick(structure.whole_reference(), structure.rewrite, structure.types, seed=0)
        return _measure(model, list(structure.sites), regions.REROUNDED, self.feeds, self.providers,
                        allowances=structure.allowances)[:2]  # fmt: skip

    def at_outputs(self) -> tuple[dict[str, float], dict[str, float]]:
        """Each failing output's and boundary tensor's noise (as an atol, and as a relative L2
        error), over every trial."""
        structure = self.structure
        if structure.reference is None:
            return {}, {}
        names = sorted({name.split("[")[0] for name in self.outputs} | set(structure.boundaries))
        noise: dict[str, float] = {}
        spread: dict[str, float] = {}
        for rewrite in (structure.rewrite, Rewrite(whole="every parameter")):
            model = regions.rerounded_end_to_end(structure.whole_reference(), rewrite, seed=0)
            model = exposing(model, list(structure.boundaries), structure.types)
            found, _, moved = _measure(model, names, None, self.feeds, self.providers, self.references)
            noise.update(found)
            spread.update(moved)
            # a tensor the rewritten nodes' parameters do not move (they are whole numbers, shapes):
            # how far every float parameter moves it is the noise it carries
            names = [name for name in names if not noise.get(name)]
            if not names or not structure.rewrite.isolated:
                break
        return noise, spread


def judge_by_rerounding(results: list[OutputComparison], reference: onnx.ModelProto, feed, want, providers) -> None:
    """Pass failing tensors of `reference` (which exposes them) that stay within NOISE_FACTOR
    times how far they move when every float parameter is rounded the other way, never past
    NOISE_CAP times the atol: the second look without a rewrite to isolate (localize)."""
    failing = [r for r in results if not r.passed and r.kind == Kind.NUMBERS and r.precision != "quantized"]
    if not failing:
        return
    model = regions.rerounded_end_to_end(_copy(reference), Rewrite(whole="every parameter"), seed=0)
    noise = _measure(model, [r.name for r in failing], None, [feed], providers, [want])[0]
    for r in failing:
        if r.name in noise and r.needed_atol is not None:
            r.noise, r.rule = noise[r.name], "noise"
            r.passed = r.needed_atol <= min(NOISE_FACTOR * r.noise, NOISE_CAP * r.atol)
            if not r.passed and NOISE_FACTOR * r.noise > NOISE_CAP * r.atol:
                r.reason = (
                    f"FAIL: this model's own {r.precision} noise ({r.noise:.1e}) is too large to tell a fold from noise"
                )


def _measure(model, names, suffix, feeds, providers, references=None, allowances=None) -> tuple[dict, dict, dict]:
    """How far `names` move, largest over the trials, as an atol, per channel (ChannelStats) and
    as a relative L2 error:
    between the model's own tensor and its `suffix` copy, or (without a suffix) between the
    model's tensors and `references` (per trial, by name). Nothing, when the model does not load:
    no yardstick, no relaxation."""
    try:
        session = make_session(model, providers=providers)
    except Exception:
        return {}, {}, {}
    noise: dict[str, float] = {}
    channels: dict[str, ChannelStats] = {}
    spread: dict[str, float] = {}  # the same movement as a relative L2 error: scale-free
    for t, feed in enumerate(feeds):
        got = run_named(session, feed, "the reference with its parameters rounded the other way")
        for name in names:
            want = got.get(name) if suffix else references[t].get(name)
            other = got.get(name + suffix) if suffix else got.get(name)
            if not all(hasattr(v, "dtype") and v.dtype.kind == "f" for v in (want, other)):
                continue
            if other.shape == want.shape:
                other = other.astype(want.dtype)
                moved = compare("", want, other, 0.0, 0.0)
                noise[name] = max(noise.get(name, 0.0), moved.needed_atol)
                spread[name] = max(spread.get(name, 0.0), moved.rel_l2_error or 0.0)
                if suffix:
                    stats = channel_stats(want, other, (allowances or {}).get(name))
                    channels[name] = channels.get(name, ChannelStats()).worst(stats)
    return noise, channels, spread


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
