"""`bnfold verify`: run two models on the same inputs and compare every output."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.verification import runtime
from bnfold.verification.inputs import (
    DEFAULT_INT_RANGE,
    DEFAULT_TRIALS,
    describe_inputs,
    generate_inputs,
    input_specs,
    load_input_sets,
)
from bnfold.verification.noise import judge_by_noise
from bnfold.verification.report import VerifyReport
from bnfold.verification.runtime import DEFAULT_PROVIDERS, ModelLoadError
from bnfold.verification.tolerance import OutputComparison, compare, worst

__all__ = ["ModelLoadError", "VerifyReport", "verify"]


def verify(
    reference: onnx.ModelProto | str | Path,
    candidate: onnx.ModelProto | str | Path,
    *,
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    input_shapes: dict[str, Sequence[int]] | None = None,
    int_range: tuple[int, int] = DEFAULT_INT_RANGE,
    inputs: Sequence[str | Path] = (),
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    progress: Callable[[str], None] = lambda stage: None,
    locations_checked: bool = False,
) -> VerifyReport:
    """Run both models on the same inputs and compare every output under the tolerance policy
    (`bnfold.verification.tolerance`).

    `inputs` are .npz files (arrays by input name) or onnx test-data folders; each is one trial.
    Without them, `trials` input sets are generated from `seed`. Raises BnfoldError when the
    comparison cannot run; a difference is reported, not raised. Model files' external-data
    locations are checked before onnxruntime reads them, unless the caller has done that
    (`locations_checked`: optimize read the input and wrote the candidate itself).
    """
    start = time.perf_counter()
    if trials < 1:
        raise BnfoldError("--trials must be at least 1")
    if int_range[0] >= int_range[1]:
        raise BnfoldError(f"--int-range {int_range[0]}:{int_range[1]} is empty")
    runtime.check_providers(providers)
    report = VerifyReport(
        runtime.describe(reference), runtime.describe(candidate), seed=seed, providers=list(providers)
    )
    progress("loading both models in onnxruntime")
    sessions = [
        runtime.load_session(m, role, providers, check_locations=not locations_checked)
        for m, role in ((reference, "reference"), (candidate, "candidate"))
    ]
    if any(kind == "tensor(bfloat16)" for _, kind in runtime.signature(sessions[0], "outputs")):
        raise BnfoldError("the model has bfloat16 outputs, which onnxruntime's Python API cannot return")
    difference = _signature_difference(*sessions)
    if difference:
        report.equivalent, report.notes = False, [difference]
        report.seconds = time.perf_counter() - start
        return report
    specs, report.notes = input_specs(runtime.input_declarations(sessions[0]), input_shapes or {})
    if inputs:
        feeds = [feed for path in inputs for feed in load_input_sets(Path(path), specs)]
        report.inputs = [{"name": n, "source": ", ".join(map(str, inputs))} for n in specs]
    else:
        feeds = [generate_inputs(specs, np.random.default_rng([seed, t]), int_range) for t in range(trials)]
        report.inputs = describe_inputs(specs)
    report.trials = len(feeds)
    comparisons: dict[str, list[OutputComparison]] = {}
    output_names = [name for name, _ in runtime.signature(sessions[0], "outputs")]
    references = []
    for t, feed in enumerate(feeds, 1):
        progress(f"trial {t} of {len(feeds)}")
        labels = (report.reference, report.candidate)
        want, got = (runtime.run_session(s, feed, label) for s, label in zip(sessions, labels))
        references.append(want)
        for name, w, g in zip(output_names, want, got):
            comparisons.setdefault(name, []).append(compare(name, w, g, atol, rtol))
    report.outputs = [worst(trial_results) for trial_results in comparisons.values()]
    if not all(o.passed for o in report.outputs) and atol is None:
        progress("measuring the reference's own float32 noise")
        judge_by_noise(report.outputs, reference, feeds, references, providers)
    report.equivalent = all(o.passed for o in report.outputs)
    report.seconds = time.perf_counter() - start
    return report


def _signature_difference(reference, candidate) -> str:
    for kind in ("inputs", "outputs"):
        ref, cand = runtime.signature(reference, kind), runtime.signature(candidate, kind)
        if sorted(ref) != sorted(cand):
            return f"the models' {kind} differ: reference {ref}, candidate {cand}"
    return ""
