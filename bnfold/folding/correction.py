"""Bias correction of a folded 16-bit weight's rounding (data-free, as in Nagel et al., ICCV 2019,
"Data-Free Quantization Through Weight Equalization and Bias Correction").

A float16 or bfloat16 fold rounds W·s to the weight's type once more: W' = W·s + ΔW, with ΔW known
exactly (the product is computed in float64). Output channel o then carries the extra term
Σ ΔW[o, i, k]·x_i, whose expected value Σ ΔW[o, i, k]·E[x_i] acts as a bias after a ReLU (inputs
have a positive mean). Subtracting that expectation from the new bias removes it.

E[x_i] comes, without data, from the BatchNormalization that produced the conv's input: at
inference its output in channel i is, to the extent its running statistics describe its inputs,
normal with mean β_i and standard deviation |γ_i|; an activation between them is taken in closed
form (ReLU, Clip/ReLU6: E[clip(z, a, b)] = a + E[relu(z − a)] − E[relu(z − b)] with
E[relu(z)] = μΦ(μ/σ) + σφ(μ/σ)). Where no such producer is found, the fold keeps today's
sum-preserving rounding alone (affine.cast_weights) and the report says so.

Off by default (`--bias-correction`, `fold(..., bias_correction=True)`): measured against the
float32 networks (BENCHMARKS.md) it brought the folded float16 models from 0.89× to 0.71× of the
unfolded model's deviation on a MobileNet, 1.28× to 1.25× on MobileNetV2 and 0.90× to 0.88× on an
EfficientNet, but cost 1.3% on an Inception and 0.6% on ResNet-50: not the "never costs accuracy"
that on-by-default needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx

from bnfold.graph.constants import NotConstant
from bnfold.graph.context import GraphContext
from bnfold.graph.protos import is_onnx_op, node_label

SIXTEEN_BITS = {np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)}


@dataclass(frozen=True)
class InputMean:
    """E[x] per input channel of a linear op, and where it came from (for the report)."""

    mean: np.ndarray
    source: str


def record_batch_norm(ctx: GraphContext, bn: onnx.NodeProto, gamma: np.ndarray, beta: np.ndarray) -> None:
    """Remember the distribution of a BN's output (mean β, standard deviation |γ|), by the name
    the tensor keeps after the BN is folded away."""
    ctx.scope.moments[bn.output[0]] = (np.asarray(beta, np.float64), np.abs(np.asarray(gamma, np.float64)), bn)


def expected_input(ctx: GraphContext, name: str) -> InputMean | None:
    """E[x] per channel of tensor `name`: a recorded BN output, possibly through one ReLU or
    Clip; None when unknown."""
    activation = ctx.index.producer(name)
    if name in ctx.scope.moments:
        mean, _, bn = ctx.scope.moments[name]
        return InputMean(mean, f"the output of {node_label(bn)}")
    if activation is None or not activation.input or activation.input[0] not in ctx.scope.moments:
        return None
    mu, sigma, bn = ctx.scope.moments[activation.input[0]]
    if is_onnx_op(activation, "Relu"):
        low, high = 0.0, math.inf
    elif is_onnx_op(activation, "Clip"):
        bounds = _clip_bounds(ctx, activation)
        if bounds is None:
            return None
        low, high = bounds
    else:
        return None
    if not math.isfinite(low):
        return None
    mean = low + _clipped_mean(mu, sigma, low) - _clipped_mean(mu, sigma, high)
    return InputMean(mean, f"{node_label(bn)} through {node_label(activation)}")


def corrected_bias(
    weight64: np.ndarray, rounded: np.ndarray, bias64: np.ndarray, group: int, input_mean: np.ndarray
) -> np.ndarray:
    """b' − Σ ΔW·E[x] for a Conv weight [C_out, C_in/group, k…] (module docstring)."""
    delta = rounded.astype(np.float64) - weight64
    out_channels, per_group = delta.shape[:2]
    taps = delta.reshape(out_channels, per_group, -1).sum(axis=2)  # [C_out, C_in/group]
    group_of = np.arange(out_channels) // (out_channels // group)
    channel = group_of[:, None] * per_group + np.arange(per_group)[None, :]
    return bias64 - (taps * input_mean[channel]).sum(axis=1)


def _clip_bounds(ctx: GraphContext, clip: onnx.NodeProto) -> tuple[float, float] | None:
    low = next((a.f for a in clip.attribute if a.name == "min"), None)
    high = next((a.f for a in clip.attribute if a.name == "max"), None)
    try:
        if len(clip.input) > 1 and clip.input[1]:
            low = float(ctx.constant(clip.input[1]))
        if len(clip.input) > 2 and clip.input[2]:
            high = float(ctx.constant(clip.input[2]))
    except (NotConstant, TypeError, ValueError):
        return None
    return (-math.inf if low is None else low), (math.inf if high is None else high)


def _clipped_mean(mu: np.ndarray, sigma: np.ndarray, threshold: float) -> np.ndarray:
    """E[relu(z − threshold)] for z ~ N(mu, sigma²), per channel (0 for an infinite threshold)."""
    if not math.isfinite(threshold):
        return np.zeros_like(mu)
    m = mu - threshold
    safe = np.where(sigma > 0, sigma, 1.0)
    ratio = m / safe
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(ratio / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * ratio**2) / math.sqrt(2.0 * math.pi)
    return np.where(sigma > 0, m * cdf + safe * pdf, np.maximum(m, 0.0))
