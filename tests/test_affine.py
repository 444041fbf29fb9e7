"""The fold algebra, checked against the BatchNormalization formula itself."""

import ml_dtypes
import numpy as np
import pytest

from bnfold.folding.affine import cast_weights, fold_bias, fold_scale_shift, scale_weights


def test_scale_shift_is_the_batch_norm_formula():
    rng = np.random.default_rng(0)
    gamma, beta, mean = rng.normal(1, 0.3, 5), rng.normal(0, 1, 5), rng.normal(0, 1, 5)
    var, eps = rng.uniform(0.01, 3, 5), 1e-3
    x = rng.normal(0, 2, (7, 5))
    scale, shift = fold_scale_shift(gamma, beta, mean, var, eps)
    np.testing.assert_allclose(scale * x + shift, gamma * (x - mean) / np.sqrt(var + eps) + beta, rtol=1e-13)


def test_folded_bias_absorbs_the_old_bias_and_a_missing_one_is_zero():
    scale, shift = np.array([2.0, -0.5]), np.array([1.0, 3.0])
    np.testing.assert_array_equal(fold_bias(np.array([4.0, 2.0]), scale, shift), [9.0, 2.0])
    np.testing.assert_array_equal(fold_bias(None, scale, shift), shift)


def test_conv_weights_scale_along_axis_0():
    rng = np.random.default_rng(1)
    w, s = rng.normal(size=(6, 2, 3, 3)), rng.normal(size=6)
    expected = np.stack([w[c] * s[c] for c in range(6)])
    np.testing.assert_array_equal(scale_weights(w, s, axis=0), expected)


@pytest.mark.parametrize("group", [1, 2, 3])
def test_grouped_transpose_layout_scales_axis_1_per_group(group):
    # ConvTranspose weight [C_in, C_out/group, k]: row i belongs to group i // (C_in/group), and
    # column j of that group is output channel g·(C_out/group) + j.
    rng = np.random.default_rng(2)
    c_in, per_group = 6, 4
    w, s = rng.normal(size=(c_in, per_group, 3)), rng.normal(size=group * per_group)
    expected = w.copy()
    for i in range(c_in):
        g = i // (c_in // group)
        for j in range(per_group):
            expected[i, j] *= s[g * per_group + j]
    np.testing.assert_allclose(scale_weights(w, s, axis=1, group=group), expected, rtol=1e-15)


def test_wide_floats_round_to_nearest():
    w = np.random.default_rng(3).normal(size=(4, 8))
    np.testing.assert_array_equal(cast_weights(w, np.float32), w.astype(np.float32))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("axis", [0, 1])
def test_16_bit_rounding_balances_each_channel(dtype, axis):
    rng = np.random.default_rng(4)
    exact = rng.normal(0, 0.2, (16, 12, 3, 3)) if axis == 0 else rng.normal(0, 0.2, (12, 16, 3, 3))
    nearest = exact.astype(dtype)
    balanced = cast_weights(exact, dtype, axis=axis)
    assert balanced.dtype == np.dtype(dtype) and balanced.shape == exact.shape
    # Every element is one of the two representable values around its exact value: less than
    # one unit in the last place (at the exact value's binade) away from it.
    info = ml_dtypes.finfo(dtype)
    binade = np.maximum(np.floor(np.log2(np.abs(exact))), np.log2(float(info.smallest_normal)))
    ulp = 2.0 ** (binade - info.nmant)
    assert (np.abs(balanced.astype(np.float64) - exact) < ulp).all()
    moved = balanced != nearest
    assert 0 < moved.sum() < 0.1 * exact.size

    # ...and each channel's rounding errors sum no further from zero than nearest rounding's.
    def channel_sums(q):
        return np.abs(np.moveaxis(q.astype(np.float64) - exact, axis, 0).reshape(16, -1).sum(axis=1))

    assert (channel_sums(balanced) <= channel_sums(nearest) + 1e-15).all()
    assert channel_sums(balanced).mean() < 0.5 * channel_sums(nearest).mean()


@pytest.mark.parametrize("axis, group", [(0, 1), (1, 1), (1, 2)])
def test_float32_product_is_the_float64_product_rounded_once(axis, group):
    # scale_weights(dtype=float32) multiplies in float64 and rounds in one pass, with no float64
    # copy of the weight: the bits must be those of computing in float64 and casting after.
    rng = np.random.default_rng(5)
    w = rng.normal(size=(8, 4, 3, 3)).astype(np.float32)
    s = rng.normal(size=4 * group if axis == 1 else 8)
    fused = scale_weights(w, s, axis=axis, group=group, dtype=np.float32)
    two_step = scale_weights(w.astype(np.float64), s, axis=axis, group=group).astype(np.float32)
    assert fused.dtype == np.float32
    np.testing.assert_array_equal(fused.view(np.uint32), two_step.view(np.uint32))
