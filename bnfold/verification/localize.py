"""Which tensor first goes wrong: run when an output fails, paid for only then.

bnfold keeps every BN's output name (the linear op takes it over), so a folded model and its
original share an intermediate tensor after every fold. The tensors both models produce with
one name, shape and type are compared in the reference's graph order, under the same policy as
outputs (with a second look at the model's own noise: every parameter rounded the other way), on
the input of a failing trial.
They are compared CHUNK at a time: each chunk is a pair of sessions whose outputs are just those
tensors, so memory stays bounded on large models, and the search stops at the first chunk that
holds a divergence.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from bnfold.errors import BnfoldError
from bnfold.graph.protos import node_label
from bnfold.io.view import inferred_types, whole_model, with_outputs
from bnfold.verification.precision import output_precisions
from bnfold.verification.runtime import make_session, run_named
from bnfold.verification.sites import judge_by_rerounding
from bnfold.verification.tolerance import OutputComparison, compare

CHUNK = 64  # intermediate tensors compared per pair of sessions


@dataclass
class Divergence:
    """The first shared tensor whose values differ, and the nodes that produce it."""

    tensor: str
    reference_node: str
    candidate_node: str
    comparison: OutputComparison
    fold: str | None = None  # in `optimize`: the fold that made the candidate's node

    def describe(self) -> str:
        made = f" (folded from {self.fold})" if self.fold else ""
        found = self.comparison
        if found.needed_atol is None or found.atol is None:  # no numbers to give: another shape, a type
            detail = found.reason
        else:
            detail = f"needed atol {found.needed_atol:.2e}, atol {found.atol:.0e}"
        return (
            f"first divergence at '{self.tensor}': {self.candidate_node}{made} in the candidate, "
            f"{self.reference_node} in the reference ({detail})"
        )

    def to_dict(self) -> dict:
        return {
            "tensor": self.tensor,
            "reference_node": self.reference_node,
            "candidate_node": self.candidate_node,
            "fold": self.fold,
            "needed_atol": self.comparison.needed_atol,
            "atol": self.comparison.atol,
            "max_abs_error": self.comparison.max_abs_error,
        }


def first_divergence(reference, candidate, feed: dict, providers, atol=None, rtol=None) -> Divergence | None:
    """The first tensor, in the reference's graph order, that both models produce and that
    differs beyond the policy; None if every shared tensor agrees (or none is shared)."""
    models = [_loaded(m) for m in (reference, candidate)]
    if any(m is None for m in models):
        return None  # past 2 GiB: no ModelProto can hold the model with extra outputs
    typed = [{n: t for n, t in inferred_types(m).items() if t.HasField("tensor_type")} for m in models]
    producers = [{out: node for node in m.graph.node for out in node.output if out} for m in models]
    outputs = {v.name for v in models[0].graph.output}
    shared = [  # (the models' own outputs were compared already)
        name
        for node in models[0].graph.node
        for name in node.output
        if name and name not in outputs and name in producers[1] and _same_type(typed[0], typed[1], name)
    ]
    for start in range(0, len(shared), CHUNK):
        names = shared[start : start + CHUNK]
        exposed = [with_outputs(m, names, typed[0]) for m in models]
        sessions = [make_session(m, providers=providers) for m in exposed]
        want = run_named(sessions[0], feed, "the reference")
        got = run_named(sessions[1], feed, "the candidate")
        precisions = output_precisions(exposed[0])
        results = [compare(n, want[n], got[n], atol, rtol, precisions.get(n)) for n in names]
        if not all(r.passed for r in results) and atol is None:
            judge_by_rerounding(results, exposed[0], feed, want, providers)
        failed = next((r for r in results if not r.passed), None)
        if failed is not None:
            label = [_label(p[failed.name]) for p in producers]
            return Divergence(failed.name, label[0], label[1], failed)
    return None


def _loaded(model) -> onnx.ModelProto | None:
    """A copy of the model with all its data, which this module may change; None past 2 GiB."""
    try:
        return whole_model(model)
    except BnfoldError:
        return None


def _same_type(a: dict, b: dict, name: str) -> bool:
    return name in a and name in b and a[name] == b[name]


def _label(node: onnx.NodeProto) -> str:
    return node_label(node)
