"""Every failure the differential fuzzer (tests/test_fuzz.py) found, as a plain regression test.

Open normfuse bugs are ``xfail(strict=True)``: when one is fixed its test passes, the strict
xfail fails, and the fixer flips the marker and deletes the matching ``KNOWN_BUGS`` entry in
tests/test_fuzz.py (which lets the fuzzer step around the bug meanwhile). The last tests pin
behaviour the fuzzer's oracle accepts as the README's documented deviations.
"""

from __future__ import annotations

import math

import pytest
import torch

import normfuse
from conftest import compare_with_eager, leaf, rewrite


def _bug(text: str):
    return pytest.mark.xfail(strict=True, reason=f"normfuse bug: {text}")


# 1. found: dtype float32, x of shape (2,), `for i: c = x[i].float(); c / (norm(c) + 1e-6)`
def scalar_slice_program_with_cast(x):
    out = []
    for i in range(x.shape[0]):
        c = x[i].float()
        out.append(c / torch.sqrt((c**2).sum()))
    return torch.stack(out)


def test_scalar_slice_program_with_cast_does_not_crash_the_pass():
    """fuse_norms raised RuntimeError("shape '[2]' is invalid for input of size 1") in emit_program
    (the backend fell back: pass_failed); fixed by the core team while the fuzzer ran: now skipped
    as "cannot batch: a norm of a per-slice scalar"."""
    for dtype in (torch.float32, torch.float64):
        torch._dynamo.reset()
        traced = compare_with_eager(scalar_slice_program_with_cast, torch.randn(2, dtype=dtype))
        assert traced.report.error is None


@pytest.mark.inductor
def test_scalar_slice_program_with_cast_still_compiles():
    """What holds meanwhile: the backend catches the failure and compiles Dynamo's graph."""
    x = torch.randn(3).double()
    xe, xc = leaf(x), leaf(x)
    want = scalar_slice_program_with_cast(xe)
    got = torch.compile(scalar_slice_program_with_cast, backend=normfuse.backend)(xc)
    torch.testing.assert_close(got, want)
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)


# 2. found: float64 (2, 1), a loop of sqrt((c * c).sum(0)) with `side = side + v.sum()`; also
#    two loops over one source. Exact mode's gradient was not bitwise; the README has since listed
#    "a slice also used outside the loop" among exact mode's limits (agrees up to rounding).
def slice_also_used_outside(x):
    parts, side = [], x.sum() * 0
    for i in range(2):  # of 3 rows
        v = x[i]
        parts.append(torch.sqrt((v * v).sum()))
        side = side + v.sum()
    return torch.stack(parts), side


def test_exact_gradient_with_a_slice_also_used_outside_agrees_up_to_rounding():
    for seed in range(4):
        torch._dynamo.reset()
        x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        compare_with_eager(slice_also_used_outside, x, exact=True)


# 3. found: float32 (1, 1) and float64 (2, 1) of huge values, sqrt((c ** 2).sum(0)) per row.
#    Undocumented when found; the README's numerics table now lists it (one-element slices).
def l2_rows(x):
    return torch.stack([torch.sqrt((x[i] ** 2).sum()) for i in range(x.shape[0])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_one_element_slice_gives_abs_where_the_loop_overflows_or_underflows(dtype):
    big, small = {torch.float32: (3e19, 1e-24), torch.float64: (1e160, 1e-170), torch.float16: (300.0, 1e-4)}[dtype]
    x = torch.tensor([[big], [-small]], dtype=dtype)
    assert torch.isinf(l2_rows(x)[0]) and l2_rows(x)[1] == 0
    torch.testing.assert_close(rewrite(l2_rows, x).out, x.abs().flatten())
    torch._dynamo.reset()
    compare_with_eager(l2_rows, x, exact=True, bitwise=True)  # exact mode keeps the loop's inf and 0


# 4. found: float32 (2, 2) transposed input, column slices, `c / (n + 1e-6)`, `stack(dim=1).sum()`
def normalise_columns(x):
    return torch.stack([x[:, i] / (torch.sqrt((x[:, i] ** 2).sum()) + 1e-6) for i in range(x.shape[1])], dim=1)


def test_exact_program_result_is_laid_out_like_stack():
    x = torch.randn(3, 5).t()
    assert rewrite(normalise_columns, x, exact=True).out.stride() == normalise_columns(x).stride()
    for seed in range(8):
        torch._dynamo.reset()
        x = torch.randn(3, 5, generator=torch.Generator().manual_seed(seed)).t()
        compare_with_eager(lambda x: normalise_columns(x).sum(), x, exact=True, bitwise=True, backward=False)


# 4b. found: float32 (2, 2, 2) transposed(0, 2), sqrt((c ** 2).sum()) per row, sum(...)
def l2_stack(x):
    return torch.stack([torch.sqrt((x[i] ** 2).sum()) for i in range(x.shape[0])])


def test_exact_mode_on_slices_strided_in_two_dims():
    for seed in range(8):
        torch._dynamo.reset()
        x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(seed)).transpose(0, 2)
        compare_with_eager(l2_stack, x, exact=True, bitwise=True)


# 5. found: float32 (1, 2), column slices, `n * 2.0 + 1.0` per slice, `parts[0] + parts[1]`
def affine_add_chain(x):
    parts = [x[:, i].pow(2).sum().sqrt() * 2.0 + 1.0 for i in range(3)]
    return parts[0] + parts[1] + parts[2]


def test_add_chain_of_programs_ending_in_an_add_is_rewritten():
    traced = compare_with_eager(affine_add_chain, torch.randn(4, 3))
    assert len(traced.report.rewrites) == 1


# 6. found: float32 (1, 2) with zeros, `c / c.abs().min()`; float32 (1, 2) with a NaN,
#    `stack([c.abs().max() ...]).amax()`
def over_min(x):
    return torch.stack([x[i] / x[i].abs().min() for i in range(x.shape[0])])


def max_then_amax(x):
    return torch.stack([x[i].abs().max() for i in range(x.shape[0])]).amax()


@_bug("min()/max() (full reductions) are batched as vector_norm(ord=±inf), whose backward multiplies "
      "by a mask: a non-finite upstream gradient becomes NaN at every element, where min()/max() "
      "route it to the extremal element only (eager [nan, inf, inf], normfuse [nan, nan, nan]); "
      "exact mode too, so it is not bitwise")
@pytest.mark.parametrize("fn, x", [
    (over_min, [[0.0, 1.0, 2.0]]),
    (max_then_amax, [[3.0, math.nan]]),
], ids=["inf_upstream", "nan_upstream"])
def test_min_max_gradient_under_non_finite_upstream(fn, x):
    compare_with_eager(fn, torch.tensor(x), exact=True, bitwise=True)


# 7. found: float32 (2, 1, 2) of huge values, `(c.abs().pow(3)).sum().pow(1 / 3)`, sum of rows.
#    Undocumented when found; the README's numerics table now lists it (p-norm overflow).
def l3_rows(x):
    return torch.stack([x[i].abs().pow(3).sum().pow(1 / 3) for i in range(x.shape[0])])


def test_p_norm_overflow_gradient_is_zero_where_the_powers_overflow():
    x = torch.tensor([[1.6e19, 1.5e19], [0.1, 1.2]])  # cubes overflow float32, squares do not
    xe, xc = leaf(x), leaf(x)
    l3_rows(xe).sum().backward()
    rewrite(l3_rows, xc).out.sum().backward()
    assert torch.isnan(xe.grad[0]).all()  # the loop: 0 * inf
    assert torch.equal(xc.grad[0], torch.zeros(2))
    torch.testing.assert_close(xc.grad[1], xe.grad[1])


def test_p_norm_overflow_gradient_where_even_x_squared_overflows():
    """Beyond the README's row: where |x| ** (p - 1) overflows too (3.9e19 ** 2 > float32's max),
    vector_norm's gradient is NaN there, like the loop's, not 0."""
    x = torch.tensor([[3.9e19, 1.6e19]])
    xc = leaf(x)
    rewrite(l3_rows, xc).out.sum().backward()
    assert torch.isnan(xc.grad[0, 0]) and xc.grad[0, 1] == 0


# 8. found through Inductor: float32 (1,), `x[i:i + 1]` for i in (0, 0), sqrt((c ** 2).sum(0)), backward
def repeated_rows(x):
    return torch.stack([x[i].norm() for i in (0, 0)])


@_bug("repeated slices of a one-element source are batched with index_select, whose backward "
      "(a scatter-add into one element) Inductor's C++ codegen fails on (InductorError: AssertionError "
      "in CppVecKernel): the compile breaks where stock Inductor compiles the loop "
      "(upstream: torch.compile of vector_norm(x.index_select(0, tensor([0, 0])), dim=1) with x of "
      "shape (1, 1) fails the same way)")
@pytest.mark.inductor
def test_repeated_rows_of_a_one_element_source_compile():
    x = torch.randn(1, 1)
    xe, xc = leaf(x), leaf(x)
    want = repeated_rows(xe)
    got = torch.compile(repeated_rows, backend=normfuse.backend)(xc)
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.inductor
def test_repeated_rows_of_a_one_element_source_compile_with_stock_inductor():
    x = leaf(torch.randn(1, 1))
    torch.compile(repeated_rows, backend="inductor")(x).sum().backward()


# --------------------------------------------------------------------------- documented, pinned


def test_underflowing_slice_gradient_is_finite_like_an_all_zero_slice():
    """The README's "all-zero slice, gradient 0" row covers any slice whose naive norm is 0,
    which includes slices whose squares all underflow (the loop's gradient is then inf)."""
    x = torch.randn(3, 4)
    x[1] = 1e-24
    xe, xc = leaf(x), leaf(x)
    l2_rows(xe).sum().backward()
    assert torch.isinf(xe.grad[1]).all()
    rewrite(l2_rows, xc).out.sum().backward()
    assert torch.equal(xc.grad[1], torch.zeros(4))
    torch.testing.assert_close(xc.grad[[0, 2]], xe.grad[[0, 2]])
    torch._dynamo.reset()
    compare_with_eager(l2_rows, x, exact=True, bitwise=True)


def test_float16_tiny_slice_gets_the_true_norm():
    """float16 squares underflow (1e-4 ** 2 < 6e-8); vector_norm accumulates in float32."""
    x = torch.randn(3, 4).half()
    x[0] = 1e-4
    assert l2_rows(x)[0] == 0
    got = rewrite(l2_rows, x).out
    torch.testing.assert_close(got[0].float(), torch.tensor(2e-4), rtol=1e-2, atol=0)
