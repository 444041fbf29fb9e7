"""Per layer: what each 16-bit fold's second rounding adds at its conv's output, with
sum-preserving rounding and with the correction (`bias_correction=True`), on real activations.

    python bench/fp16_layers.py DIR/NETWORK.onnx in|out

NETWORK.onnx is one of the float32 networks bench/fp16_heldout.py caches (draw 0, converted to
float16 as there). For every Conv → BN the fold merged: the conv's input is taken from the
unfolded float16 model run on 2 images (`in`: from the calibration distribution, `out`: not), and
each folded conv's output, computed in float64, is compared with the exact fold of the unfolded
model's parameters. Printed per layer: the mean squared error of each rounding, the part of it
that is a per-channel mean, their ratio and the rounding note; then a summary line. Needs torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from fp16_accuracy import draw
from fp16_heldout import calibration_images, other_images
from onnx import numpy_helper
from onnxconverter_common import float16

import bnfold


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def conv(x, w, b, node):
    a = attrs(node)
    pads = a.get("pads", [0, 0, 0, 0])
    assert pads[0] == pads[2] and pads[1] == pads[3], pads
    y = torch.nn.functional.conv2d(
        torch.from_numpy(x.astype(np.float64)),
        torch.from_numpy(w.astype(np.float64)),
        None if b is None else torch.from_numpy(b.astype(np.float64)),
        stride=a.get("strides", [1, 1]),
        padding=(pads[0], pads[1]),
        dilation=a.get("dilations", [1, 1]),
        groups=a.get("group", 1),
    )
    return y.numpy()


def main() -> None:
    path, kind = Path(sys.argv[1]), sys.argv[2]
    network = onnx.load(str(path))
    unfolded = float16.convert_float_to_float16(draw(network, 0), keep_io_types=True)
    plain = bnfold.fold(unfolded, bias_correction=False).model
    corrected = bnfold.fold(unfolded, bias_correction=True).model
    images = (calibration_images if kind == "in" else other_images)(np.random.default_rng(7), 2)
    u = inits(unfolded)
    producers = {o: n for n in unfolded.graph.node for o in n.output}
    bns = [n for n in unfolded.graph.node if n.op_type == "BatchNormalization"]
    convs = {}
    for bn in bns:
        c = producers.get(bn.input[0])
        if c is not None and c.op_type == "Conv":
            convs[bn.output[0]] = (c, bn)
    wanted = sorted({c.input[0] for c, _ in convs.values()})
    exposed = onnx.ModelProto()
    exposed.CopyFrom(unfolded)
    del exposed.graph.output[:]
    exposed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in wanted)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    acts = [dict(zip(wanted, sess.run(None, {"input": x[None]}))) for x in images]
    folded = {name: {n.output[0]: n for n in m.graph.node} for name, m in (("plain", plain), ("corrected", corrected))}
    params = {"plain": inits(plain), "corrected": inits(corrected)}
    rounding = {o.output: o.rounding for o in bnfold.fold(unfolded, bias_correction=True).report.outcomes}
    print("layer | group | k | C_in | mse plain | mse corr | mean² plain | mean² corr | ratio | rounding")
    totals = {"plain": 0.0, "corrected": 0.0}
    ratios, mean_shares = [], []
    for out, (c, bn) in convs.items():
        gamma, beta, mean, var = (u[n].astype(np.float64) for n in bn.input[1:5])
        eps = attrs(bn).get("epsilon", 1e-5)
        s = gamma / np.sqrt(var + eps)
        w = u[c.input[1]].astype(np.float64)
        b = u[c.input[2]].astype(np.float64) if len(c.input) > 2 and c.input[2] else np.zeros(w.shape[0])
        stats = {}
        for variant in ("plain", "corrected"):
            node = folded[variant].get(out)
            if node is None or node.op_type != "Conv":
                break
            wf = params[variant][node.input[1]]
            bf = params[variant][node.input[2]] if len(node.input) > 2 else None
            errs = []
            for a in acts:
                x = a[c.input[0]]
                exact = conv(x, w * s[:, None, None, None], (b - mean) * s + beta, c)
                errs.append(conv(x, wf, bf, node) - exact)
            e = np.concatenate(errs, axis=0)  # [N, C, H, W]
            per_channel_mean = e.mean(axis=(0, 2, 3))
            stats[variant] = ((e**2).mean(), (per_channel_mean**2).mean(), np.abs(exact).mean())
        if len(stats) < 2:
            continue
        (mp, m2p, scale), (mc, m2c, _) = stats["plain"], stats["corrected"]
        totals["plain"] += mp / scale**2
        totals["corrected"] += mc / scale**2
        ratios.append(mc / mp)
        mean_shares.append((m2p / mp, m2c / mc))
        a = attrs(c)
        print(
            f"{c.name[-40:]} | {a.get('group', 1)} | {w.shape[2]} | {w.shape[1]} | {mp:.2e} | {mc:.2e} | "
            f"{m2p:.2e} | {m2c:.2e} | {mc / mp:.2f} | {(rounding.get(out) or '')[:70]}"
        )
    print("relative mse summed over layers:", {k: f"{v:.3e}" for k, v in totals.items()})
    r, shares = np.array(ratios), np.array(mean_shares)
    finite = np.isfinite(r) & np.isfinite(shares).all(axis=1)  # float16 overflows on far inputs
    r, shares = r[finite], shares[finite]
    print(
        f"SUMMARY {path.stem} {kind}: {len(r)} corrected layers ({(~finite).sum()} overflowed), corrected/plain "
        f"MSE median {np.median(r):.2f} (range {r.min():.2f}-{r.max():.2f}), worse in {(r > 1).sum()}; "
        f"channel-mean share of MSE plain {np.median(shares[:, 0]):.2f} corrected {np.median(shares[:, 1]):.2f}"
    )


if __name__ == "__main__":
    main()
