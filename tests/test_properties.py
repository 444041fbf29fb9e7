"""Property: any Conv / ConvTranspose / Gemm followed by BatchNormalization, drawn at random,
folds into a model that computes the same function (onnxruntime, optimizations off), or is
refused with the model unchanged."""

from __future__ import annotations

import numpy as np
import onnx
from builders import RELATIVE_TOLERANCE, linear_bn_model, op_types, random_inputs, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnfold


@st.composite
def linear_bn_graphs(draw):
    op = draw(st.sampled_from(["Conv", "ConvTranspose", "Gemm"]))
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float16]))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    bias = draw(st.booleans())
    if op == "Gemm":
        m, k, n = (draw(st.integers(1, 6)) for _ in range(3))
        trans_b = draw(st.integers(0, 1))
        weight = rng.normal(0, 0.5, (n, k) if trans_b else (k, n))
        bias_shape = draw(st.sampled_from([[n], [1, n], [m, n], [m, 1], []]))
        attrs = {"transB": trans_b, "alpha": draw(st.floats(0.25, 2)), "beta": draw(st.floats(0.25, 2))}
        x_shape, channels = [m, k], n
        b = rng.normal(0, 0.5, bias_shape) if bias else None
    else:
        rank = draw(st.integers(1, 3))
        group = draw(st.integers(1, 3))
        in_per, out_per = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        kernel = [draw(st.integers(1, 3)) for _ in range(rank)]
        stride = [draw(st.integers(1, 2)) for _ in range(rank)]
        dilation = [draw(st.integers(1, 2)) for _ in range(rank)]
        pads = [draw(st.integers(0, 1)) for _ in range(2 * rank)]
        attrs = {"group": group, "strides": stride, "dilations": dilation, "pads": pads}
        if op == "Conv":
            weight = rng.normal(0, 0.5, (out_per * group, in_per, *kernel))
            size = [max(d * (k - 1) + 1, 3) + draw(st.integers(0, 2)) for d, k in zip(dilation, kernel)]
        else:
            weight = rng.normal(0, 0.5, (in_per * group, out_per, *kernel))
            attrs["output_padding"] = [draw(st.integers(0, s - 1)) for s in stride]
            size = [draw(st.integers(3, 4)) for _ in range(rank)]  # pads must leave an output
        channels = out_per * group
        x_shape = [draw(st.integers(1, 2)), in_per * group, *size]
        b = rng.normal(0, 0.5, channels) if bias else None
    low_var = 0.1 if dtype == np.float16 else 0.0  # float16 cannot hold γ/√1e-5-sized weights
    params = {
        "gamma": rng.uniform(-2, 2, channels),
        "beta": rng.normal(0, 1, channels),
        "mean": rng.normal(0, 1, channels),
        "var": rng.uniform(low_var, 3, channels),
    }
    epsilon = draw(st.sampled_from([None, 1e-5, 1e-3, 0.1]))
    return linear_bn_model(
        op, weight=weight, bias=b, x_shape=x_shape, attrs=attrs, dtype=dtype, bn_params=params, epsilon=epsilon
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(linear_bn_graphs())
def test_random_linear_bn_graphs_fold_to_the_same_function(model):
    result = bnfold.fold(model)
    (outcome,) = result.report.outcomes
    if not outcome.folded:  # allowed only with the model unchanged and a reason
        assert result.model.SerializeToString() == model.SerializeToString() and outcome.reason
        return
    assert "BatchNormalization" not in op_types(result.model)
    assert_same_function_over_inputs(model, result.model)
    onnx.checker.check_model(result.model, full_check=True)


def assert_same_function_over_inputs(model: onnx.ModelProto, folded: onnx.ModelProto, draws: int = 4) -> None:
    """builders.assert_same_function's bound (a dtype's fraction of the output's scale), with the
    scale taken over several input draws: a drawn Gemm can have a single output element, and one
    input can make it cancel to near zero (a float16 example: 4e-4 out of terms near 1), which
    would turn the bound into a relative one on that near-zero value."""
    want, got = [], []
    for seed in range(1, draws + 1):
        feeds = random_inputs(model, seed)
        want.append(run(model, feeds)[0].astype(np.float64).ravel())
        got.append(run(folded, feeds)[0].astype(np.float64).ravel())
    dtype = run(model, random_inputs(model))[0].dtype
    want, got = np.concatenate(want), np.concatenate(got)
    drift = float(np.abs(got - want).max()) / max(float(np.abs(want).max()), 1e-30)
    assert drift <= RELATIVE_TOLERANCE[dtype], f"drift {drift:.3g} of output scale"


# ---- re-parameterization: random sums of branches of one tensor --------------------------------
@st.composite
def branch_sums(draw):
    """x → 2 to 4 branches (Conv of any kernel, group, dilation and padding that keeps the output
    size; BN; x itself; some scaled by a layer scale, one maybe subtracted) → Add → Relu."""
    from builders import BranchGraph

    rank = draw(st.integers(1, 3))
    channels = draw(st.sampled_from([2, 3, 4, 6]))
    stride = draw(st.sampled_from([1, 1, 2]))
    dilation = draw(st.integers(1, 2))
    centred = draw(st.booleans())  # odd kernels padded evenly: then the branches always line up
    g = BranchGraph(channels, spatial=[draw(st.integers(5, 9)) for _ in range(rank)], seed=draw(st.integers(0, 2**31)))
    kinds = ["conv"] + [
        draw(st.sampled_from(["conv", "conv", "bn", "identity"])) for _ in range(draw(st.integers(1, 3)))
    ]
    branches = []
    for kind in kinds:
        if kind == "conv" or stride != 1:
            k = draw(st.sampled_from([1, 3, 5] if centred else [1, 2, 3, 5]))
            total = dilation * (k - 1)  # pads that keep every branch's output the same size
            begins = [total // 2 if centred else draw(st.integers(0, total)) for _ in range(rank)]
            group = draw(st.sampled_from([d for d in range(1, channels + 1) if channels % d == 0]))
            branch = g.conv(
                k=k, stride=stride, dilation=dilation, group=group, pads=begins + [total - b for b in begins]
            )
        else:
            branch = g.bn() if kind == "bn" else "x"
        if draw(st.integers(0, 3)) == 0:
            branch = g.op("Mul", branch, g.const(g.rng.uniform(0.2, 1.5, (channels,) + (1,) * rank), "scale"))
        branches.append(branch)
    total = branches[0]
    for branch in branches[1:]:
        total = g.op(draw(st.sampled_from(["Add", "Add", "Sub"])), total, branch)
    return g.model(total), centred


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(branch_sums())
def test_random_branch_sums_merge_exactly_or_stay(drawn):
    model, centred = drawn
    merged, kept = bnfold.fold(model), bnfold.fold(model, reparam=False)
    if centred:  # always mergeable: the whole sum becomes one Conv
        assert op_types(merged.model) == ["Conv", "Relu"], merged.report.table()
    if merged.model == kept.model:  # nothing merged: refusals, if any, carry their reason
        assert not any(o.folded for o in merged.report.branch_merges)
        assert all(o.reason for o in merged.report.branch_merges)
        return
    assert any(o.folded for o in merged.report.branch_merges)  # the whole sum or a part of it
    assert_same_function_over_inputs(model, merged.model)
    onnx.checker.check_model(merged.model, full_check=True)
