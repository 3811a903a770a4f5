"""Norms without a loop: hand-written chains on whole tensors, and norms over several tensors."""

from __future__ import annotations

import math

import pytest
import torch

import normfuse.passes.chains as chains
from conftest import DTYPES, TOLERANCES, compare_with_eager

CHAINS = {
    "sqrt_sum_sq_dim": (lambda x: torch.sqrt(torch.sum(x**2, dim=-1)), 2, (1,)),
    "keepdim": (lambda x: torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)), 2, (1,)),
    "all_dims": (lambda x: (x * x).sum().sqrt(), 2, ()),
    "tuple_dims": (lambda x: x.pow(2).sum((0, 1)) ** 0.5, 2, (0, 1)),
    "l1": (lambda x: x.abs().sum(1), 1, (1,)),
    "linf": (lambda x: x.abs().amax(-1), math.inf, (1,)),
    "general_p": (lambda x: (x.abs() ** 3).sum(1) ** (1 / 3), 3, (1,)),
    "normalise": (lambda x: x / torch.sqrt(torch.sum(x**2, -1, keepdim=True)), 2, (1,)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CHAINS))
def test_chain(name, dtype):
    fn, ord_, dims = CHAINS[name]
    x = (torch.randn(5, 6, dtype=torch.float64) * 2).to(dtype)
    traced = compare_with_eager(fn, x)
    (rw,) = traced.report.rewrites
    assert (rw.pattern, rw.ord) == ("chain", ord_)
    if dims:
        assert rw.dims == dims
    assert traced.count(torch.linalg.vector_norm) == 1
    for gone in ("sqrt", "pow", "abs", "amax", "** 2"):
        assert gone not in traced.after.replace("linalg_vector_norm", ""), traced.after
    assert "add" not in traced.after  # no eps invented


def test_chain_left_alone_in_exact_mode():
    traced = compare_with_eager(CHAINS["normalise"][0], torch.randn(3, 4), exact=True)
    assert traced.report.rewrites == [] and traced.after == traced.before


def _square_escapes(x):
    sq = x**2
    return torch.sqrt(sq.sum(-1)), sq


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: torch.sqrt((x**2).sum(-1) + 1e-6),  # eps inside the root
        lambda x: (x**2).sum(-1),  # squared norm
        _square_escapes,
        lambda x: x.abs().sum(-1).sqrt(),  # a root over an L1 norm
    ],
    ids=["eps", "squared", "square_escapes", "root_over_l1"],
)
def test_chain_near_misses(fn):
    traced = compare_with_eager(fn, torch.randn(3, 4))
    assert traced.report.rewrites == [] and traced.after == traced.before


def test_chain_of_complex_left_alone():
    fn = lambda x: x.abs().pow(2).sum(-1).sqrt()  # noqa: E731
    traced = compare_with_eager(fn, torch.randn(3, 4, dtype=torch.complex64))
    assert traced.report.rewrites == []


def global_norm(a, b, c):
    return torch.sqrt(sum((p**2).sum() for p in (a, b, c)))


def global_norm_of_norms(a, b, c):
    return sum(p.norm() ** 2 for p in (a, b, c)).sqrt()


def global_linf(a, b, c):
    return max(p.abs().max() for p in (a, b, c))


def global_l1(a, b, c):
    return sum(p.abs().sum() for p in (a, b, c))


def clip_by_global_norm(a, b, c, max_norm=1.0):
    total = torch.sqrt(sum(p.pow(2).sum() for p in (a, b, c)))
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    return a * scale, b * scale, c * scale


SHAPES = [(4, 3), (7,), (2, 3, 2)]


def _tensors(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * 2).to(dtype) for s in SHAPES]


MULTI = [global_norm, global_norm_of_norms, global_linf, clip_by_global_norm]


# what each form puts in the graph: (vector_norm calls, stack, cat, _foreach_norm)
FORMS = {"vector_norm": (4, 1, 0, 0), "foreach": (1, 1, 0, 1), "cat": (1, 0, 1, 0)}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fn", MULTI, ids=lambda f: f.__name__)
def test_multi_tensor_norm(fn, dtype, form, monkeypatch):
    monkeypatch.setitem(chains.MULTI_TENSOR_FORM, "cpu", form)
    traced = compare_with_eager(fn, *_tensors(dtype))
    (rw,) = traced.report.rewrites
    assert rw.pattern == "multi-tensor" and rw.slices == 3 and rw.coverage == f"3 tensors, {form}"
    assert rw.source == "L['a'], L['b'], L['c']"
    counts = tuple(traced.count(t) for t in (torch.linalg.vector_norm, torch.stack, torch.cat, torch._foreach_norm))
    assert counts == FORMS[form], traced.after


@pytest.mark.parametrize("fn", MULTI, ids=lambda f: f.__name__)
def test_multi_tensor_norm_kept_on_cpu_by_default(fn):
    # the fused sum of powers is the fastest form under Inductor on CPU; its pieces are no chains
    traced = compare_with_eager(fn, *_tensors(torch.float32))
    assert traced.report.rewrites == [] and traced.after == traced.before


def test_multi_tensor_l1_is_a_plain_sum_and_left_alone():
    # no root: the sum of L1 norms is already a norm's value, and there is nothing to batch
    traced = compare_with_eager(global_l1, *_tensors(torch.float32))
    assert not [r for r in traced.report.rewrites if r.pattern == "multi-tensor"]


@pytest.mark.parametrize("form", list(FORMS))
def test_multi_tensor_mixed_dtypes(form, monkeypatch):
    monkeypatch.setitem(chains.MULTI_TENSOR_FORM, "cpu", form)
    a, b, c = _tensors(torch.float32)
    traced = compare_with_eager(global_norm, a.half(), b, c.double(), tol=TOLERANCES[torch.float16])
    assert traced.out.dtype == torch.float64 and len(traced.report.rewrites) == 1


def test_multi_tensor_mutation_between_terms_left_alone(monkeypatch):
    monkeypatch.setitem(chains.MULTI_TENSOR_FORM, "cpu", "vector_norm")
    def fn(a, b):
        a2, b2 = a.clone(), b.clone()
        s = (a2**2).sum()
        b2.mul_(2)
        return torch.sqrt(s + (b2**2).sum())

    traced = compare_with_eager(fn, torch.randn(3), torch.randn(4), backward=False)
    assert not [r for r in traced.report.rewrites if r.pattern == "multi-tensor"]


def test_multi_tensor_exact_mode_left_alone():
    traced = compare_with_eager(global_norm, *_tensors(torch.float32), exact=True, bitwise=True)
    assert traced.report.rewrites == []


def test_explain_suggests_and_checks_loop_free_rewrites(monkeypatch):
    import normfuse

    monkeypatch.setitem(chains.MULTI_TENSOR_FORM, "cpu", "vector_norm")

    def fn(x, a, b):
        return x / torch.sqrt(torch.sum(x**2, -1, keepdim=True)), torch.sqrt(sum((p**2).sum() for p in (a, b)))

    report = normfuse.explain(fn, torch.randn(3, 4), torch.randn(5), torch.randn(2, 2), print_table=False)
    by_pattern = {r.pattern: r for r in report.rewrites}
    assert by_pattern["chain"].suggestion == "torch.linalg.vector_norm(x, dim=1, keepdim=True)"
    assert by_pattern["multi-tensor"].suggestion == (
        "torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)]))"
    )
    assert all(r.check == "passed" for r in report.rewrites)
    assert report.skipped == []  # the inner sum of squares belongs to the global norm
