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
every other name). A candidate that lacks a pair which clips at zero is not equivalent, whatever
its numbers: that pair held a Relu quantize_static fused into it, and the bypassed reference
would lack the Relu too.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import numpy_helper

from bnfold.graph.protos import all_names, is_onnx_op, node_label
from bnfold.graph.quantizers import clips_at_zero


def bypass_removed(reference: onnx.ModelProto | Path, candidate: onnx.ModelProto | Path):
    """(the reference with the pairs the candidate lacks bypassed, a note, a refusal): the
    reference as given and no note when there is none; a refusal (why the candidate is not
    equivalent) when a pair it lacks clips at zero: that pair held an activation
    (bnfold.graph.quantizers), and no rounding explains its absence."""
    theirs = (
        candidate if isinstance(candidate, onnx.ModelProto) else onnx.load(str(candidate), load_external_data=False)
    )
    present = set(all_names(theirs.graph))
    ours = reference if isinstance(reference, onnx.ModelProto) else onnx.load(str(reference))
    producer = {out: node for node in ours.graph.node for out in node.output if out}
    pairs = []
    for node in ours.graph.node:
        quantizer = producer.get(node.input[0]) if is_onnx_op(node, "DequantizeLinear") and node.input else None
        if quantizer is None or not is_onnx_op(quantizer, "QuantizeLinear"):
            continue
        if quantizer.output[0] not in present and node.output[0] not in present:
            pairs.append((quantizer, node))
    if not pairs:
        return reference, None, None
    constants = {t.name: t for t in ours.graph.initializer}
    for quantizer, _ in pairs:
        zero = quantizer.input[2] if len(quantizer.input) > 2 and quantizer.input[2] else None
        value = numpy_helper.to_array(constants[zero]) if zero in constants else None
        if (zero is None or value is not None) and clips_at_zero(value):
            why = (
                f"the candidate lacks {node_label(quantizer)} of the reference, which clips at zero (its zero "
                "point is the end of its range): it held an activation, and removing it changes the function"
            )
            return reference, None, why
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
    return bypassed, note, None
