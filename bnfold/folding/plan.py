"""The fold protocol: what a mechanism returns, and how the planner combines their answers.

A mechanism is a function of a candidate node that goes *match → named checks → plan*:

- match: is the graph around the node the shape this mechanism folds? If not, `NOT_MINE`, and
  the next mechanism is asked;
- checks: each a named function that returns the `Skip` the user reads, or None;
- plan: the new tensors computed, the graph untouched. `Plan.rewrite` then only moves tensors
  and edges (through the index, which records what became dead for the sweep).

Which mechanisms a node is offered to, in which order, and what their refusals mean is declared
in one table per kind of node (`planner.py`), read by `decide`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import onnx

from bnfold.graph.context import GraphContext


@dataclass(frozen=True)
class Skip:
    """Why a node stays: one sentence for the report."""

    reason: str


@dataclass(frozen=True)
class NotMine:
    """The node is not this mechanism's to decide; `why` is for a reader of the code, never the
    report."""

    why: str = ""


NOT_MINE = NotMine()


class Plan(ABC):
    """A fold that passed every check, with its new tensors computed, before the graph is
    touched."""

    source: onnx.NodeProto  # the node that disappears (the BN, the Mul/Add/Sub/Div, the sum)

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


Answer = Plan | Skip | NotMine


class Role(Enum):
    """What a mechanism's Skip means for the node (a Plan always wins, NOT_MINE never counts)."""

    DECIDES = "decides"  # the node's answer: no later mechanism is asked
    BACKWARD = "backward"  # why it did not fold into what feeds it (a later one's replaces it)
    FORWARD = "forward"  # why it did not fold into what reads it
    EXPLAINS = "explains"  # asked only once all refused: its Skip, if any, is the answer


@dataclass(frozen=True)
class Mechanism:
    name: str
    plan: Callable[[onnx.NodeProto, GraphContext, int], Answer]  # (node, ctx, BN version)
    role: Role


@dataclass(frozen=True)
class Mechanisms:
    """The mechanisms one kind of node is offered to, in order, and the reason it stays when
    every one refused (from the node and the reasons by role)."""

    order: tuple[Mechanism, ...]
    refused: Callable[[onnx.NodeProto, dict[Role, Skip]], Skip]
    reported: bool = True  # whether the report lists the node when it stays


def decide(node: onnx.NodeProto, mechanisms: Mechanisms, ctx: GraphContext, version: int) -> Plan | Skip:
    """The first Plan in the declared order; else the Skip of a mechanism that decides or
    explains, else `refused` of the reasons gathered."""
    reasons: dict[Role, Skip] = {}
    for mechanism in mechanisms.order:
        if mechanism.role is Role.EXPLAINS:
            continue
        answer = mechanism.plan(node, ctx, version)
        if isinstance(answer, NotMine):
            continue
        if isinstance(answer, Plan) or mechanism.role is Role.DECIDES:
            return answer
        reasons[mechanism.role] = answer
    for mechanism in mechanisms.order:
        if mechanism.role is Role.EXPLAINS:
            answer = mechanism.plan(node, ctx, version)
            if isinstance(answer, Skip):
                return answer
    return mechanisms.refused(node, reasons)
