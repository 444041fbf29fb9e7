"""Verify one model against stored outputs: what the training framework computed, or what
Polygraphy saved (`polygraphy run --save-outputs`), on stored inputs (bnfold.verification.stored).

The stored outputs are the reference. Each output the file holds is compared with the model's
output of that name under the tolerance policy of the arithmetic the model performs
(bnfold.verification.tolerance) and judged by the verdict's rules (bnfold.verification.verdict);
an output the model does not give fails. There is no reference model here: the yardstick is the
model itself with every float parameter rounded the other way, capped as for two models compared
whole, so a correct fold of a softmax over thousands of classes passes and a folding mistake
does not. A model whose own arithmetic differs from the framework's by more than that (float16
against a float32 framework, say) needs a stated tolerance (`--atol`, `--abs-atol`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.io.view import weights_apart
from bnfold.verification import runtime, stored, verdict
from bnfold.verification.inputs import check_comparable, check_feed, input_specs, load_input_sets
from bnfold.verification.precision import Precisions, value_types
from bnfold.verification.regions import Rewrite
from bnfold.verification.report import VerifyReport
from bnfold.verification.runtime import DEFAULT_PROVIDERS
from bnfold.verification.sites import Structure, Yardsticks
from bnfold.verification.tolerance import compare, judge, stated, unmatched
from bnfold.verification.verdict import OUTPUT, Evidence, Measured


@runtime.takes_custom_ops
def verify_against_outputs(
    model,
    outputs: str | Path,
    *,
    inputs: Sequence[str | Path] = (),
    atol=None,
    rtol=None,
    abs_atol=None,
    input_shapes: dict[str, Sequence[int]] | None = None,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    progress: Callable[[str], None] = lambda stage: None,
) -> VerifyReport:
    """`model` (a path or ModelProto) run on the inputs stored with `outputs` (or on `inputs`,
    one trial per set, in order) against the stored outputs. Raises BnfoldError when the
    comparison cannot run; a difference is reported, not raised."""
    start = time.perf_counter()
    tolerances = stated(atol, rtol, abs_atol)
    runtime.check_providers(providers)
    progress("loading the model in onnxruntime")
    session = runtime.load_session(model, "model", providers)  # external-data locations checked first
    declared_outputs = session.get_outputs()
    for declared_output in declared_outputs:
        if not declared_output.type.startswith("tensor("):  # seq(…), optional(…), map(…)
            raise BnfoldError(
                f"output '{declared_output.name}' is {declared_output.type}: stored outputs are compared as "
                "tensors only; compare the model with the one that made them (bnfold verify A B)"
            )
    source, expected, stored_inputs = stored.load_outputs(Path(outputs), [o.name for o in declared_outputs])
    declared = runtime.input_declarations(session)
    specs = input_specs(declared, input_shapes or {})
    if inputs:
        feeds = [feed for given in inputs for feed in load_input_sets(Path(given), specs)]
    elif stored_inputs is not None:
        feeds = [check_feed(feed, specs, outputs) for feed in stored_inputs]
    elif Path(outputs).is_dir():
        feeds = load_input_sets(Path(outputs), specs)
    else:
        raise BnfoldError(f"{outputs}: holds no inputs; give the inputs they were computed on with --inputs")
    given = ", ".join(map(str, inputs)) or str(outputs)  # where the input sets came from
    feeds = check_comparable(feeds, given)
    if len(feeds) != len(expected):
        raise BnfoldError(f"{len(feeds)} input sets for {len(expected)} sets of stored outputs: give one for each")
    skeleton, arrays = weights_apart(model)
    precisions = Precisions(skeleton, value_types(skeleton), arrays)
    report = VerifyReport(source, runtime.describe(model), providers=list(providers), trials=len(feeds))
    report.providers = runtime.providers_used([session], providers)
    report.inputs = [{"name": v.name, "source": given} for v in declared]
    trials: dict[str, list] = {}
    own: list[dict] = []  # per trial, the model's own outputs: what its yardstick moves from
    for t, (feed, want) in enumerate(zip(feeds, expected), 1):
        progress(f"trial {t} of {len(feeds)}")
        got = runtime.run_named(session, feed, "the model")
        for name, value in want.items():
            trials.setdefault(name, []).append(_compare(name, value, got.get(name), tolerances, precisions))
        own.append({name: got[name] for name in want if name in got})
        del got
    progress("judging")
    structure = Structure(Rewrite(whole="stored outputs: no reference model"), skeleton, None, (arrays, {}),
                          (model, None))  # fmt: skip
    yardsticks = Yardsticks(structure, feeds, own, list(trials), providers)
    measured = [Measured(OUTPUT, judge(results)) for results in trials.values()]
    report.outputs, _ = verdict.judge([], [], measured, Evidence(yardsticks, structure))
    report.equivalent = bool(report.outputs) and all(o.passed for o in report.outputs)
    report.seconds = time.perf_counter() - start
    return report


def _compare(name, want: np.ndarray, got, tolerances, precisions: Precisions):
    """One stored output against the model's: a float output in the model's own float type
    (a float32 framework's output for a float16 model), anything else as it is."""
    if got is None:
        return unmatched(name, "the model gives no output of this name", str(want.dtype), list(want.shape))
    got = np.asarray(got)
    if want.dtype.kind == "f" and got.dtype.kind == "f":
        want = want.astype(got.dtype)
    atol, rtol, absolute = tolerances.of(name)
    return compare(name, want, got, atol, rtol, precisions.of_output(name), absolute)
