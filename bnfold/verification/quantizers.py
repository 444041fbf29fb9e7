"""What a fold with `--requantize` is judged against: the original with the quantizers the fold
removed bypassed (bnfold.folding.quantized).

Such a fold treats `Conv → QuantizeLinear → DequantizeLinear → BN` as if the BN had been folded
before quantizing: the pair goes, so the candidate computes the original *without* that
rounding of the conv's output to its grid. Compared with the original as it is, every tensor
after the pair differs by up to half a step of its grid (more where it clipped), and the
quantizers after it flip; no tolerance tells that from a mistake. Compared with the original
with the pair bypassed (its QuantizeLinear's input read wherever its DequantizeLinear's output
was), a correct fold agrees within float noise, and a mistake in it still shows.

The pairs bypassed are the reference's QuantizeLinear → DequantizeLinear pairs on one grid
whose two output names the candidate does not have: the ones the fold took out (bnfold keeps
every other name). A pair that quantizes a constant (a BN's scale, which quantize_static
quantizes as a weight) is not one: it went with the BN it fed. A candidate that lacks a pair
which clips at zero is not equivalent, whatever its numbers: that pair held a Relu
quantize_static fused into it, and the bypassed reference would lack the Relu too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.graph.protos import all_names, is_onnx_op, node_label
from bnfold.graph.quantizers import INTEGER_RANGES, clips_at_zero
from bnfold.io.view import exposing


@dataclass
class Bypass:
    """The reference to judge a --requantize fold against, and what the verdict says of it."""

    reference: onnx.ModelProto | Path | str
    note: str | None = None  # which pairs were bypassed
    refusal: str | None = None  # why the candidate cannot be equivalent, whatever its numbers
    ranges: list[tuple[str, str, float, float]] = field(default_factory=list)  # (quantizer, its input, lo, hi)

    def clipped(self, feeds: list[dict], providers) -> str | None:
        """How much of their inputs the removed quantizers clipped on `feeds` (per-tensor ones):
        there the fold differs from the original by more than half a step, as a fold before
        quantizing would."""
        if not self.ranges:
            return None
        from bnfold.verification.runtime import make_session, run_named

        model = onnx.ModelProto()
        model.CopyFrom(self.reference)
        exposing(model, [n for _, n, _, _ in self.ranges])
        session = make_session(model, providers=providers)
        names = [n for _, n, _, _ in self.ranges]
        outside, total = np.zeros(len(names)), np.zeros(len(names))
        for feed in feeds:
            got = run_named(session, feed, "the reference with the removed quantizers bypassed", names)
            for i, (_, name, lo, hi) in enumerate(self.ranges):
                values = np.asarray(got[name], dtype=np.float64)
                outside[i] += np.count_nonzero((values < lo) | (values > hi))
                total[i] += values.size
        share = outside / np.maximum(total, 1)
        worst = int(np.argmax(share))
        if not outside.any():
            return "the removed quantizers clipped none of their inputs on these trials"
        return (
            f"the removed quantizers clipped {outside.sum() / max(total.sum(), 1):.2%} of their inputs on these "
            f"trials (most: {share[worst]:.2%} at {self.ranges[worst][0]}): there the fold differs from the "
            "original by more than half a step, as folding before quantizing would"
        )


def bypass_removed(reference: onnx.ModelProto | Path | str, candidate: onnx.ModelProto | Path | str) -> Bypass:
    """The reference with the pairs the candidate lacks bypassed, and a note; the reference as
    given when there is none; a refusal (why the candidate is not equivalent) when a pair it
    lacks clips at zero: that pair held an activation (bnfold.graph.quantizers), and no rounding
    explains its absence."""
    theirs = (
        candidate if isinstance(candidate, onnx.ModelProto) else onnx.load(str(candidate), load_external_data=False)
    )
    present = set(all_names(theirs.graph))
    ours = reference if isinstance(reference, onnx.ModelProto) else onnx.load(str(reference))
    producer = {out: node for node in ours.graph.node for out in node.output if out}
    # a parameter's pair (quantize_static quantizes a BN's scale) goes with the BN it fed: not a removal
    parameters = {t.name for t in ours.graph.initializer} | {
        n.output[0] for n in ours.graph.node if is_onnx_op(n, "Constant") and n.output
    }
    pairs = []
    for node in ours.graph.node:
        quantizer = producer.get(node.input[0]) if is_onnx_op(node, "DequantizeLinear") and node.input else None
        if quantizer is None or not is_onnx_op(quantizer, "QuantizeLinear") or quantizer.input[0] in parameters:
            continue
        if quantizer.output[0] not in present and node.output[0] not in present:
            pairs.append((quantizer, node))
    if not pairs:
        return Bypass(reference)
    constants = _constant_values(ours)
    ranges = []
    for quantizer, _ in pairs:
        zero = quantizer.input[2] if len(quantizer.input) > 2 and quantizer.input[2] else None
        value = constants.get(zero) if zero else None
        if (zero is None or value is not None) and clips_at_zero(value):
            return Bypass(reference, refusal=(
                f"the candidate lacks {node_label(quantizer)} of the reference, which clips at zero (its zero "
                "point is the end of its range): it held an activation, and removing it changes the function"
            ))  # fmt: skip
        scale = constants.get(quantizer.input[1])
        limits = INTEGER_RANGES.get(value.dtype) if value is not None else None
        if scale is not None and limits is not None and scale.size == 1 and value.size == 1:
            step, z = float(scale.reshape(())), float(value.reshape(()))
            ranges.append((node_label(quantizer), quantizer.input[0], (limits[0] - z) * step, (limits[1] - z) * step))
    bypassed = onnx.ModelProto()
    bypassed.CopyFrom(ours)
    renamed = {dequantizer.output[0]: quantizer.input[0] for quantizer, dequantizer in pairs}
    gone = {id(n) for pair in pairs for n in pair}
    kept = [n for n in ours.graph.node if id(n) not in gone]
    del bypassed.graph.node[:]
    for node in kept:
        copy = bypassed.graph.node.add()
        copy.CopyFrom(node)
        copy.input[:] = [renamed.get(name, name) for name in copy.input]
    for output in bypassed.graph.output:
        if output.name in renamed:  # a graph output stays: through an Identity of the bypassed tensor
            bypassed.graph.node.add().CopyFrom(onnx.helper.make_node("Identity", [renamed[output.name]], [output.name]))
    labels = ", ".join(node_label(q) for q, _ in pairs[:3]) + (f" and {len(pairs) - 3} more" if len(pairs) > 3 else "")
    note = (
        f"--requantize: judged against the original with the {len(pairs)} quantizer pair"
        f"{'s' if len(pairs) != 1 else ''} the fold removed bypassed ({labels})"
    )
    return Bypass(bypassed, note, ranges=ranges)


def _constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The values of the initializers, of Constant nodes and of Casts and Identities of those: a
    quantizer's scale and zero point as PyTorch exports them (`Constant → Cast`)."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if is_onnx_op(node, "Constant") and node.output and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif is_onnx_op(node, "Identity") and node.input and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
        elif is_onnx_op(node, "Cast") and node.input and node.input[0] in values:
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is not None:
                values[node.output[0]] = values[node.input[0]].astype(onnx.helper.tensor_dtype_to_np_dtype(to))
    return values
