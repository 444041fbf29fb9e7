"""The algebra of folding a per-channel affine map into a linear op. Pure numpy, no ONNX.

At inference BatchNormalization computes, per channel c (ONNX spec, every version),

    y_c = γ_c · (x_c − μ_c) / √(σ²_c + ε) + β_c  =  s_c · x_c + t_c,
    s = γ / √(σ² + ε),   t = β − μ · s.

When x comes from a linear op x = W ∗ u + b whose output channel c is produced by the slice
W[c] alone, the two collapse into one linear op:

    W'[c] = s_c · W[c],   b'_c = s_c · b_c + t_c = (b_c − μ_c) · s_c + β_c.

Everything here runs in float64; callers cast the results back to the weight's dtype once, so
a float16 model is folded with float64 rounding, not float16 rounding.
"""

from __future__ import annotations

import numpy as np


def fold_scale_shift(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon: float
) -> tuple[np.ndarray, np.ndarray]:
    """Return (s, t) with BN(x) = s·x + t, both float64, from BN's parameters.

    The caller must have checked that var + epsilon is finite and positive.
    """
    var64 = np.asarray(var, dtype=np.float64)
    scale = np.asarray(gamma, dtype=np.float64) / np.sqrt(var64 + float(epsilon))
    shift = np.asarray(beta, dtype=np.float64) - np.asarray(mean, dtype=np.float64) * scale
    return scale, shift


def scale_weights(
    weight: np.ndarray, scale: np.ndarray, axis: int = 0, group: int = 1, dtype: np.dtype = np.float64
) -> np.ndarray:
    """Multiply each output channel's slice of `weight` by its entry of `scale`, in float64,
    rounded once to `dtype` (see product_dtype) in the same pass: no float64 copy of a large
    weight is ever made when the result is float32.

    `axis` is the weight axis that indexes output channels within a group:
    - Conv `[C_out, C_in/group, k…]`: axis 0, and `group` does not matter because axis 0
      already runs over all C_out channels in order.
    - ConvTranspose `[C_in, C_out/group, k…]`: axis 1 holds only the C_out/group channels of
      one group; the group of a row is its index along axis 0 divided by C_in/group. So output
      channel `g·(C_out/group) + j` is `weight[g-th block of rows, j]`.
    """
    w = float_operand(weight)
    scale = np.asarray(scale, dtype=np.float64)
    if axis == 0 or group == 1:
        shape = [1] * w.ndim
        shape[axis] = -1
        return _product(w, scale.reshape(shape), dtype)
    # Grouped, with channels on a later axis: view axis 0 as (group, rows per group) so each
    # group's block meets its own slice of scale.
    per_group = scale.reshape(group, -1)
    blocks = w.reshape((group, w.shape[0] // group) + w.shape[1:])
    shape = [1] * blocks.ndim
    shape[0] = group
    shape[axis + 1] = per_group.shape[1]
    return _product(blocks, per_group.reshape(shape), dtype).reshape(w.shape)


def product_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype scale_weights should return for weights of `dtype`: float32 and float64 round
    to nearest right away; 16-bit floats stay float64 for cast_weights' sum-preserving rounding."""
    dtype = np.dtype(dtype)
    return dtype if dtype in (np.float32, np.float64) else np.dtype(np.float64)


def _product(a: np.ndarray, b: np.ndarray, dtype: np.dtype) -> np.ndarray:
    out = np.empty(np.broadcast_shapes(a.shape, b.shape), dtype=dtype)
    with np.errstate(over="ignore"):  # a product beyond the dtype's range is Inf: callers refuse it
        np.multiply(a, b, out=out, dtype=np.float64, casting="same_kind")
    return out


def float_operand(values: np.ndarray) -> np.ndarray:
    """`values` as an operand of float64 arithmetic: numpy's own float types as they are (a
    product with a float64 array is computed in float64 without a float64 copy first), others
    (bfloat16 from ml_dtypes, integers) converted."""
    values = np.asarray(values)
    if values.dtype in (np.float16, np.float32, np.float64):
        return values
    return values.astype(np.float64)


def fold_bias(bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """b' = b·s + t (float64); a missing bias is zero, as in Conv's spec."""
    if bias is None:
        return np.array(shift, dtype=np.float64)
    return np.asarray(bias, dtype=np.float64) * scale + shift


def cast_weights(weight: np.ndarray, dtype: np.dtype, axis: int = 0) -> np.ndarray:
    """Round folded float64 weights to the model's `dtype` (output channels on `axis`).

    float32 and float64 round to nearest: their rounding error is far below anything else.
    For 16-bit floats (float16, bfloat16) the weights were already rounded once when the model
    was made, and nearest rounding of W·s adds a second, independent error of the same size.
    Part of it is systematic: an output channel's error is Σ δ_i x_i, whose mean over inputs is
    Σ δ_i E[x_i], and inputs after a ReLU have a positive mean. So each output channel is
    rounded *sum-preserving*: nearest first, then the elements closest to the rounding midpoint
    move to their other neighbour until the channel's errors sum as near zero as they can.
    Each element stays one of the two values nearest its exact value.
    """
    dtype = np.dtype(dtype)
    # Values beyond the dtype's range become Inf here; callers check and refuse such a fold.
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = weight.astype(dtype, copy=False)
        if dtype.itemsize > 2 or weight.size == 0:
            return rounded
        exact = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
        q = np.moveaxis(rounded, axis, 0).reshape(exact.shape)
        q = _balance_rounding(exact, q)
    moved_shape = np.moveaxis(rounded, axis, 0).shape
    return np.ascontiguousarray(np.moveaxis(q.reshape(moved_shape), 0, axis))


def _balance_rounding(exact: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per row: flip the fewest, nearest-to-midpoint roundings that bring Σ(q − exact) nearest 0."""
    error = q.astype(np.float64) - exact
    total = error.sum(axis=1, keepdims=True)
    # The other neighbour of an element lies toward its exact value, i.e. against the total.
    alternative = _step(q, upward=total < 0)
    alternative_error = alternative.astype(np.float64) - exact
    eligible = (np.sign(error) == np.sign(total)) & (q.astype(np.float64) != 0) & np.isfinite(alternative_error)
    change = np.where(eligible, alternative_error - error, 0.0)
    order = np.argsort(np.where(eligible, -np.abs(error), np.inf), axis=1, kind="stable")
    running = total + np.cumsum(np.take_along_axis(change, order, axis=1), axis=1)
    flips = np.argmin(np.abs(np.concatenate([total, running], axis=1)), axis=1)
    return _take_alternatives(q, alternative, order, flips)


def cast_conv_toward_moments(
    weight: np.ndarray, bias: np.ndarray, dtype: np.dtype, group: int, mean: np.ndarray, var: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Round a folded Conv's float64 weight [C_out, C_in/group, k…] and bias to a 16-bit `dtype`
    so that the expected squared output error of the rounding is small, given each input
    channel's mean and variance (bnfold.folding.correction says where they come from).

    Rounding W·s and b' adds δ to each weight and δ_b to each bias. For output channel o and
    inputs x with E[x_c] = m_c, Var[x_c] = v_c (taken as independent), the extra error
    Σ δ·x + δ_b has mean Σ δ·m + δ_b and variance Σ δ²·v. Nearest rounding minimizes the
    variance alone; here each row starts from nearest and moves the roundings whose move buys the
    most mean per added variance to their other neighbour, stopping where
    (Σ δ·m + δ_b)² + Σ δ²·v is least. The bias's own rounding error, known once it is rounded,
    is so cancelled through the weights (a bias correction would be rounded away again).
    """
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        rounded_bias = bias.astype(dtype)
        q = weight.astype(dtype).reshape(weight.shape[0], -1)
    exact = weight.reshape(q.shape)
    taps = q.shape[1] // weight.shape[1]
    if group == 1:  # every row reads the same inputs: one row of statistics, broadcast
        index = np.repeat(np.arange(weight.shape[1]), taps)[None, :]
    else:
        index = np.repeat(_input_channel_index(weight.shape[0], weight.shape[1], group), taps, axis=1)
    need = -(rounded_bias.astype(np.float64) - bias)
    q = _round_toward(exact, q, mean[index], var[index], need)
    return q.reshape(weight.shape), rounded_bias


def _round_toward(exact: np.ndarray, q: np.ndarray, mean: np.ndarray, var: np.ndarray, target: np.ndarray):
    """Per row: flip the roundings that bring Σ δ·mean toward `target` most cheaply in Σ δ²·var,
    as far as (Σ δ·mean − target)² + Σ δ²·var keeps falling (cast_conv_toward_moments)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        rounded = q.astype(np.float64)
        error = rounded - exact
        need = target - (error * mean).sum(axis=1)
        alternative = _step(q, upward=error < 0)
        alternative_error = alternative.astype(np.float64) - exact
        gain = (alternative_error - error) * mean
        cost = (alternative_error**2 - error**2) * var
        eligible = (gain * need[:, None] > 0) & (error != 0) & (rounded != 0) & np.isfinite(alternative_error)
        price = np.where(eligible, cost / np.abs(gain), np.inf)
        # Cheapest first. Free flips (an input of variance 0) go first, smallest step first:
        # their key is their step scaled far below any positive price.
        price = np.where(price > 0, price, np.abs(gain) * 1e-300)
    order = np.argsort(price, axis=1)
    taken_gain = np.cumsum(np.take_along_axis(np.where(eligible, gain, 0.0), order, axis=1), axis=1)
    taken_cost = np.cumsum(np.take_along_axis(np.where(eligible, cost, 0.0), order, axis=1), axis=1)
    objective = np.concatenate([need[:, None] ** 2, (need[:, None] - taken_gain) ** 2 + taken_cost], axis=1)
    return _take_alternatives(q, alternative, order, np.argmin(objective, axis=1))


def _take_alternatives(q: np.ndarray, alternative: np.ndarray, order: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Per row, the first `count` elements in `order` take their alternative value."""
    in_prefix = np.arange(q.shape[1])[None, :] < count[:, None]
    flip = np.zeros_like(in_prefix)
    np.put_along_axis(flip, order, in_prefix, axis=1)
    return np.where(flip, alternative, q)


def _step(q: np.ndarray, upward: np.ndarray) -> np.ndarray:
    """The adjacent representable value of each non-zero 16-bit float, up or down.

    float16 and bfloat16 are both sign-magnitude, so the neighbour is the bit pattern ±1: the
    magnitude grows when moving away from zero. (numpy's nextafter has no bfloat16 loop.)
    """
    bits = q.view(np.uint16).astype(np.int32)
    negative = bits >= 0x8000
    grows = upward != negative
    return np.where(grows, bits + 1, bits - 1).astype(np.uint16).view(q.dtype)


def _input_channel_index(out_channels: int, in_per_group: int, group: int) -> np.ndarray:
    """[C_out, C_in/group] → the input channel each weight element reads (grouped conv)."""
    group_of_output = np.arange(out_channels) // (out_channels // group)
    return group_of_output[:, None] * in_per_group + np.arange(in_per_group)[None, :]


def fold_input_affine(
    weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray, group: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Fold x ↦ s·x + t applied to a conv's *input* channels into the conv (float64 results).

    Conv(s·x + t) with weight W [C_out, C_in/group, k…]: output o of group g reads input channel
    c = g·(C_in/group) + i through W[o, i], so
        W'[o, i, …] = W[o, i, …] · s_c,    b'_o = b_o + Σ_{i,k} W[o, i, k] · t_c.
    Exact only without padding: a padded border reads 0, and 0 is not s·0 + t.
    A Gemm weight in [N, K] layout is the k-less case with group 1.
    """
    w = np.asarray(weight, dtype=np.float64)
    index = _input_channel_index(w.shape[0], w.shape[1], group)
    s = np.asarray(scale, dtype=np.float64)[index].reshape(index.shape + (1,) * (w.ndim - 2))
    t = np.asarray(shift, dtype=np.float64)[index]
    taps = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2)
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    return w * s, b + (taps * t).sum(axis=1)


def fold_input_affine_transposed(
    weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray, group: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Fold x ↦ s·x + t on a ConvTranspose's *input* channels into it (float64 results).

    Weight W [C_in, C_out/group, k…]: input channel i scatters through row W[i] into the outputs
    of its group, so W'[i] = W[i]·s_i and b'_o = b_o + Σ_i Σ_k W[i, j, k]·t_i over the inputs i
    of output o's group (o = g·(C_out/group) + j). Exact only where every output receives every
    tap (stride 1, no output_padding, (k − 1)·dilation cropped from each border).
    """
    w = np.asarray(weight, dtype=np.float64)
    new_weight = w * np.asarray(scale, dtype=np.float64).reshape((-1,) + (1,) * (w.ndim - 1))
    taps = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2) * np.asarray(shift, dtype=np.float64)[:, None]
    from_shift = taps.reshape(group, -1, w.shape[1]).sum(axis=1).reshape(-1)  # [C_out]
    return new_weight, from_shift + (0.0 if bias is None else np.asarray(bias, dtype=np.float64))


def channel_vector(constant: np.ndarray, rank: int, channels: int, axis: int = 1) -> np.ndarray | None:
    """The per-channel values of a constant that broadcasts along `axis` (default 1) of a
    rank-`rank` tensor with `channels` channels ([C,1,…], [1,C,1,…], a scalar for axis 1;
    [C] for the last axis), or None if it broadcasts any other way (numpy/ONNX broadcasting
    aligns shapes from the right: [C] alone lines up with the *last* axis)."""
    c = np.asarray(constant)
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    others = [d for i, d in enumerate(shape) if i != axis]
    if any(d != 1 for d in others) or shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1).astype(np.float64), (channels,)).copy()
