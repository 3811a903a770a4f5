"""Every recognised spelling: the graph is rewritten (checked on the graph) and the numbers agree
with eager, forward and backward, in the four floating dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import DTYPES, TOLERANCES, compare_with_eager, rewrite

B, D = 5, 7

# name -> (fn, input shape, expected ord, expected reduced dims of the source)
PATTERNS = {
    # slicing forms
    "index": (lambda x: torch.stack([torch.sqrt((x[i] ** 2).sum()) for i in range(x.shape[0])]), (B, D), 2, (1,)),
    "select": (lambda x: torch.stack([x.select(0, i).norm() for i in range(x.shape[0])]), (B, D), 2, (1,)),
    "iterate": (lambda x: torch.stack([row.norm() for row in x]), (B, D), 2, (1,)),
    "unbind": (lambda x: torch.stack([torch.linalg.norm(r) for r in x.unbind(0)]), (B, D), 2, (1,)),
    "unbind_dim1": (lambda x: torch.stack([r.norm() for r in x.unbind(1)]), (B, D), 2, (0,)),
    "split": (lambda x: torch.cat([r.pow(2).sum(1, keepdim=True).sqrt() for r in x.split(1, 0)]), (B, D), 2, (1,)),
    "chunk": (lambda x: torch.cat([r.pow(2).sum(1, keepdim=True).sqrt() for r in x.chunk(x.shape[0], 0)]), (B, D), 2, (1,)),
    "split_full_sum": (lambda x: torch.stack([r.square().sum().sqrt() for r in torch.split(x, 1)]), (B, D), 2, (1,)),
    "unit_slice": (lambda x: torch.cat([x[i : i + 1].square().sum(-1) ** 0.5 for i in range(x.shape[0])]), (B, D), 2, (1,)),
    "column": (lambda x: torch.stack([x[:, j].abs().sum() for j in range(x.shape[1])]), (B, D), 1, (0,)),
    "ellipsis_last": (lambda x: torch.stack([x[..., j].norm() for j in range(x.shape[-1])]), (B, 3, 4), 2, (0, 1)),
    # the squares
    "pow_method": (lambda x: torch.stack([x[i].pow(2).sum().sqrt() for i in range(x.shape[0])]), (B, D), 2, (1,)),
    "torch_pow": (lambda x: torch.stack([torch.sqrt(torch.sum(torch.pow(x[i], 2))) for i in range(x.shape[0])]), (B, D), 2, (1,)),
    "mul_self": (lambda x: torch.stack([torch.sqrt(torch.sum(x[i] * x[i])) for i in range(x.shape[0])]), (B, D), 2, (1,)),
    "mul_same_node": (lambda x: torch.stack([(r * r).sum().sqrt() for r in x]), (B, D), 2, (1,)),
    "torch_square": (lambda x: torch.stack([torch.square(x[i]).sum().sqrt() for i in range(x.shape[0])]), (B, D), 2, (1,)),
    "abs_pow2": (lambda x: torch.stack([(x[i].abs() ** 2).sum().sqrt() for i in range(x.shape[0])]), (B, D), 2, (1,)),
    "float_exponent": (lambda x: torch.stack([(x[i] ** 2.0).sum() ** 0.5 for i in range(x.shape[0])]), (B, D), 2, (1,)),
    # the sums and roots
    "sum_dim_keepdim": (lambda x: torch.stack([x[i].pow(2).sum(-1, keepdim=True).sqrt() for i in range(x.shape[0])]), (B, D), 2, (1,)),
    "sum_partial_dims": (lambda x: torch.stack([x[i].pow(2).sum(dim=1).sqrt() for i in range(x.shape[0])]), (B, 3, 4), 2, (2,)),
    "sum_tuple_dims": (lambda x: torch.stack([torch.sum(x[i] ** 2, dim=(0, 1)).sqrt() for i in range(x.shape[0])]), (B, 3, 4), 2, (1, 2)),
    "pow_half": (lambda x: torch.stack([x[i].pow(2).sum().pow(0.5) for i in range(x.shape[0])]), (B, D), 2, (1,)),
    # direct norm calls
    "tensor_norm_p1_dim": (lambda x: torch.stack([torch.norm(x[i], p=1, dim=0) for i in range(x.shape[0])]), (B, D), 1, (1,)),
    "tensor_norm_p3": (lambda x: torch.stack([x[i].norm(3) for i in range(x.shape[0])]), (B, D), 3, (1,)),
    "tensor_norm_fro_2d": (lambda x: torch.stack([x[i].norm() for i in range(x.shape[0])]), (B, 3, 4), 2, (1, 2)),
    "linalg_norm_2d_default": (lambda x: torch.stack([torch.linalg.norm(x[i]) for i in range(x.shape[0])]), (B, 3, 4), 2, (1, 2)),
    "linalg_norm_2d_fro": (lambda x: torch.stack([torch.linalg.norm(x[i], "fro") for i in range(x.shape[0])]), (B, 3, 4), 2, (1, 2)),
    "linalg_norm_dim": (lambda x: torch.stack([torch.linalg.norm(x[i], 2, dim=-1) for i in range(x.shape[0])]), (B, 3, 4), 2, (2,)),
    "linalg_norm_1d_ord": (lambda x: torch.stack([torch.linalg.norm(x[i], ord=math.inf) for i in range(x.shape[0])]), (B, D), math.inf, (1,)),
    "vector_norm": (lambda x: torch.stack([torch.linalg.vector_norm(x[i], 3) for i in range(x.shape[0])]), (B, D), 3, (1,)),
    "vector_norm_dims_keepdim": (lambda x: torch.stack([torch.linalg.vector_norm(x[i], dim=(0, 1), keepdim=True) for i in range(x.shape[0])]), (B, 3, 4), 2, (1, 2)),
    # L1, L-inf, general p
    "l1": (lambda x: torch.stack([x[i].abs().sum() for i in range(x.shape[0])]), (B, D), 1, (1,)),
    "l1_torch": (lambda x: torch.stack([torch.sum(torch.abs(x[i])) for i in range(x.shape[0])]), (B, D), 1, (1,)),
    "linf_max": (lambda x: torch.stack([x[i].abs().max() for i in range(x.shape[0])]), (B, D), math.inf, (1,)),
    "linf_amax": (lambda x: torch.stack([x[i].abs().amax() for i in range(x.shape[0])]), (B, D), math.inf, (1,)),
    "linf_amax_dim": (lambda x: torch.stack([x[i].abs().amax(dim=-1) for i in range(x.shape[0])]), (B, 3, 4), math.inf, (2,)),
    "general_p": (lambda x: torch.stack([x[i].abs().pow(3).sum().pow(1 / 3) for i in range(x.shape[0])]), (B, D), 3, (1,)),
    "even_p_no_abs": (lambda x: torch.stack([(x[i] ** 4).sum() ** 0.25 for i in range(x.shape[0])]), (B, D), 4, (1,)),
    # combiners
    "stack_dim1": (lambda x: torch.stack([x[i].norm(dim=-1) for i in range(x.shape[0])], dim=1), (B, 3, 4), 2, (2,)),
    "stack_neg_dim": (lambda x: torch.stack([x[i].norm(dim=-1) for i in range(x.shape[0])], dim=-1), (B, 3, 4), 2, (2,)),
    "cat_unsqueeze": (lambda x: torch.cat([x[i].norm().unsqueeze(0) for i in range(x.shape[0])]), (B, D), 2, (1,)),
    "cat_view": (lambda x: torch.cat([x[i].norm().view(1) for i in range(x.shape[0])]), (B, D), 2, (1,)),
    "cat_newaxis": (lambda x: torch.cat([x[i].norm()[None] for i in range(x.shape[0])]), (B, D), 2, (1,)),
    "cat_rows_of_vectors": (lambda x: torch.cat([x[i].norm(dim=-1) for i in range(x.shape[0])]), (B, 3, 4), 2, (2,)),
    "python_sum": (lambda x: sum(x[i].norm() for i in range(x.shape[0])), (B, D), 2, (1,)),
    "python_sum_vectors": (lambda x: sum(x[i].norm(dim=-1) for i in range(x.shape[0])), (B, 3, 4), 2, (2,)),
    "add_chain": (lambda x: x[0].norm() + x[1].norm() + x[2].norm(), (B, D), 2, (1,)),
    "stack_sum": (lambda x: torch.stack([x[i].norm() for i in range(x.shape[0])]).sum(), (B, D), 2, (1,)),
    "stack_mean": (lambda x: torch.stack([x[i].norm() for i in range(x.shape[0])]).mean(), (B, D), 2, (1,)),
    "stack_max": (lambda x: torch.stack([x[i].norm() for i in range(x.shape[0])]).max(), (B, D), 2, (1,)),
    # casts before the norm
    "float_cast": (lambda x: torch.stack([x[i].float().pow(2).sum().sqrt() for i in range(x.shape[0])]), (B, D), 2, (1,)),
    "clip_factors": (
        lambda x: x * (1.0 / (torch.stack([x[i].norm() for i in range(x.shape[0])]) + 1e-6)).clamp(max=1.0)[:, None],
        (B, D), 2, (1,),
    ),
}


def _input(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_graph(name):
    fn, shape, ord_, dims = PATTERNS[name]
    traced = rewrite(fn, _input(shape, torch.float32))
    report = traced.report
    assert len(report.rewrites) == 1, (report, traced.before)
    rw = report.rewrites[0]
    n_slices = 3 if name == "add_chain" else shape[-1] if name in ("column", "ellipsis_last", "unbind_dim1") else shape[0]
    assert rw.slices == n_slices
    assert rw.ord == ord_
    assert rw.dims == dims
    assert traced.count(torch.linalg.vector_norm) == 1
    # nothing of the per-slice chain is left
    leftovers = ["torch.sqrt", "torch.stack", "torch.cat", ".sqrt()", "select", "unbind", "split("]
    assert rw.coverage == ("[0:3]" if name == "add_chain" else "all")
    if rw.coverage == "all" and name != "clip_factors":  # its [:, None] is the user's
        leftovers.append("getitem")
    for leftover in leftovers:
        assert leftover not in traced.after, (leftover, traced.after)
    assert report.nodes_after < report.nodes_before
    assert rw.nodes_removed >= n_slices
    assert "test_patterns.py" in rw.location


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_numerics(name, dtype):
    fn, shape, _, _ = PATTERNS[name]
    # a pattern that casts to float32 rounds like float32, whatever its input
    tol = TOLERANCES[torch.float32] if name == "float_cast" and dtype == torch.float64 else None
    compare_with_eager(fn, _input(shape, dtype), tol=tol)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_exact_mode_is_bitwise(name):
    fn, shape, _, _ = PATTERNS[name]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        traced = compare_with_eager(fn, _input(shape, dtype), exact=True, bitwise=True)
        assert len(traced.report.rewrites) == 1 and traced.report.rewrites[0].exact


def test_graph_size_does_not_grow_with_batch():
    fn = PATTERNS["index"][0]
    sizes = []
    for b in (4, 16, 64, 256):
        torch._dynamo.reset()
        traced = rewrite(fn, torch.randn(b, 16))
        assert traced.report.nodes_before == 4 * b + 3
        sizes.append(traced.report.nodes_after)
    assert len(set(sizes)) == 1 and sizes[0] <= 3, sizes


def test_golden_graph():
    traced = rewrite(PATTERNS["index"][0], torch.randn(4, 8))
    torch.testing.FileCheck().check_count("linalg_vector_norm(l_x_, 2, 1, False)", 1, exactly=True).check(
        "return"
    ).run(traced.after)
    exact = rewrite(PATTERNS["index"][0], torch.randn(4, 8), exact=True)
    torch.testing.FileCheck().check("torch.pow(l_x_, 2)").check("torch.sum(").check("torch.sqrt(").check(
        "reshape"
    ).run(exact.after)
