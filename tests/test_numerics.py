"""Where vector_norm deliberately differs from the naive loop, and exact mode does not."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compare_with_eager, leaf, rewrite


def naive_l2(x):
    return torch.stack([torch.sqrt((x[i] ** 2).sum()) for i in range(x.shape[0])])


def naive_linf(x):
    return torch.stack([x[i].abs().amax() for i in range(x.shape[0])])


def test_half_overflow_default_gives_the_true_norm():
    # 300**2 overflows float16; vector_norm accumulates in float32. (bfloat16 has float32's
    # range, so there the squares and vector_norm's float32 accumulator overflow together.)
    x = torch.full((3, 4), 300.0, dtype=torch.float16)
    eager = naive_l2(x)
    assert torch.isinf(eager).all()
    got = rewrite(naive_l2, x).out
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), torch.full((3,), 600.0), rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_overflow_exact_mode_keeps_inf(dtype):
    big = 300.0 if dtype == torch.float16 else 3e19
    x = torch.full((3, 4), big, dtype=dtype)
    x[1] = 1.0
    traced = compare_with_eager(naive_l2, x, exact=True, bitwise=True, backward=False)
    assert torch.isinf(traced.out[0]) and torch.isfinite(traced.out[1])


def _zero_row_input(dtype=torch.float32):
    x = torch.randn(4, 5, dtype=dtype)
    x[2] = 0
    return x


def test_zero_slice_gradient_default_is_zero_not_nan():
    x_eager, x_comp = leaf(_zero_row_input()), leaf(_zero_row_input())
    x_comp.data.copy_(x_eager.data)
    naive_l2(x_eager).sum().backward()
    assert torch.isnan(x_eager.grad[2]).all() and not torch.isnan(x_eager.grad[[0, 1, 3]]).any()
    rewrite(naive_l2, x_comp).out.sum().backward()
    assert torch.equal(x_comp.grad[2], torch.zeros(5))
    torch.testing.assert_close(x_comp.grad[[0, 1, 3]], x_eager.grad[[0, 1, 3]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_zero_slice_exact_mode_keeps_nan_gradient(dtype):
    traced = compare_with_eager(naive_l2, _zero_row_input(dtype), exact=True, bitwise=True)
    assert traced.report.rewrites[0].exact


def test_nan_and_inf_in_the_input_propagate_like_eager():
    x = torch.randn(5, 6)
    x[1, 2] = math.nan
    x[3, 0] = math.inf
    for fn in (naive_l2, naive_linf, lambda x: torch.stack([r.abs().sum() for r in x])):
        torch._dynamo.reset()
        traced = compare_with_eager(fn, x, backward=False)
        assert torch.isnan(traced.out[1]) and torch.isinf(traced.out[3])
        torch._dynamo.reset()
        compare_with_eager(fn, x, exact=True, bitwise=True, backward=False)


def test_linf_gradient_with_ties_is_split_evenly_in_both_modes():
    x = torch.tensor([[1.0, -3.0, 3.0], [2.0, 2.0, -2.0]])
    compare_with_eager(naive_linf, x)
    torch._dynamo.reset()
    compare_with_eager(naive_linf, x, exact=True, bitwise=True)


def test_default_mode_rounding_is_within_an_ulp_or_so():
    torch.manual_seed(0)
    x = torch.randn(64, 512) * 10
    got = rewrite(naive_l2, x).out
    want = naive_l2(x)
    reference = naive_l2(x.double())
    # both are about as close to float64 as each other: a rounding difference, nothing more
    assert (got.double() - reference).abs().max() <= 2 * (want.double() - reference).abs().max() + 1e-5
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)


@pytest.mark.parametrize("reduction", ["max", "amax", "min", "amin"])
def test_extremum_gradients_with_nan_and_ties_exact_mode(reduction):
    fn = lambda x: torch.stack([getattr(x[i].abs(), reduction)() for i in range(x.shape[0])])  # noqa: E731
    x = torch.tensor([[1.0, -3.0, 3.0, 0.5], [2.0, math.nan, -2.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    traced = compare_with_eager(fn, x, exact=True, bitwise=True)
    assert len(traced.report.rewrites) == 1
