"""What a fold plan is, and what a refusal is."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import onnx

from bnfold.graph.context import GraphContext


@dataclass(frozen=True)
class Skip:
    """Why a node stays: one sentence for the report."""

    reason: str


class Plan(ABC):
    """A fold that passed every check, with its new tensors computed, before the graph is
    touched. `rewrite` only moves tensors and edges (through the index, which records what
    became dead for the sweep)."""

    source: onnx.NodeProto  # the node that disappears (the BN, or the Mul/Add/Sub/Div)

    @property
    @abstractmethod
    def linears(self) -> tuple[onnx.NodeProto, ...]:
        """The linear ops that absorb the source."""

    @property
    def via(self) -> str | None:
        """What the fold passed through, when it was not direct ("split at Concat 'c'")."""
        return None

    @property
    def rounding(self) -> str | None:
        """For a 16-bit weight: how its second rounding was corrected (None otherwise)."""
        return None

    @property
    def forward(self) -> bool:
        """Whether the source feeds the linear op (BN → Conv) rather than following it."""
        return False

    @abstractmethod
    def rewrite(self, ctx: GraphContext) -> None:
        """Apply the fold to the graph."""
