"""`bnfold bench`: what folding buys at run time, measured with onnxruntime.

For the original and the folded model, with onnxruntime's graph optimizations disabled (what a
runtime without its own BatchNormalization fusion sees) and enabled (onnxruntime's default,
which fuses Conv+BN itself): the median session-creation time and the median latency of one
run. Runs of the two models alternate, so drift in the machine's speed (thermal, other load)
hits both alike. Sessions run with the default CPU thread settings unless `threads` is given.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnfold.columns import align, fit
from bnfold.errors import BnfoldError
from bnfold.io.view import weights_apart
from bnfold.verification import runtime
from bnfold.verification.inputs import DEFAULT_INT_RANGE, choose_feeds, shape_notes
from bnfold.verification.runtime import DEFAULT_PROVIDERS, load_session, run_session


@dataclass
class Timing:
    model: str  # "original" or "folded"
    optimizations: str  # "disabled" or "enabled"
    session_ms: float  # median session creation
    latency_ms: float  # median of `runs`
    latency_p90_ms: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class BenchReport:
    original: str
    folded: str | None  # None when bench folded MODEL itself into a temporary file
    runs: int
    inputs: list[dict]
    timings: list[Timing] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fold_summary: str | None = None  # when bench folded MODEL itself (into a file now deleted)

    def speedup(self, optimizations: str) -> float:
        """Original latency / folded latency (above 1: the folded model is faster)."""
        by_model = {t.model: t for t in self.timings if t.optimizations == optimizations}
        return by_model["original"].latency_ms / by_model["folded"].latency_ms

    def table(self, width: int | None = None) -> str:
        rows = [("graph optimizations", "model", "session", "latency (median)", "p90", "vs original")]
        for t in self.timings:
            ratio = self.speedup(t.optimizations)
            change = (
                "" if t.model == "original" else f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× slower"
            )
            rows.append(
                (
                    t.optimizations,
                    t.model,
                    f"{t.session_ms:.1f} ms",
                    f"{t.latency_ms:.3f} ms",
                    f"{t.latency_p90_ms:.3f} ms",
                    change,
                )
            )
        lines = align(rows, width)
        shapes = ", ".join(f"{i['name']} {'x'.join(map(str, i['shape']))}" for i in self.inputs)
        lines.append(
            fit(f"median of {self.runs} runs each, runs alternating between the models; inputs: {shapes}", width)
        )
        return "\n".join([*(fit(note, width) for note in self.notes), *lines])

    def to_dict(self) -> dict:
        return {
            "original": self.original,
            "folded": self.folded,
            "fold_summary": self.fold_summary,
            "runs": self.runs,
            "inputs": self.inputs,
            "timings": [t.to_dict() for t in self.timings],
            "speedup": {o: self.speedup(o) for o in ("disabled", "enabled")},
            "notes": self.notes,
        }


@runtime.takes_custom_ops
def bench(
    original: str | os.PathLike,
    folded: str | os.PathLike,
    *,
    runs: int = 20,
    warmup: int = 3,
    sessions: int = 3,
    input_shapes: dict[str, Sequence[int]] | None = None,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    progress: Callable[[str], None] = lambda stage: None,
) -> BenchReport:
    """Time `original` and `folded` (model files) in onnxruntime; see the module docstring."""
    if runs < 1 or warmup < 0 or sessions < 1:
        raise BnfoldError("--runs and --sessions must be at least 1, --warmup at least 0")
    paths = {"original": Path(original), "folded": Path(folded)}
    report: BenchReport | None = None
    for optimizations in ("disabled", "enabled"):
        progress(f"creating sessions, graph optimizations {optimizations}")
        created: dict[str, list[float]] = {name: [] for name in paths}
        live = {}
        for _ in range(sessions):
            for name, path in paths.items():
                start = time.perf_counter()
                live[name] = load_session(path, name, providers, optimize=optimizations == "enabled")
                created[name].append(time.perf_counter() - start)
        if report is None:  # inputs chosen as verify chooses them: sizes that run, control values
            declared = runtime.input_declarations(live["original"])
            skeleton = weights_apart(paths["original"])[0]
            runs_original = functools.partial(runtime.refusal, live["original"], label=str(paths["original"]))
            (generated,), choice = choose_feeds(
                declared, 1, 0, input_shapes or {}, DEFAULT_INT_RANGE, skeleton, runs_original
            )
            notes = shape_notes(declared, [generated], input_shapes or {}, choice)
            feed = runtime.ort_feed(generated)
            inputs = [{"name": n, "dtype": str(a.dtype), "shape": list(a.shape)} for n, a in generated.items()]
            report = BenchReport(str(paths["original"]), str(paths["folded"]), runs, inputs, notes=notes)
        progress(f"running both models {runs} times, graph optimizations {optimizations}")
        latencies: dict[str, list[float]] = {name: [] for name in paths}
        for name, session in live.items():
            run_session(session, feed, str(paths[name]))  # a failure is one clear line, not a traceback
        for i in range(warmup + runs):
            for name, session in live.items():
                start = time.perf_counter()
                session.run(None, feed)
                if i >= warmup:
                    latencies[name].append(time.perf_counter() - start)
        for name in paths:
            times = latencies[name]
            report.timings.append(
                Timing(
                    name,
                    optimizations,
                    session_ms=1e3 * statistics.median(created[name]),
                    latency_ms=1e3 * statistics.median(times),
                    latency_p90_ms=1e3 * float(np.percentile(times, 90)),
                )
            )
    return report
