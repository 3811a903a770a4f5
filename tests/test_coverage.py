"""Which slices a loop covers, several loops in one graph, and results used further on."""

from __future__ import annotations

import pytest
import torch

from conftest import DTYPES, compare_with_eager

COVERAGE = {
    "full": (lambda x: torch.stack([x[i].norm() for i in range(8)]), "all", None),
    "prefix": (lambda x: torch.stack([x[i].norm() for i in range(5)]), "[0:5]", None),
    "range_a_b": (lambda x: torch.stack([x[i].norm() for i in range(2, 7)]), "[2:7]", None),
    "strided": (lambda x: torch.stack([x[i].norm() for i in range(1, 8, 3)]), "[1:8:3]", None),
    "negative_index": (lambda x: torch.stack([x[-1].norm(), x[-2].norm()]), None, torch.index_select),
    "reversed": (lambda x: torch.stack([x[i].norm() for i in reversed(range(8))]), None, torch.index_select),
    "repeats": (lambda x: torch.stack([x[i % 3].norm() for i in range(6)]), None, torch.index_select),
    "permuted": (lambda x: torch.stack([x[i].norm() for i in (3, 0, 6, 1)]), None, torch.index_select),
    "columns_strided": (lambda x: torch.stack([x[:, j].norm() for j in range(0, 6, 2)]), "[:, 0:5:2]", None),
    "columns_reversed": (lambda x: torch.stack([x[:, j].abs().sum() for j in (5, 4, 3)]), None, torch.index_select),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(COVERAGE))
def test_coverage(name, dtype):
    fn, text, target = COVERAGE[name]
    x = torch.randn(8, 6, dtype=torch.float64).to(dtype)
    traced = compare_with_eager(fn, x)
    (rw,) = traced.report.rewrites
    if text is not None:
        assert rw.coverage == text
    else:
        assert rw.coverage.startswith("index_select")
        assert traced.count(target) == 1
    for exact in (True,):
        torch._dynamo.reset()
        compare_with_eager(fn, x, exact=exact, bitwise=True)


def test_several_independent_loops():
    def fn(x, y):
        a = torch.stack([x[i].norm() for i in range(x.shape[0])])
        b = torch.stack([row.abs().amax() for row in y])
        c = sum(y[:, j].pow(2).sum().sqrt() for j in range(y.shape[1]))
        return a, b, c

    traced = compare_with_eager(fn, torch.randn(5, 4), torch.randn(3, 7))
    assert len(traced.report.rewrites) == 3
    assert traced.count(torch.linalg.vector_norm) == 3
    assert sorted(r.pattern for r in traced.report.rewrites) == ["stack", "stack", "sum"]


def test_two_loops_over_one_unbind():
    def fn(x):
        rows = x.unbind(0)
        return torch.stack([r.norm() for r in rows]), torch.stack([r.abs().sum() for r in rows])

    traced = compare_with_eager(fn, torch.randn(5, 4))
    assert len(traced.report.rewrites) == 2
    assert "unbind" not in traced.after


def test_results_feed_further_computation():
    def clip(x, max_norm=1.0):
        norms = torch.stack([x[i].norm() for i in range(x.shape[0])])
        factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        return (x * factors[:, None]).sum(0)

    traced = compare_with_eager(clip, torch.randn(16, 10) * 3)
    assert len(traced.report.rewrites) == 1


def test_batched_of_four_dims():
    fn = lambda x: torch.stack([torch.sqrt(torch.sum(x[i] * x[i])) for i in range(x.shape[0])])  # noqa: E731
    traced = compare_with_eager(fn, torch.randn(6, 3, 8, 8))
    assert traced.report.rewrites[0].dims == (1, 2, 3)


def test_single_slice_batch():
    fn = lambda x: torch.stack([x[i].norm() for i in range(x.shape[0])])  # noqa: E731
    traced = compare_with_eager(fn, torch.randn(1, 9))
    assert traced.report.rewrites[0].slices == 1


def test_noncontiguous_source():
    fn = lambda x: torch.stack([x.t()[i].pow(2).sum().sqrt() for i in range(x.shape[1])])  # noqa: E731
    x = torch.randn(7, 5)
    compare_with_eager(fn, x)
    torch._dynamo.reset()
    compare_with_eager(fn, x, exact=True, bitwise=True)


def test_expanded_source():
    fn = lambda x: torch.stack([r.norm() for r in x.expand(4, 6)])  # noqa: E731
    compare_with_eager(fn, torch.randn(1, 6))
