"""Near misses: the graph is left exactly as Dynamo made it, and the numbers are eager's."""

from __future__ import annotations

import pytest
import torch

from conftest import compare_with_eager, rewrite

B, D = 4, 6


def _eps_in_root(x):
    return torch.stack([torch.sqrt((x[i] ** 2).sum() + 1e-6) for i in range(x.shape[0])])


def _squared_norm(x):
    return torch.stack([(x[i] ** 2).sum() for i in range(x.shape[0])])


def _mismatched_root(x):
    return torch.stack([x[i].abs().pow(3).sum().pow(0.5) for i in range(x.shape[0])])


def _odd_power_without_abs(x):
    return torch.stack([x[i].pow(3).sum().pow(1 / 3) for i in range(x.shape[0])])


def _root_of_l1(x):
    return torch.stack([x[i].abs().sum().sqrt() for i in range(x.shape[0])])


def _matrix_norm_2(x):
    return torch.stack([torch.linalg.norm(x[i], 2) for i in range(x.shape[0])])


def _matrix_norm_nuc(x):
    return torch.stack([torch.norm(x[i], p="nuc") for i in range(x.shape[0])])


def _matrix_norm_dims(x):
    return torch.stack([torch.linalg.norm(x[i], 1, dim=(0, 1)) for i in range(x.shape[0])])


def _mixed_sources(x):
    y = x * 2
    return torch.stack([x[0].norm(), y[1].norm(), x[2].norm()])


def _mixed_norms(x):
    return torch.stack([x[0].norm(), x[1].norm(1), x[2].norm()])


def _mixed_dims(x):
    return torch.stack([x[0].norm(), x[:, 1].norm()])


def _mutated_between(x):
    y = x.clone()
    a = y[0].norm()
    y.mul_(2)
    b = y[1].norm()
    return torch.stack([a, b])


def _setitem_between(x):
    y = x.clone()
    a = y[0].norm()
    y[1] = 0.5
    b = y[1].norm()
    return torch.stack([a, b])


def _alias_mutated_between(x):
    y = x.clone()
    flat = y.view(-1)
    a = y[0].norm()
    flat.add_(1)
    b = y[1].norm()
    return torch.stack([a, b])


def _slice_mutated_between(x):
    y = x.clone()
    a = y[0].norm()
    y[1].mul_(3)
    b = y[1].norm()
    return torch.stack([a, b])


def _square_used_elsewhere(x):
    squares = [(x[i] ** 2) for i in range(x.shape[0])]
    return torch.stack([s.sum().sqrt() for s in squares]), squares[0]


def _sum_used_elsewhere(x):
    sums = [(x[i] ** 2).sum() for i in range(x.shape[0])]
    return torch.stack([s.sqrt() for s in sums]), sums[1] * 2


def _norm_used_elsewhere(x):
    norms = [x[i].norm() for i in range(x.shape[0])]
    return torch.stack(norms), norms[0] + 1


def _not_every_element_a_norm(x):
    return torch.stack([x[0].norm(), x[1].sum(), x[2].norm()])


REAL = {
    "eps_in_root": (_eps_in_root, "eps inside the root"),
    "squared_norm_no_root": (_squared_norm, "squared norm with no root"),
    "mismatched_root": (_mismatched_root, "the root does not undo the power"),
    "odd_power_without_abs": (_odd_power_without_abs, "the root does not undo the power"),
    "root_of_l1": (_root_of_l1, None),
    "mixed_sources": (_mixed_sources, "slices of different source tensors or dims"),
    "mixed_norms": (_mixed_norms, "the norms are not all the same"),
    "mixed_dims": (_mixed_dims, "slices of different source tensors or dims"),
    "mutated_between": (_mutated_between, "the source is mutated between the slices"),
    "setitem_between": (_setitem_between, "the source is mutated between the slices"),
    "alias_mutated_between": (_alias_mutated_between, "the source is mutated between the slices"),
    "slice_mutated_between": (_slice_mutated_between, "the source is mutated between the slices"),
    "square_used_elsewhere": (_square_used_elsewhere, "an intermediate is used elsewhere"),
    "sum_used_elsewhere": (_sum_used_elsewhere, "an intermediate is used elsewhere"),
    "norm_used_elsewhere": (_norm_used_elsewhere, "a per-slice norm is used elsewhere"),
    "not_every_element_a_norm": (_not_every_element_a_norm, "not every element is a norm"),
}

MATRIX = {
    "matrix_norm_2": (_matrix_norm_2, "matrix norm"),
    "matrix_norm_nuc": (_matrix_norm_nuc, "matrix norm"),
    "matrix_norm_dims": (_matrix_norm_dims, "matrix norm"),
}


def _assert_unchanged(traced, reason):
    assert traced.report.rewrites == []
    assert traced.after == traced.before
    assert traced.report.nodes_after == traced.report.nodes_before
    if reason is not None:
        assert [s.reason for s in traced.report.skipped] == [reason]


@pytest.mark.parametrize("name", list(REAL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_real_near_misses_left_alone(name, dtype):
    fn, reason = REAL[name]
    x = torch.randn(B, D, dtype=torch.float64).to(dtype)
    # a norm saves its input for backward, so code that then mutates it has no backward in eager
    backward = "mutated" not in name and "setitem" not in name
    _assert_unchanged(compare_with_eager(fn, x, backward=backward), reason)


@pytest.mark.parametrize("name", list(MATRIX))
def test_matrix_norms_left_alone(name):
    fn, reason = MATRIX[name]
    _assert_unchanged(compare_with_eager(fn, torch.randn(B, 3, 5, dtype=torch.float64)), reason)


def test_complex_input_left_alone():
    x = torch.randn(B, D, dtype=torch.complex64)
    for fn in (
        lambda x: torch.stack([x[i].abs().pow(2).sum().sqrt() for i in range(x.shape[0])]),
        lambda x: torch.stack([torch.linalg.vector_norm(x[i]) for i in range(x.shape[0])]),
    ):
        torch._dynamo.reset()
        _assert_unchanged(compare_with_eager(fn, x), "complex input")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_integer_input_left_alone(dtype):
    x = torch.randint(-5, 5, (B, D), dtype=dtype)
    fn = lambda x: torch.stack([torch.sqrt((x[i] ** 2).sum()) for i in range(x.shape[0])])  # noqa: E731
    _assert_unchanged(compare_with_eager(fn, x, backward=False), "integer input")


def test_integer_input_cast_to_float_first_is_rewritten():
    x = torch.randint(-5, 5, (B, D))
    fn = lambda x: torch.stack([x[i].float().norm() for i in range(x.shape[0])])  # noqa: E731
    traced = compare_with_eager(fn, x, backward=False)
    assert len(traced.report.rewrites) == 1


def test_unrelated_mutation_between_slices_does_not_block():
    def fn(x, other):
        buf = other.clone()
        a = x[0].norm()
        buf.mul_(2)  # an in-place op on a tensor that shares nothing with x
        b = x[1].norm()
        return torch.stack([a, b]), buf

    traced = compare_with_eager(fn, torch.randn(B, D), torch.randn(3))
    assert len(traced.report.rewrites) == 1
    assert "mul_" in traced.after  # dead-code elimination kept the in-place call


def test_mutation_after_the_norms_does_not_block():
    def fn(x):
        y = x.clone()
        n = torch.stack([y[i].norm() for i in range(y.shape[0])])
        y.mul_(2)
        return n, y

    traced = compare_with_eager(fn, torch.randn(B, D), backward=False)
    assert len(traced.report.rewrites) == 1
    assert "mul_" in traced.after


def test_unused_inplace_call_survives_the_rewrite():
    def fn(x, y):
        y.mul_(2)  # its result is unused: plain dead-code elimination would delete it
        return torch.stack([x[i].norm() for i in range(x.shape[0])])

    x, y = torch.randn(B, D), torch.ones(3)
    traced = rewrite(fn, x, y)
    assert len(traced.report.rewrites) == 1
    assert "mul_" in traced.after
    assert torch.equal(y, torch.full((3,), 2.0))


def test_slice_used_elsewhere_is_kept_valid():
    def fn(x):
        rows = [x[i] for i in range(x.shape[0])]
        return torch.stack([r.norm() for r in rows]), rows[0] * 2

    traced = compare_with_eager(fn, torch.randn(B, D))
    assert len(traced.report.rewrites) == 1
    assert traced.count(torch.linalg.vector_norm) == 1


def test_graph_break_in_loop_does_not_crash():
    def fn(x):
        norms = []
        for i in range(x.shape[0]):
            norms.append(x[i].norm())
            if i == 1:
                torch._dynamo.graph_break()
        return torch.stack(norms)

    import normfuse

    x = torch.randn(B, D)
    out = torch.compile(fn, backend=normfuse.backend)(x)
    torch.testing.assert_close(out, fn(x))
