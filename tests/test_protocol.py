"""The fold protocol (bnfold.folding.plan): how the planner combines mechanisms' answers, and
that no mechanism touches the graph before its plan is applied."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import helper

from bnfold.folding import planner
from bnfold.folding.plan import NOT_MINE, Mechanism, Mechanisms, Plan, Role, Skip, decide
from bnfold.folding.reparam import MergeMemo, is_sum, plan_merge
from bnfold.folding.sources import batch_norm_version
from bnfold.graph.context import GraphContext, ModelScope
from bnfold.graph.protos import all_names
from bnfold.graph.tensors import Names, TensorStore
from bnfold.io.tensors import read_tensor

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
NODE = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn")


class _Done(Plan):
    source = NODE
    linears = ()

    def rewrite(self, ctx):
        raise AssertionError("decide never applies a plan")


def _table(*answers: tuple[str, Role, object]) -> tuple[Mechanisms, list[str]]:
    """Mechanisms that answer as given and log that they were asked."""
    asked: list[str] = []

    def mechanism(name, role, answer):
        def plan(node, ctx, version):
            asked.append(name)
            return answer

        return Mechanism(name, plan, role)

    refused = Mechanisms(
        order=tuple(mechanism(*a) for a in answers),
        refused=lambda node, why: Skip(" | ".join(f"{role.value}: {skip.reason}" for role, skip in why.items())),
    )
    return refused, asked


def test_the_first_plan_wins_and_later_mechanisms_are_not_asked():
    done = _Done()
    table, asked = _table(("a", Role.BACKWARD, Skip("no")), ("b", Role.FORWARD, done), ("c", Role.DECIDES, Skip("x")))
    assert decide(NODE, table, None, 15) is done
    assert asked == ["a", "b"]


def test_not_mine_is_passed_over_and_a_deciding_skip_ends_the_search():
    table, asked = _table(
        ("a", Role.DECIDES, NOT_MINE), ("b", Role.DECIDES, Skip("decided")), ("c", Role.FORWARD, _Done())
    )
    assert decide(NODE, table, None, 15) == Skip("decided")
    assert asked == ["a", "b"]


def test_refusals_combine_by_role_and_a_later_one_replaces_an_earlier_one_of_its_role():
    table, _ = _table(
        ("a", Role.BACKWARD, Skip("first")),
        ("b", Role.BACKWARD, Skip("second")),
        ("c", Role.FORWARD, Skip("forward")),
        ("d", Role.BACKWARD, NOT_MINE),
    )
    assert decide(NODE, table, None, 15) == Skip("backward: second | forward: forward")


def test_an_explanation_is_asked_only_once_every_mechanism_refused():
    table, asked = _table(("why", Role.EXPLAINS, Skip("explained")), ("a", Role.BACKWARD, Skip("no")))
    assert decide(NODE, table, None, 15) == Skip("explained")
    assert asked == ["a", "why"]
    table, asked = _table(("why", Role.EXPLAINS, Skip("explained")), ("a", Role.BACKWARD, _Done()))
    assert isinstance(decide(NODE, table, None, 15), _Done)
    assert asked == ["a"]


def test_every_candidate_kind_has_a_table():
    assert set(planner.CANDIDATES) == {
        "BatchNormalization", "Mul", "Add", "Sub", "Div",
        "InstanceNormalization", "LayerNormalization", "GroupNormalization",
    }  # fmt: skip
    assert [m.name for m in planner.BATCH_NORM.order][:2] == ["inference mode", "split at a Concat"]


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.onnx")), ids=lambda p: p.stem)
def test_no_mechanism_touches_the_graph_before_its_plan_is_applied(path):
    # Every candidate of every sample is planned (folds, refusals and branch merges); the graph
    # must be byte-identical afterwards, and some plans must have been made.
    model = onnx.load(str(path))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    scope = ModelScope(
        model.ir_version, opset, list(model.opset_import), Names(all_names(model.graph)), TensorStore(read_tensor)
    )
    ctx = GraphContext.build(model.graph, scope)
    before = model.graph.SerializeToString(deterministic=True)
    answers = []
    for node in model.graph.node:
        if node.op_type in planner.CANDIDATES:
            answers.append(decide(node, planner.CANDIDATES[node.op_type], ctx, batch_norm_version(opset)))
        if is_sum(node):
            answers.append(plan_merge(node, ctx, batch_norm_version(opset), MergeMemo()))
    assert model.graph.SerializeToString(deterministic=True) == before
    assert any(isinstance(a, Plan) for a in answers) or "shared_conv_output" in path.stem
