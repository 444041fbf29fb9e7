"""`bnfold verify`: run two models on the same inputs and compare every output, by name."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.graph.protos import node_label
from bnfold.io.source import as_model, check_external_data
from bnfold.io.view import LARGE_WEIGHTS
from bnfold.verification import regions, runtime, verdict
from bnfold.verification.evidence import check_folder, claim_folder, save_trials
from bnfold.verification.inputs import (
    DEFAULT_INT_RANGE,
    DEFAULT_TRIALS,
    SYMBOLIC_BATCH,
    check_comparable,
    check_feed,
    choose_feeds,
    describe_inputs,
    input_specs,
    load_input_sets,
    shape_notes,
)
from bnfold.verification.localize import Divergence, first_divergence
from bnfold.verification.quantizers import Bypass, bypass_removed
from bnfold.verification.report import VerifyReport
from bnfold.verification.runtime import DEFAULT_PROVIDERS, ModelLoadError
from bnfold.verification.sites import Yardsticks, read_structure
from bnfold.verification.tolerance import (
    ChannelStats,
    Kind,
    OutputComparison,
    channel_stats,
    compare,
    judge,
    stated,
    unmatched,
)
from bnfold.verification.verdict import BOUNDARY, OUTPUT, SITE, Evidence, Measured

__all__ = ["ModelLoadError", "VerifyReport", "verify"]


@runtime.takes_custom_ops
def verify(
    reference,
    candidate,
    *,
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    atol=None,
    rtol=None,
    abs_atol=None,
    input_shapes: dict[str, Sequence[int]] | None = None,
    int_range: tuple[int, int] = DEFAULT_INT_RANGE,
    inputs: Sequence[str | Path | dict] = (),
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    progress: Callable[[str], None] = lambda stage: None,
    locations_checked: bool = False,
    localize: bool = False,
    save_inputs: str | Path | None = None,
    save_outputs: str | Path | None = None,
    cores: int | None = None,
    requantize: bool = False,
) -> VerifyReport:
    """Run both models on the same inputs and compare every output, paired by name, under the
    tolerance policy (`bnfold.verification.tolerance`) for the precision each output is
    computed in (`bnfold.verification.precision`).

    `reference` and `candidate` are paths, ModelProtos, onnx_ir models or ONNXPrograms.
    `inputs` are .npz files (arrays by input name), onnx test-data folders, or dicts of arrays
    by input name; each is one trial.
    Without them, `trials` input sets are generated from `seed`, a symbolic batch dimension
    alternating between 1 and 2. Raises BnfoldError when the comparison cannot run; a
    difference is reported, not raised. Model files' external-data locations are checked before
    onnxruntime reads them, unless the caller has done that (`locations_checked`: optimize read
    the input and wrote the candidate itself). With `localize`, a failure is traced to the first
    intermediate tensor both models share that differs (`report.first_divergence`).
    `save_inputs` and `save_outputs` name new folders for what was run, in onnx's test-data
    layout (`bnfold.verification.evidence`); the candidate's outputs go to `candidate/` inside.
    `cores` caps the cores the two sessions share (default: every core). With `requantize`, the
    candidate is judged against the reference with the quantizers it removed bypassed
    (bnfold.verification.quantizers: a fold made with --requantize). `custom_ops` (a keyword
    runtime.takes_custom_ops adds): onnxruntime custom-op libraries every session registers.
    """
    start = time.perf_counter()
    reference, candidate = (_model_or_path(m) for m in (reference, candidate))
    if trials < 1:
        raise BnfoldError("--trials must be at least 1")
    if int_range[0] >= int_range[1]:
        raise BnfoldError(f"--int-range {int_range[0]}:{int_range[1]} is empty")
    tolerances = stated(atol, rtol, abs_atol)
    runtime.check_providers(providers)
    folders = {kind: check_folder(Path(f)) for kind, f in (("inputs", save_inputs), ("outputs", save_outputs)) if f}
    report = VerifyReport(
        runtime.describe(reference), runtime.describe(candidate), seed=seed, providers=list(providers)
    )
    progress("loading both models in onnxruntime")
    if not locations_checked:
        for model in (reference, candidate):
            if not isinstance(model, onnx.ModelProto):
                check_external_data(model)  # before anything reads a data file
    bypass = bypass_removed(reference, candidate) if requantize else Bypass(reference)
    if bypass.refusal:
        report.equivalent, report.notes = False, [f"note: {bypass.refusal}"]
        report.seconds = time.perf_counter() - start
        return report
    reference = bypass.reference
    structure = read_structure(reference, candidate)
    by_site = structure.reference is not None and structure.rewrite.isolated
    unprobed = ""
    if by_site:
        models = (structure.probe(), structure.candidate_exposing())
        # a plain reference for the trials that judge no site, unless its weights are too large to load twice
        plain = structure.reference_exposing() if structure.weight_bytes <= LARGE_WEIGHTS else None
        try:
            pair = runtime.SessionPair(models, providers, check_locations=False, cores=cores, plain_reference=plain)
        except ModelLoadError as exc:
            # the probe is bnfold's own graph: the candidate's rewrite may not read the
            # reference's tensors (float16 nodes beside float32 ones); compare the models whole
            by_site, structure.rewrite.whole = False, "onnxruntime cannot load the probe"
            why = str(exc).split("failed:", 1)[-1].strip()  # onnxruntime's reason, without its temporary path
            unprobed = f"note: the rewrite cannot be judged where it acts ({why}); only the outputs are compared"
    if not by_site:
        pair = runtime.SessionPair((reference, candidate), providers, check_locations=False, cores=cores)
    with pair:
        report.providers = runtime.providers_used([*pair.sessions, pair.plain], providers)
        counts = _declared_outputs(structure, pair.sessions)
        inputs_differ = _inputs_difference(*pair.sessions)
        if inputs_differ:
            report.equivalent, report.notes = False, [inputs_differ]
            report.seconds = time.perf_counter() - start
            return report
        compared, unpaired = _pair_outputs(*pair.sessions, counts)
        precisions = {name: structure.outputs[name] for name in compared if name in structure.outputs}
        declared = runtime.input_declarations(pair.sessions[0])

        def choose(batches=SYMBOLIC_BATCH):
            return choose_feeds(declared, trials, seed, input_shapes or {}, int_range, structure.reference,
                                lambda feed: pair.try_reference(feed), batches)  # fmt: skip

        def run_all(feeds):
            return _run_trials(pair, feeds, compared, structure, by_site, report, progress, tolerances, precisions,
                               keep_candidates="outputs" in folders)  # fmt: skip

        if inputs:
            feeds, chosen = _given_feeds(declared, inputs, input_shapes or {}), None
            run = run_all(feeds)
        else:
            feeds, chosen = choose()
            try:
                run = run_all(feeds)
            except BnfoldError:
                # the reference itself refuses batch 2 (a tagger that squeezes its batch away): every
                # trial at batch 1, with a note; a candidate that refuses it is a failure to report
                refusal = pair.try_reference(feeds[1]) if len(feeds) > 1 else None
                if refusal is None or pair.try_reference(feeds[0]) is not None:
                    raise
                feeds, chosen = choose(batches=(1,))
                chosen.batch_error = refusal
                run = run_all(feeds)
        report.notes = (
            ([f"note: {bypass.note}"] if bypass.note else [])
            + ([unprobed] if unprobed else [])
            + shape_notes(declared, feeds, input_shapes or {}, chosen)
            + [
                f"note: output '{n}' is judged {p.why}"
                if p.step is not None
                else f"note: output '{n}' is judged as {p.dtype}: {p.why}"
                for n, p in precisions.items()
                if p.dtype and p.why != p.dtype  # not a float tensor (p.dtype ""): compared exactly, no note
            ]
        )
        if inputs:
            report.inputs = [{"name": v.name, "source": _sources(inputs)} for v in declared]
        else:
            report.inputs = describe_inputs(declared, feeds)
        report.trials = len(feeds)
    if "inputs" in folders:
        save_trials(claim_folder(folders["inputs"]), feeds, "input")
    if "outputs" in folders:  # inputs beside outputs, so that --load-outputs reads the folder on its own
        save_trials(claim_folder(folders["outputs"]), feeds, "input")
        save_trials(folders["outputs"], [{n: r[n] for n in compared} for r in run.references], "output")
        save_trials(claim_folder(folders["outputs"] / "candidate"), feeds, "input")
        save_trials(folders["outputs"] / "candidate", run.candidates, "output")
    clipped = bypass.clipped(feeds, providers)
    report.notes += [f"note: {clipped}"] if clipped else []
    report.notes += _unexercised(structure, run)
    if not inputs:
        report.notes += _saturated(structure, run.references)
    progress("judging")
    evidence = Evidence(Yardsticks(structure, feeds, run.references, compared, providers), structure)
    report.outputs, report.sites = verdict.judge(
        [Measured(SITE, judge(results), run.channels.get(site)) for site, results in run.sites.items()],
        [Measured(BOUNDARY, judge(results)) for results in run.boundaries.values()],
        [*(Measured(OUTPUT, judge(results)) for results in run.outputs.values()),
         *(Measured(OUTPUT, u) for u in unpaired)],
        evidence,
    )  # fmt: skip
    report.equivalent = all(o.passed for o in [*report.outputs, *report.sites])
    failed_site = next((s for s in report.sites if not s.passed), None)
    if failed_site is not None:
        report.first_divergence = _site_divergence(failed_site, structure)
    elif localize and report.failed:
        progress("looking for the first tensor that differs")
        feed = feeds[_first_failing_trial(report.failed, run.outputs)]
        report.first_divergence = first_divergence(reference, candidate, feed, providers, *tolerances.everywhere)
    report.seconds = time.perf_counter() - start
    return report


@dataclass
class Run:
    """What the trials measured, per tensor and trial, before anything is judged."""

    outputs: dict[str, list[OutputComparison]] = field(default_factory=dict)
    sites: dict[str, list[OutputComparison]] = field(default_factory=dict)
    boundaries: dict[str, list[OutputComparison]] = field(default_factory=dict)
    channels: dict[str, ChannelStats] = field(default_factory=dict)  # per site, the worst trial's
    branches: dict[str, set[bool]] = field(default_factory=dict)  # a rewritten If's condition → values taken
    references: list[dict] = field(default_factory=list)  # per trial: the reference's float outputs and boundaries
    candidates: list[dict] = field(default_factory=list)  # per trial: the candidate's outputs (when saved)


def _run_trials(pair, feeds, compared, structure, by_site, report, progress, tolerances, precisions,
                keep_candidates: bool) -> Run:  # fmt: skip
    """Run every trial and compare what it gives under the policy. The sites are measured on
    the first trial of each set of input shapes, and on every trial whose outputs differ (so a
    difference at an output is never excused by sites judged on other inputs)."""
    run, shapes_seen = Run(), set()
    inner = (*tolerances.everywhere, None)  # inner sites and boundaries: no stated units of their own
    for t, feed in enumerate(feeds, 1):
        progress(f"trial {t} of {len(feeds)}")
        shapes = tuple((n, np.shape(v)) for n, v in sorted(feed.items()))
        at_sites = by_site and shapes not in shapes_seen
        shapes_seen.add(shapes)
        want, got = pair.run(feed, (report.reference, report.candidate), plain=not at_sites)
        outputs = {name: _compare_value(name, want[name], got[name], tolerances.of(name), precisions.get(name))
                   for name in compared}  # fmt: skip
        if by_site and not at_sites and not all(r.passed for results in outputs.values() for r in results):
            del want, got
            want, got = pair.run(feed, (report.reference, report.candidate), plain=False)
            at_sites = True
        for results in outputs.values():
            for result in results:
                run.outputs.setdefault(result.name, []).append(result)
        # what the yardsticks and the saturation note read later: float tensors only, unless
        # --save-outputs keeps every output (a 1 GiB bool output is not kept once per trial)
        run.references.append(
            {
                n: want[n]
                for n in [*compared, *structure.boundaries]
                if n in want and (keep_candidates or _float(want[n]))
            }
        )
        if keep_candidates:
            run.candidates.append({n: got[n] for n in compared})
        if at_sites:
            for site, precision in structure.sites.items():
                isolated = want[site + regions.ISOLATED]
                stated_here = tolerances.of(site) if site in compared else inner  # a site that is an output
                run.sites.setdefault(site, []).extend(
                    _compare_value(site, want[site], isolated, stated_here, precision)
                )
                if isinstance(isolated, np.ndarray) and np.asarray(want[site]).dtype.kind == "f":
                    stats = channel_stats(np.asarray(want[site]), isolated, structure.allowances.get(site))
                    run.channels[site] = run.channels.get(site, ChannelStats()).worst(stats)
            for site in structure.rewrite.shape_sites:
                run.sites.setdefault(site, []).append(_compare_shape(site, want[site], want[site + regions.ISOLATED]))
        for cond in structure.conditions:
            value = feed.get(cond, want.get(cond))
            if value is not None:
                run.branches.setdefault(cond, set()).add(bool(np.asarray(value).reshape(-1)[0]))
        if by_site:
            for name in structure.boundaries:
                run.boundaries.setdefault(name, []).extend(_compare_value(name, want[name], got[name], inner, None))
        del want, got  # before the next run: its outputs then reuse this trial's memory
    return run


def _float(value) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind == "f"


def _unexercised(structure, run: Run) -> list[str]:
    """A note for each rewritten If branch that no trial took: nothing judged what it computes."""
    notes = []
    for cond, (label, rewritten) in structure.conditions.items():
        if cond not in run.branches:
            continue  # its condition was not seen (the models were compared whole)
        taken = {"then_branch" if value else "else_branch" for value in run.branches[cond]}
        for branch in sorted(set(rewritten) - taken):
            notes.append(f"note: no trial took the {branch} of {label}: its rewrite is not exercised "
                         "(give --inputs that take it)")  # fmt: skip
    return notes


SATURATING = {"Sigmoid": (0.0, 1.0), "HardSigmoid": (0.0, 1.0), "Tanh": (-1.0, 1.0), "Softsign": (-1.0, 1.0)}
SATURATED_BAND = 1e-3  # a value this close to where its op flattens out…
SATURATED_SHARE = 0.9  # …in this share of an output: the generated inputs say little about it


def _saturated(structure, references: list[dict]) -> list[str]:
    """A note for each output a saturating op makes (sigmoid, tanh) whose values on the
    generated inputs lie nearly all where that op is flat: what came before it barely shows."""
    if structure.reference is None or not references:
        return []
    made = {node.output[0]: node.op_type for node in structure.reference.graph.node if node.output}
    notes = []
    for output in structure.reference.graph.output:
        bounds = SATURATING.get(made.get(output.name, ""))
        values = [np.asarray(r[output.name]) for r in references if isinstance(r.get(output.name), np.ndarray)]
        if bounds is None or not values or not all(v.dtype.kind == "f" and v.size for v in values):
            continue
        flat = [np.minimum(np.abs(v - bounds[0]), np.abs(v - bounds[1])) <= SATURATED_BAND for v in values]
        share = sum(int(f.sum()) for f in flat) / sum(f.size for f in flat)
        if share >= SATURATED_SHARE:
            notes.append(
                f"note: output '{output.name}' is saturated on the generated inputs ({share:.0%} of its values "
                f"within {SATURATED_BAND:.0e} of {bounds[0]:g} or {bounds[1]:g}): it shows little of the "
                "layers before it; the sites judge those, and --inputs with real data judge the output"
            )
    return notes


def _compare_shape(name, want, got) -> OutputComparison:
    """A tensor only Shape or Size reads after the rewrite: its shape is what it gives on."""
    want_shape, got_shape = list(np.shape(want)), list(np.shape(got))
    if want_shape != got_shape:
        return unmatched(name, f"candidate gives shape {got_shape}, reference {want_shape} (read by Shape)",
                         str(getattr(want, "dtype", "")), want_shape, Kind.SHAPE)  # fmt: skip
    return OutputComparison(name, str(getattr(want, "dtype", "")), want_shape, elements=0, precision="shape")


def _site_divergence(site: OutputComparison, structure) -> Divergence:
    """A failing site as the first divergence: the rewrite that made it, judged in isolation."""
    made = [{out: n for n in nodes for out in n.output} for nodes in (structure.rewrite.reference_nodes,
                                                                      structure.rewrite.candidate_nodes)]  # fmt: skip
    name = site.name.split("[", 1)[0]  # a sequence's element names its sequence
    return Divergence(site.name, node_label(made[0][name]), node_label(made[1][name]), site)


def _declared_outputs(structure, sessions) -> tuple[int, int] | None:
    """How many of each session's outputs are the model's own (the probe adds its sites after)."""
    if structure.reference is None:
        return None
    return len(structure.reference.graph.output), len(structure.candidate.graph.output)


def _first_failing_trial(failed: list[OutputComparison], comparisons: dict) -> int:
    """The first trial in which an output that failed overall failed."""
    trials = [
        next((t for t, result in enumerate(comparisons.get(o.name, [])) if not result.passed), None) for o in failed
    ]
    return min((t for t in trials if t is not None), default=0)


def _model_or_path(model):
    model = as_model(model)
    return str(model) if isinstance(model, Path) else model


def _given_feeds(declared, inputs, shapes) -> list[dict]:
    specs = input_specs(declared, shapes)
    feeds = []
    for given in inputs:
        if isinstance(given, dict):
            feeds.append(check_feed(given, specs, "inputs"))
        else:
            feeds += load_input_sets(Path(given), specs)
    return check_comparable(feeds, _sources(inputs))


def _sources(inputs) -> str:
    """Where given input sets came from, for the report and its messages."""
    return ", ".join("arrays" if isinstance(i, dict) else str(i) for i in inputs)


def _inputs_difference(reference, candidate) -> str:
    ref, cand = runtime.signature(reference, "inputs"), runtime.signature(candidate, "inputs")
    if sorted(ref) != sorted(cand):
        return f"the models' inputs differ: reference {ref}, candidate {cand}"
    return ""


def _pair_outputs(reference, candidate, counts=None) -> tuple[list[str], list[OutputComparison]]:
    """The output names both models have with one type, and a failed comparison for every other
    name: missing from the candidate, only in the candidate, or declared with another type.
    `counts`: how many of each session's outputs are its model's own (the rest are exposed)."""
    ref, cand = (runtime.signature(s, "outputs") for s in (reference, candidate))
    if counts is not None:
        ref, cand = ref[: counts[0]], cand[: counts[1]]
    ref, cand = dict(ref), dict(cand)
    compared, unpaired = [], []
    for name, kind in ref.items():
        if name not in cand:
            unpaired.append(unmatched(name, "missing from the candidate", kind))
        elif cand[name] != kind:
            unpaired.append(unmatched(name, f"the candidate declares {cand[name]}, the reference {kind}", kind))
        elif "map(" in kind or "bfloat16" in kind:
            what = "a map" if kind.startswith("map(") else "a sequence of maps" if "map(" in kind else ""
            what = what or "bfloat16, which onnxruntime's Python API cannot return"
            raise BnfoldError(f"output '{name}' is {what}: bnfold cannot compare it")
        else:
            compared.append(name)
    unpaired += [unmatched(name, "only in the candidate", kind) for name, kind in cand.items() if name not in ref]
    return compared, unpaired


def _compare_value(name, want, got, tolerance, precision) -> list[OutputComparison]:
    """One output of one trial: a tensor, a sequence of tensors (element by element, as
    `name[i]`) or an optional that may be absent; `tolerance` is the stated (atol, rtol,
    absolute), each None for the policy's."""
    if want is None or got is None:
        if want is None and got is None:
            return [OutputComparison(name, "", [], elements=0)]
        return [unmatched(name, f"absent in the {'reference' if want is None else 'candidate'} only")]
    if isinstance(want, dict) or isinstance(got, dict):
        raise BnfoldError(f"output '{name}' holds a map: bnfold cannot compare it")
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            count = len(got) if isinstance(got, list) else "no"
            return [unmatched(name, f"the candidate gives {count} elements, the reference {len(want)}")]
        results = []
        for i, (w, g) in enumerate(zip(want, got)):
            results += _compare_value(f"{name}[{i}]", w, g, tolerance, precision)
        return results
    atol, rtol, absolute = tolerance
    return [compare(name, np.asarray(want), np.asarray(got), atol, rtol, precision, absolute)]
