"""The verdict where a rewrite acts, and on outputs knowing what lies between them and it.

1. Every site (bnfold.verification.regions) is compared in isolation, in every trial, under the
   policy of the arithmetic its rewritten nodes perform. A site that fails the policy gets a
   second look against the reference's own noise there, capped at NOISE_CAP times the policy's
   atol, so that the mildest mistakes measured (ε 1e-3 for 1e-5: ≥ 5e-4 · S) still fail.
2. An output that fails the policy while every site passes, and every difference between the
   models lies in a rewritten node, is float32 noise made larger by what comes after the sites
   (a softmax over thousands of classes, a saturated sigmoid, a long chain of folds): it passes
   within NOISE_FACTOR times how far the reference's outputs move when the rewritten nodes'
   parameters are rounded the other way, with no cap, since the sites already bound the folds.
3. What still differs passes only when a discontinuous op (TopK, NonMaxSuppression, ArgMax, a
   QuantizeLinear, a comparison, a Cast to an integer, …) lies between the sites and the
   output, and the inputs of the first such ops agree within noise: near-ties that reorder, a
   value within noise of a rounding boundary. The report names the op.
A difference at a site is a failure, localized to that site, whatever the outputs do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
from onnx import TensorProto

from bnfold.graph.protos import int_attr, node_label
from bnfold.verification import regions
from bnfold.verification.precision import FLOAT_ORDER, Precisions
from bnfold.verification.regions import Rewrite
from bnfold.verification.runtime import make_session, run_named, weights_apart, whole_model
from bnfold.verification.tolerance import (
    NOISE_CAP,
    NOISE_FACTOR,
    SHIFT_FACTOR,
    SHIFT_FLOOR,
    OutputComparison,
    Precision,
    channel_shift,
    compare,
)

DISCONTINUOUS = (
    "TopK", "NonMaxSuppression", "ArgMax", "ArgMin", "Hardmax", "QuantizeLinear", "DynamicQuantizeLinear",
    "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal", "Round", "Floor", "Ceil", "Sign", "NonZero",
    "Unique", "Mod",
)  # fmt: skip
RESIZED = "candidate gives shape"  # the start of compare's reason for another shape
INTEGER_TYPES = {TensorProto.BOOL, *range(TensorProto.UINT8, TensorProto.INT64 + 1), TensorProto.UINT32}


@dataclass
class Structure:
    """What verification reads off both graphs before it runs anything."""

    rewrite: Rewrite
    reference: onnx.ModelProto | None = None  # a skeleton: large tensors are stubs, in `arrays`
    candidate: onnx.ModelProto | None = None
    arrays: tuple[dict, dict] = ({}, {})  # each model's large initializers (runtime.weights_apart)
    sources: tuple = (None, None)  # the models as given: paths or ModelProtos
    types: dict[str, onnx.TypeProto] = field(default_factory=dict)  # the reference's, inferred
    outputs: dict[str, Precision] = field(default_factory=dict)
    sites: dict[str, Precision] = field(default_factory=dict)
    boundaries: dict[str, str] = field(default_factory=dict)  # tensor → the discontinuous op it feeds
    explains: dict[str, list[str]] = field(default_factory=dict)  # output → its boundary tensors

    def probe(self) -> tuple[onnx.ModelProto, dict]:
        """The reference with the candidate's rewrite beside it, and the boundary tensors
        exposed: a skeleton and its arrays, for runtime.load_session (the candidate's session
        shares the candidate's arrays, and nothing is serialized but the graph)."""
        ours, theirs = self.arrays
        model = regions.probe(_copy(self.reference), self.candidate, self.rewrite, self.types)
        arrays = {**ours, **{name + regions.ISOLATED: array for name, array in theirs.items()}}
        return _exposing(model, list(self.boundaries), self.types), arrays

    def reference_exposing(self) -> tuple[onnx.ModelProto, dict]:
        """The reference alone, with the boundary tensors exposed: for trials that judge no site."""
        return _exposing(_copy(self.reference), list(self.boundaries), self.types), self.arrays[0]

    def candidate_exposing(self) -> tuple[onnx.ModelProto, dict]:
        return _exposing(_copy(self.candidate), list(self.boundaries), self.types), self.arrays[1]

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
    structure = Structure(rewrite, ours, theirs, (our_arrays, their_arrays), (reference, candidate))
    structure.types = _types(ours)
    elem = {name: t.tensor_type.elem_type for name, t in structure.types.items() if t.HasField("tensor_type")}
    elem.update({t.name: t.data_type for t in ours.graph.initializer})
    reference_precisions = Precisions(ours, elem, our_arrays)
    structure.outputs = {o.name: reference_precisions.of_output(o.name) for o in ours.graph.output}
    if not rewrite.isolated:
        return structure
    candidate_types = {n: t.tensor_type.elem_type for n, t in _types(theirs).items() if t.HasField("tensor_type")}
    candidate_types.update({t.name: t.data_type for t in theirs.graph.initializer})
    candidate_precisions = Precisions(theirs, candidate_types, their_arrays)
    region = {id(node) for node in rewrite.candidate_nodes}
    structure.sites = {s: candidate_precisions.arithmetic(s, within=region) for s in rewrite.sites}
    _find_boundaries(structure, elem)
    return structure


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


def judge_sites(results: list[OutputComparison], structure: Structure, feeds, providers, atol) -> None:
    """Pass failing sites that stay within NOISE_FACTOR times the reference's own noise at that
    site (its rewritten nodes re-rounded, in isolation), capped at NOISE_CAP times the atol."""
    failing = [r for r in results if not r.passed and not r.reason and r.precision != "quantized"]
    if not failing or atol is not None:
        return
    model = regions.yardstick(structure.whole_reference(), structure.rewrite, structure.types, seed=0)
    noise = _noise(model, [r.name for r in failing], regions.REROUNDED, feeds, providers)
    for r in failing:
        if r.name in noise:
            _within_noise(r, noise[r.name], NOISE_CAP)


def judge_shifts(results: list[OutputComparison], shifts: dict[str, tuple[float, int]], structure: Structure,
                 feeds, providers) -> None:  # fmt: skip
    """Fail passing 16-bit sites whose largest per-channel mean difference (`shifts`: shift, channel)
    exceeds SHIFT_FACTOR times the reference's own there (its rewritten nodes re-rounded, in
    isolation) and SHIFT_FLOOR: a bias or a mean that is off (bnfold.verification.tolerance)."""
    judged = [r for r in results if r.passed and r.name in shifts]
    if not judged:
        return
    model = regions.yardstick(structure.whole_reference(), structure.rewrite, structure.types, seed=0)
    own = _noise(model, [r.name for r in judged], regions.REROUNDED, feeds, providers,
                 measure=lambda want, other: channel_shift(want, other)[0])  # fmt: skip
    for r in judged:
        shift, channel = shifts[r.name]
        r.channel_shift = shift
        if r.name in own and shift > max(SHIFT_FACTOR * own[r.name], SHIFT_FLOOR):
            r.passed = False
            r.reason = (
                f"FAIL: channel {channel} moves by {shift:.1e}·S on average, {shift / max(own[r.name], 1e-300):.1f}× "
                f"what rounding the parameters the other way does ({own[r.name]:.1e}): a bias or a mean is off"
            )


def judge_outputs(outputs, boundaries, structure: Structure, feeds, references, providers, atol) -> None:
    """The second and third looks at failing outputs (module docstring). `boundaries` holds the
    comparisons of the boundary tensors, by name."""
    failing = [o for o in outputs if not o.passed and not o.reason]
    # a data-dependent size after a discontinuity (NonMaxSuppression keeps one box more)
    resized = [o for o in outputs if not o.passed and o.reason.startswith(RESIZED)]
    if not (failing or resized) or atol is not None or structure.reference is None:
        return
    names = {o.name.split("[")[0] for o in failing} | set(boundaries)
    model = regions.rerounded_end_to_end(structure.whole_reference(), structure.rewrite, seed=0)
    model = _exposing(model, list(boundaries), structure.types)
    noise = _noise(model, sorted(names), None, feeds, providers, references)
    cap = None if structure.rewrite.isolated else NOISE_CAP
    for o in [*failing, *(b for b in boundaries.values() if not b.passed and not b.reason)]:
        if o.name in noise and o.precision != "quantized" and o.needed_atol is not None:
            _within_noise(o, noise[o.name], cap)
    if not structure.rewrite.isolated:
        return
    for o in [*failing, *resized]:
        if o.passed:
            continue
        before = [boundaries[b] for b in structure.explains.get(o.name.split("[")[0], []) if b in boundaries]
        if before and all(b.passed for b in before):
            worst = max(before, key=lambda b: b.needed_atol or 0.0)
            what = (
                o.reason.replace(RESIZED, "the candidate gives shape", 1)
                if o.reason
                else f"{o.mismatched} of {o.elements} differ"
            )
            o.passed, o.reason = True, ""
            o.explained = (
                f"ok: {what} after {structure.boundaries[worst.name]}, whose inputs agree within noise "
                f"(needed atol {worst.needed_atol:.1e}): near-ties or rounding boundaries"
            )


def judge_by_rerounding(results: list[OutputComparison], reference: onnx.ModelProto, feed, want, providers) -> None:
    """Pass failing tensors of `reference` (which exposes them) that stay within noise of every
    float parameter rounded the other way, capped: the second look without a rewrite to isolate."""
    failing = [r for r in results if not r.passed and not r.reason and r.precision != "quantized"]
    if not failing:
        return
    model = regions.rerounded_end_to_end(_copy(reference), Rewrite(whole="every parameter"), seed=0)
    noise = _noise(model, [r.name for r in failing], None, [feed], providers, [want])
    for r in failing:
        if r.name in noise and r.needed_atol is not None:
            _within_noise(r, noise[r.name], NOISE_CAP)


def _within_noise(o: OutputComparison, noise: float, cap: float | None) -> None:
    """Pass `o` within NOISE_FACTOR × `noise`, never past `cap` × its atol; past the cap, say that
    this model is too noisy to tell a fold from noise."""
    o.noise = noise
    bound = NOISE_FACTOR * noise if cap is None else min(NOISE_FACTOR * noise, cap * o.atol)
    if o.needed_atol <= bound:
        o.passed = True  # mismatched keeps counting the elements beyond the policy
    elif cap is not None and NOISE_FACTOR * noise > cap * o.atol:
        o.reason = f"FAIL: this model's own {o.precision} noise ({noise:.1e}) is too large to tell a fold from noise"


def _needed_atol(want, other) -> float:
    return compare("", want, other, 0.0, 0.0).needed_atol


def _noise(model, names, suffix, feeds, providers, references=None, measure=_needed_atol) -> dict[str, float]:
    """How far `names` move (by `measure`, largest over the trials; default: as an atol):
    between the model's own tensor and its `suffix` copy, or (without a suffix) between the
    model's tensors and `references` (per trial, by name)."""
    try:
        session = make_session(model, providers=providers)
    except Exception:  # no yardstick, no relaxation: the policy's verdict stands
        return {}
    noise: dict[str, float] = {}
    for t, feed in enumerate(feeds):
        got = run_named(session, feed, "the reference with its parameters rounded the other way")
        for name in names:
            want = got.get(name) if suffix else references[t].get(name)
            other = got.get(name + suffix) if suffix else got.get(name)
            if not all(hasattr(v, "dtype") and v.dtype.kind == "f" for v in (want, other)):
                continue
            if other.shape == want.shape:
                moved = measure(want, other.astype(want.dtype))
                noise[name] = max(noise.get(name, 0.0), moved)
    return noise


def _exposing(model: onnx.ModelProto, names: list[str], types: dict) -> onnx.ModelProto:
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            typed = types.get(name)
            model.graph.output.append(
                onnx.ValueInfoProto(name=name, type=typed) if typed else onnx.ValueInfoProto(name=name)
            )
            present.add(name)
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _types(skeleton: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Inferred types of every tensor, from a skeleton (split_weights: inference only reads
    small constants)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False).graph
    except Exception:
        inferred = skeleton.graph
    return {v.name: v.type for v in (*inferred.input, *inferred.value_info, *inferred.output)}
