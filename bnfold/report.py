"""What a fold did: one outcome per BatchNormalization node, and how to show it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class BatchNormOutcome:
    """One BatchNormalization node: folded into `folded_into`, or kept for `reason`."""

    node: str  # the node's name, or its output's name when the node has none
    output: str
    folded_into: str | None = None  # the linear node's name (or output name), when folded
    folded_into_op: str | None = None
    reason: str | None = None

    @property
    def folded(self) -> bool:
        return self.folded_into is not None


@dataclass
class FoldReport:
    outcomes: list[BatchNormOutcome] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0

    @property
    def folded(self) -> int:
        return sum(o.folded for o in self.outcomes)

    @property
    def skipped(self) -> int:
        return len(self.outcomes) - self.folded

    def summary(self) -> str:
        return (
            f"folded {self.folded} of {len(self.outcomes)} BatchNormalization nodes"
            f" · {_megabytes(self.bytes_before)} → {_megabytes(self.bytes_after)}"
            f" · {self.seconds:.2f} s"
        )

    def table(self) -> str:
        """Aligned rows for a terminal: node, result, detail; then the summary line."""
        rows = [("BatchNormalization", "result", "detail")]
        for o in self.outcomes:
            rows.append((o.node, "folded", f"into {o.folded_into_op} {o.folded_into}") if o.folded else (o.node, "skipped", o.reason or ""))
        width = [max(len(r[i]) for r in rows) for i in range(2)]
        if not self.outcomes:
            return self.summary()
        lines = [f"{r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]}".rstrip() for r in rows]
        return "\n".join([*lines, self.summary()])

    def to_dict(self) -> dict:
        return {
            "summary": {
                "batch_normalization_nodes": len(self.outcomes),
                "folded": self.folded,
                "skipped": self.skipped,
                "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after,
                "seconds": round(self.seconds, 4),
            },
            "batch_normalizations": [
                {**asdict(o), "status": "folded" if o.folded else "skipped"} for o in self.outcomes
            ],
        }


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
