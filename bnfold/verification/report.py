"""The verdict of `verify`: per output, the worst trial's figures; as a table and as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from bnfold.columns import align, fit
from bnfold.verification.localize import Divergence
from bnfold.verification.tolerance import NOISE_FACTOR, OutputComparison


@dataclass
class VerifyReport:
    reference: str
    candidate: str
    equivalent: bool = True
    trials: int = 0
    seed: int = 0
    providers: list[str] = field(default_factory=list)
    inputs: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    outputs: list[OutputComparison] = field(default_factory=list)
    sites: list[OutputComparison] = field(default_factory=list)  # each rewrite, judged in isolation
    first_divergence: Divergence | None = None  # with localization, when an output failed
    seconds: float = 0.0

    def __bool__(self) -> bool:
        """The verdict: `if bnfold.verify(a, b):` reads as "if they are equivalent"."""
        return self.equivalent

    @property
    def failed(self) -> list[OutputComparison]:
        return [o for o in self.outputs if not o.passed]

    def summary(self) -> str:
        sites = [s for s in self.sites if not s.passed]
        if self.equivalent:
            verdict = f"equivalent: all {len(self.outputs)} outputs match"
        elif not self.outputs and not sites:  # nothing compared: the notes say why (the inputs differ)
            verdict = "NOT equivalent: nothing could be compared"
        elif self.failed or not sites:
            verdict = f"NOT equivalent: {len(self.failed)} of {len(self.outputs)} outputs differ"
        else:
            verdict = f"NOT equivalent: {len(sites)} of {len(self.sites)} rewritten tensors differ"
        where = f", {len(self.sites)} rewritten tensors agree where they are made" if self.sites and not sites else ""
        trials = f" over {self.trials} trials (seed {self.seed})" if self.trials else ""
        return f"{verdict}{where}{trials} · {self.seconds:.2f} s"

    def table(self, failed_only: bool = False, brief: bool = False, width: int | None = None) -> str:
        """Notes (not with `failed_only`), one row per output (per failing output with either
        flag), failures first, no wider than `width`; the first divergence, the verdict."""
        rows = [("output", "dtype", "shape", "max abs", "rel L2", "cosine", "mismatched", "needed atol", "result")]
        outputs = self.failed if failed_only or brief else sorted(self.outputs, key=lambda o: o.passed)
        for o in [*outputs, *(s for s in self.sites if not s.passed)]:
            rows.append(
                (
                    o.name,
                    o.dtype,
                    "x".join(map(str, o.shape)) or "scalar",
                    _figure(o.max_abs_error, ".2e"),
                    _figure(o.rel_l2_error, ".2e"),
                    _figure(o.cosine_similarity, ".6f"),
                    f"{o.mismatched}/{o.elements}" if o.max_abs_error is not None else "-",
                    _figure(o.needed_atol, ".2e"),
                    _result(o),
                )
            )
        lines = align(rows, width) if rows[1:] else []
        divergence = [fit(self.first_divergence.describe(), width)] if self.first_divergence else []
        notes = [] if failed_only else [fit(note, width) for note in self.notes]
        return "\n".join([*notes, *lines, *divergence, fit(self.summary(), width)])

    def to_dict(self) -> dict:
        data = asdict(replace(self, first_divergence=None))  # the divergence has a shape of its own
        data["first_divergence"] = self.first_divergence.to_dict() if self.first_divergence else None
        data["seconds"] = round(self.seconds, 4)
        return data


def _figure(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _result(o: OutputComparison) -> str:
    if o.passed and o.explained:
        return o.explained
    if o.passed and o.noise is not None:
        noise = f"{o.precision} noise {o.noise:.1e}"
        return f"ok: within {NOISE_FACTOR:.0f}× this model's {noise} (parameters rounded the other way)"
    if o.precision == "quantized" and not o.reason:
        verdict = "ok" if o.passed else "FAIL"
        return f"{verdict}: {o.mismatched} elements off the grid's step, at most {o.steps:.0f} steps"
    tolerance = f"atol {o.atol:.0e}" + (f", abs atol {o.absolute:.0e}" if o.absolute is not None else "")
    tolerance += f", rtol {o.rtol:.0e}" if o.rtol else ""
    if o.passed:
        return f"ok ({tolerance}, {o.precision})" if o.precision != o.dtype else f"ok ({tolerance})"
    return o.reason or f"FAIL ({tolerance})"
