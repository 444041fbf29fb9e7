"""The fold protocol: what a mechanism returns, and how the planner combines their answers.

A mechanism is a function of a candidate node that goes *match → named checks → plan*:

- match: is the graph around the node the shape this mechanism folds? If not, `NOT_MINE`, and
  the next mechanism is asked;
- checks: each a named function that returns the `Skip` the user reads, or None; a function
  that reads a value returns it or raises `Refused` (decide turns it into the Skip);
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
from bnfold.report import FoldOutcome


@dataclass(frozen=True)
class Skip:
    """Why a node stays: one sentence for the report."""

    reason: str


class Refused(Exception):
    """A refusal carried out of the checks nested below a mechanism: a function that reads a
    value (a weight, a BN's scale and shift, a folded weight in its dtype) returns it or raises
    `Refused(reason)`, and `decide` answers with its Skip. The one way a refusal leaves a nested
    check; predicates (`check_*`, checks.py) return a Skip or None, to be chained with `or`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.skip = Skip(reason)


def refuse_if(skip: Skip | None) -> None:
    """Raise a predicate's Skip (`refuse_if(op.check_node(node, ctx))`)."""
    if skip is not None:
        raise Refused(skip.reason)


def answer(plan: Callable[..., Answer], *args) -> Answer:
    """What a mechanism (or a check) answers, a refusal raised below it as its Skip."""
    try:
        return plan(*args)
    except Refused as refusal:
        return refusal.skip


@dataclass(frozen=True)
class NotMine:
    """The graph around the node is not this mechanism's shape; `why` says what it is instead
    ("its input comes from Relu"). When no mechanism of its role gives a Skip, `why` is that
    role's reason in the sentence the report shows (Mechanisms.refused)."""

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

    @property
    def absorbed(self) -> tuple[onnx.NodeProto, ...]:
        """Other candidates the fold takes away with the source (the BNs inside merged branches):
        the report shows each as folded into this fold's op."""
        return ()

    def outcome(self, prefix: str, op: str) -> FoldOutcome:
        """The report's row for the source (of kind `op`, its name after `prefix`: a subgraph's
        or a function's), read before the rewrite renames outputs (and turns a MatMul into a Gemm)."""
        return FoldOutcome(
            prefix + (self.source.name or self.source.output[0]),
            self.source.output[0],
            op=op,
            folded_into=", ".join(linear.name or linear.output[0] for linear in self.linears),
            folded_into_op="/".join(sorted({linear.op_type for linear in self.linears})),
            forward=self.forward,
            via=self.via,
            rounding=self.rounding,
        )

    @abstractmethod
    def rewrite(self, ctx: GraphContext) -> None:
        """Apply the fold to the graph."""


Answer = Plan | Skip | NotMine


class Role(Enum):
    """What a mechanism's Skip means for the node (a Plan always wins, NOT_MINE never counts)."""

    DECIDES = "decides"  # the node's answer: no later mechanism is asked
    BACKWARD = "backward"  # why it did not fold into what feeds it (a later one's replaces it)
    FORWARD = "forward"  # why it did not fold into what reads it


@dataclass(frozen=True)
class Mechanism:
    name: str
    plan: Callable[[onnx.NodeProto, GraphContext, int], Answer]  # (node, ctx, BN version)
    role: Role


@dataclass(frozen=True)
class Check:
    """A question about the node that plans nothing: a Skip, or None when it has nothing to say."""

    name: str
    ask: Callable[[onnx.NodeProto, GraphContext, int], Skip | None]  # (node, ctx, BN version)


@dataclass(frozen=True)
class Mechanisms:
    """What one kind of node goes through: `guards`, asked first (a Skip is the node's answer: a
    BN in training mode folds nowhere); the mechanisms of `order`; `explanations`, asked only
    when every mechanism refused (a Skip replaces the gathered reasons: a BN inside a quantized
    model); and `refused`, the reason it stays from the reasons gathered by role, or None when
    the node was no candidate after all and the report says nothing of it (most Mul/Add nodes).
    `label` names the kind in the report (the node's op type when None); `reported`: whether a
    node that stays is listed at all."""

    order: tuple[Mechanism, ...]
    refused: Callable[[onnx.NodeProto, dict[Role, Skip]], Skip | None]
    guards: tuple[Check, ...] = ()
    explanations: tuple[Check, ...] = ()
    label: str | None = None
    reported: bool = True  # whether the report lists the node when it stays


@dataclass(frozen=True)
class Pass:
    """One pass of the walk over a graph's live nodes: the tables by op type, and the order
    (from the graph's end: the branch merge, so that the largest tree of sums is merged)."""

    name: str
    tables: dict[str, Mechanisms]
    from_the_end: bool = False


def decide(node: onnx.NodeProto, mechanisms: Mechanisms, ctx: GraphContext, version: int) -> Plan | Skip | None:
    """A guard's Skip; else the first Plan in the declared order, or the Skip of a mechanism
    that decides; else an explanation's Skip, else `refused` of the reasons gathered by role (a
    Skip, or the `why` of a NotMine where the role gave no Skip)."""
    for guard in mechanisms.guards:
        if (skip := answer(guard.ask, node, ctx, version)) is not None:
            return skip
    reasons: dict[Role, Skip] = {}
    for mechanism in mechanisms.order:
        given = answer(mechanism.plan, node, ctx, version)
        if isinstance(given, NotMine):
            if given.why and mechanism.role is not Role.DECIDES:
                reasons.setdefault(mechanism.role, Skip(given.why))  # a Skip of the role replaces it
            continue
        if isinstance(given, Plan) or mechanism.role is Role.DECIDES:
            return given
        reasons[mechanism.role] = given
    for explanation in mechanisms.explanations:
        if (skip := answer(explanation.ask, node, ctx, version)) is not None:
            return skip
    return mechanisms.refused(node, reasons)
