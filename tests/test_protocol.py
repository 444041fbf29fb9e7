"""The fold protocol (bnfold.folding.plan): how the planner combines mechanisms' answers, and
that no mechanism touches the graph before its plan is applied."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import onnx
import pytest
from onnx import helper

from bnfold.folding import planner
from bnfold.folding.plan import NOT_MINE, Check, Mechanism, Mechanisms, NotMine, Plan, Refused, Role, Skip, decide
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


def test_a_refusal_raised_below_a_mechanism_is_that_mechanisms_skip():
    def nested_check(node, ctx, version):
        def read_weight():
            raise Refused("Conv weight is not constant: 'w' is computed by Mul 'm'")

        read_weight()  # no pass-back by hand: the refusal leaves every level at once
        raise AssertionError("unreachable")

    table, _ = _table(("forward", Role.FORWARD, Skip("it feeds Sigmoid")))
    table = replace(table, order=(Mechanism("backward", nested_check, Role.BACKWARD), *table.order))
    assert decide(NODE, table, None, 15) == Skip(
        "backward: Conv weight is not constant: 'w' is computed by Mul 'm' | forward: it feeds Sigmoid"
    )
    guarded = replace(table, guards=(Check("raises", nested_check),))
    assert decide(NODE, guarded, None, 15) == Skip("Conv weight is not constant: 'w' is computed by Mul 'm'")


def test_a_failed_match_says_why_when_its_role_has_no_skip():
    table, _ = _table(
        ("backward", Role.BACKWARD, NotMine("its input comes from Relu")),
        ("shape ops", Role.BACKWARD, NOT_MINE),
        ("forward", Role.FORWARD, NotMine("it feeds Sigmoid")),
    )
    assert decide(NODE, table, None, 15) == Skip("backward: its input comes from Relu | forward: it feeds Sigmoid")
    table, _ = _table(
        ("backward", Role.BACKWARD, NotMine("its input comes from Reshape")),
        ("shape ops", Role.BACKWARD, Skip("the Reshape after the Gemm moves its channels")),
        ("decides", Role.DECIDES, NotMine("ignored")),
    )
    assert decide(NODE, table, None, 15) == Skip("backward: the Reshape after the Gemm moves its channels")


def test_backward_and_forward_answer_not_mine_when_the_graph_is_not_their_shape():
    from bnfold.folding.backward import plan_backward
    from bnfold.folding.forward import plan_forward
    from bnfold.folding.sources import BatchNormSource

    model = onnx.load(str(SAMPLES / "shared_conv_output.onnx"))  # /bn: Conv (also read by Sigmoid) → BN → Relu
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    scope = ModelScope(
        model.ir_version, opset, list(model.opset_import), Names(all_names(model.graph)), TensorStore(read_tensor)
    )
    ctx = GraphContext.build(model.graph, scope)
    bn = next(n for n in model.graph.node if n.name == "/bn/BatchNormalization")
    assert plan_forward(bn, ctx) == NotMine("it feeds Relu '/Relu', not a Conv, ConvTranspose, Gemm or MatMul")
    assert isinstance(plan_backward(BatchNormSource(bn), ctx), Skip)  # its shape, but the Conv is shared
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    after_relu = helper.make_node("BatchNormalization", [relu.output[0], *bn.input[1:]], ["z"])
    assert isinstance(plan_backward(BatchNormSource(after_relu), ctx), NotMine)


def _checks(*answers: tuple[str, object], asked: list[str]) -> tuple[Check, ...]:
    def check(name, answer):
        return Check(name, lambda node, ctx, version: asked.append(name) or answer)

    return tuple(check(*a) for a in answers)


def test_a_guard_is_asked_first_and_its_skip_is_the_answer():
    table, asked = _table(("a", Role.BACKWARD, _Done()))
    guarded = replace(table, guards=_checks(("fine", None), ("training", Skip("training")), asked=asked))
    assert decide(NODE, guarded, None, 15) == Skip("training")
    assert asked == ["fine", "training"]  # no mechanism was asked


def test_an_explanation_is_asked_only_once_every_mechanism_refused():
    table, asked = _table(("a", Role.BACKWARD, Skip("no")))
    explained = replace(table, explanations=_checks(("silent", None), ("why", Skip("explained")), asked=asked))
    assert decide(NODE, explained, None, 15) == Skip("explained")
    assert asked == ["a", "silent", "why"]
    table, asked = _table(("a", Role.BACKWARD, _Done()))
    explained = replace(table, explanations=_checks(("why", Skip("explained")), asked=asked))
    assert isinstance(decide(NODE, explained, None, 15), _Done)
    assert asked == ["a"]


def test_the_branch_merge_is_a_row_of_a_table_like_every_other_mechanism():
    assert [m.name for m in planner.SUMS.order] == ["branch merge"]
    assert set(planner.MERGES.tables) == {"Add", "Sub", "Sum"} and planner.MERGES.from_the_end
    assert not planner.FOLDS.from_the_end and planner.FOLDS.tables is planner.CANDIDATES


def test_every_candidate_kind_has_a_table():
    assert set(planner.CANDIDATES) == {
        "BatchNormalization", "Mul", "Add", "Sub", "Div",
        "InstanceNormalization", "LayerNormalization", "GroupNormalization",
    }  # fmt: skip
    assert [g.name for g in planner.BATCH_NORM.guards] == ["inference mode"]
    assert [(m.name, m.role) for m in planner.BATCH_NORM.order] == [
        ("split at a Concat", Role.DECIDES),
        ("into a quantized weight", Role.DECIDES),
        ("backward", Role.BACKWARD),
        ("token MatMul, channel last", Role.BACKWARD),
        ("token MatMul without bias, channel last", Role.BACKWARD),
        ("through shape ops", Role.BACKWARD),
        ("forward, into several readers", Role.FORWARD),
        ("forward", Role.FORWARD),
        ("forward, the scale past zeros", Role.FORWARD),
    ]  # one plan per row: the whole fold and the scale alone are rows of their own
    assert [e.name for e in planner.BATCH_NORM.explanations] == ["quantized"]


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
    for one in (planner.FOLDS, planner.MERGES):  # every pass of the walk, each table of it
        for node in model.graph.node:
            if node.op_type in one.tables:
                answers.append(decide(node, one.tables[node.op_type], ctx, batch_norm_version(opset)))
    assert model.graph.SerializeToString(deterministic=True) == before
    assert any(isinstance(a, Plan) for a in answers) or path.stem in ("shared_conv_output", "qat_observer_tiny")
