"""What a fold did: one outcome per BatchNormalization node (and per folded Mul/Add/Sub/Div),
and how to show it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from bnfold.columns import align, fit

REMOVED = "removed (--requantize)"  # in an outcome's `via`: the fold took a quantizer out

BRANCH_MERGE = "branch merge"  # FoldOutcome.op of a sum of branches merged into one Conv


@dataclass(frozen=True)
class FoldOutcome:
    """One BatchNormalization (or per-channel Mul/Add/Sub/Div) node: folded into
    `folded_into`, or kept for `reason`."""

    node: str  # the node's name, or its output's name when the node has none
    output: str
    op: str = "BatchNormalization"
    folded_into: str | None = None  # the linear node's name (or output name), when folded
    folded_into_op: str | None = None
    forward: bool = False  # folded into the op it feeds (BN → Conv), not the one feeding it
    via: str | None = None  # "split at Concat 'c'" / "through Transpose 't'", when not direct
    reason: str | None = None
    rounding: str | None = None  # 16-bit weights: "bias correction, E[x] from …" or the fallback

    @property
    def folded(self) -> bool:
        return self.folded_into is not None


@dataclass
class FoldReport:
    outcomes: list[FoldOutcome] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    ops_before: dict[str, int] = field(default_factory=dict)  # node count per op type, subgraphs too
    ops_after: dict[str, int] = field(default_factory=dict)
    dropped_value_info: list[str] = field(default_factory=list)  # stale annotations (checker.check_input)
    repairs: list[str] = field(default_factory=list)  # technicalities repaired, as sentences (checker)

    @property
    def changed(self) -> bool:
        """Whether the fold rewrote anything (dropped annotations do not count)."""
        return any(o.folded for o in self.outcomes) or self.ops_before != self.ops_after

    def ops_changed(self) -> dict[str, tuple[int, int]]:
        """op type → (before, after), for the op types whose count the fold changed."""
        kinds = sorted(set(self.ops_before) | set(self.ops_after))
        counts = {k: (self.ops_before.get(k, 0), self.ops_after.get(k, 0)) for k in kinds}
        return {k: v for k, v in counts.items() if v[0] != v[1]}

    @property
    def batch_norms(self) -> list[FoldOutcome]:
        return [o for o in self.outcomes if o.op == "BatchNormalization"]

    @property
    def channel_affines(self) -> list[FoldOutcome]:
        """Folded Mul/Add/Sub/Div nodes (those that do not fold are not candidates)."""
        return [o for o in self.outcomes if o.op in ("Mul", "Add", "Sub", "Div")]

    @property
    def runtime_normalizations(self) -> list[FoldOutcome]:
        """Instance/Layer/GroupNormalization nodes: never folded, listed with the reason."""
        return [o for o in self.outcomes if o.op.endswith("Normalization") and o.op != "BatchNormalization"]

    @property
    def branch_merges(self) -> list[FoldOutcome]:
        """Sums of parallel branches merged into one Conv (bnfold.folding.reparam), one per sum."""
        return [o for o in self.outcomes if o.op == BRANCH_MERGE]

    @property
    def folded(self) -> int:
        """Folded BatchNormalization nodes."""
        return sum(o.folded for o in self.batch_norms)

    @property
    def skipped(self) -> int:
        return len(self.batch_norms) - self.folded

    @property
    def notes(self) -> list[str]:
        """What a user should know about this fold beyond each outcome."""
        notes = list(self.repairs)
        if self.dropped_value_info:
            names = ", ".join(f"'{n}'" for n in self.dropped_value_info[:3])
            more = f" and {len(self.dropped_value_info) - 3} more" if len(self.dropped_value_info) > 3 else ""
            count = len(self.dropped_value_info)
            which = "annotation that contradicts the graph or has no type" if count == 1 else (
                "annotations that contradict the graph or have no type")  # fmt: skip
            notes.append(
                f"dropped {count} value_info {which} ({names}{more}): onnx.checker refuses such annotations, "
                "and they are not what the model computes"
            )
        removed = sum(REMOVED in (o.via or "") for o in self.outcomes)
        if removed:
            notes.append(
                f"{removed} quantizer{'s' if removed != 1 else ''} removed (--requantize): each BN behind one was "
                "folded as if before quantizing, which is not exact; verification judges the fold against the "
                "original with those quantizers bypassed"
            )
        rounded = [o for o in self.outcomes if o.folded and o.rounding]
        if rounded:
            corrected = sum("bias correction" in o.rounding for o in rounded)  # a split Concat may mix
            folds = f"{len(rounded)} fold" + ("s" if len(rounded) != 1 else "")
            notes.append(
                f"16-bit weights: {folds} rounded their weights a second time "
                f"({corrected} with bias correction, {len(rounded) - corrected} sum-preserving only); "
                "folding the float32 model before converting it to float16 rounds them once (docs/folding.md)"
            )
        return notes

    def summary(self) -> str:
        affines = f" and {len(self.channel_affines)} Mul/Add/Sub/Div" if self.channel_affines else ""
        merged = sum(o.folded for o in self.branch_merges)
        merges = f"; merged {merged} sums of branches" if merged else ""
        return (
            f"folded {self.folded} of {len(self.batch_norms)} BatchNormalization nodes{affines}{merges}"
            f" · {_megabytes(self.bytes_before)} → {_megabytes(self.bytes_after)}"
            f" · {self.seconds:.2f} s"
        )

    def provenance(self) -> str:
        """What the written model's `bnfold` metadata entry says: the version and what it folded,
        nothing that changes from run to run (the same input gives the same bytes)."""
        from bnfold import __version__

        return f"bnfold {__version__}: " + self.summary().split(" · ")[0]

    def table(self, brief: bool = False, width: int | None = None) -> str:
        """Aligned rows for a terminal, no wider than `width`: node, result, detail, what was
        skipped first (with `brief`, only that); then the summary line."""
        rows = [("node", "result", "detail")]
        for o in sorted(self.outcomes, key=lambda o: o.folded):  # stable: graph order within each
            if brief and o.folded:
                continue
            label = o.node if o.op == "BatchNormalization" else f"{o.node} ({o.op})"
            if o.op == BRANCH_MERGE and o.folded:
                rows.append((label, "merged", f"{o.via} into {o.folded_into_op} {o.folded_into}"))
            elif o.folded:
                where = "into the following" if o.forward else "into"
                via = f" ({o.via})" if o.via else ""
                rows.append((label, "folded", f"{where} {o.folded_into_op} {o.folded_into}{via}"))
            else:
                rows.append((label, "skipped", o.reason or ""))
        changed = self.ops_changed()
        ops = ["ops: " + ", ".join(f"{k} {a} → {b}" for k, (a, b) in changed.items())] if changed else []
        notes = [fit(f"note: {note}", width) for note in self.notes]
        lines = align(rows, width) if len(rows) > 1 else []
        return "\n".join([*lines, *(fit(line, width) for line in ops), *notes, fit(self.summary(), width)])

    def to_dict(self) -> dict:
        return {
            "summary": {
                "batch_normalization_nodes": len(self.batch_norms),
                "folded": self.folded,
                "skipped": self.skipped,
                "channel_affines_folded": len(self.channel_affines),
                "branch_merges": sum(o.folded for o in self.branch_merges),
                "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after,
                "seconds": round(self.seconds, 4),
            },
            "op_counts": {
                "before": self.ops_before,
                "after": self.ops_after,
                "changed": {k: {"before": a, "after": b} for k, (a, b) in self.ops_changed().items()},
            },
            "batch_normalizations": [_outcome_dict(o) for o in self.batch_norms],
            "channel_affines": [_outcome_dict(o) for o in self.channel_affines],
            "runtime_normalizations": [_outcome_dict(o) for o in self.runtime_normalizations],
            "branch_merges": [_outcome_dict(o) for o in self.branch_merges],
            "notes": self.notes,
        }


def _outcome_dict(outcome: FoldOutcome) -> dict:
    return {**asdict(outcome), "status": "folded" if outcome.folded else "skipped"}


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
