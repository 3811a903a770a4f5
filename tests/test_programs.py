"""Per-slice programs around a norm: the loops people write for real models."""

from __future__ import annotations

import pytest
import torch

from conftest import DTYPES, TOLERANCES, compare_with_eager, rewrite


def normalise_rows(z):  # contrastive / metric learning
    return torch.stack([e / e.norm() for e in z])


def normalise_rows_eps(z):
    return torch.stack([z[i] / (z[i].norm(dim=-1, keepdim=True) + 1e-8) for i in range(z.shape[0])])


def wgan_gp(grad):
    return torch.stack([(g.norm(2) - 1) ** 2 for g in grad]).mean()


def capsule_squash(s):  # s: (batch, capsules, dim); loop over capsules
    out = []
    for j in range(s.shape[1]):
        c = s[:, j]
        sq = (c**2).sum(-1, keepdim=True)
        out.append(sq / (1 + sq) * c / torch.sqrt(sq))
    return torch.stack(out, dim=1)


def dpsgd_norms(g1, g2, g3):
    grads = [g1, g2, g3]
    return torch.stack([torch.sqrt(sum((g[i] ** 2).sum() for g in grads)) for i in range(g1.shape[0])])


def dpsgd_clip(g1, g2, max_norm=1.0):
    norms = torch.stack([torch.sqrt((g1[i] ** 2).sum() + (g2[i] ** 2).sum()) for i in range(g1.shape[0])])
    return (max_norm / (norms + 1e-6)).clamp(max=1.0)


EDGES = [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2), (4, 5), (5, 1)]
SELF_LOOP = EDGES + [(3, 3)]  # a zero-length edge: one position, read twice


def edge_lengths(p):
    return torch.stack([torch.sqrt(((p[a] - p[b]) ** 2).sum()) for a, b in EDGES])


def edge_lengths_norm(p):
    return torch.stack([(p[a] - p[b]).norm(dim=-1) for a, b in SELF_LOOP])


def distances_to_set(p, q):  # what torch.cdist computes, a row at a time
    return torch.stack([(p[i] - q).norm(dim=-1) for i in range(p.shape[0])])


def distances_to_set_sqrt(p, q):
    return torch.stack([torch.sqrt(((p[i] - q) ** 2).sum(-1)) for i in range(p.shape[0])])


def scaled_by_weight(x, w):
    return torch.stack([(x[i] * w).norm() * w.sum() for i in range(x.shape[0])])


def per_sample_clip_inside(x):
    return torch.stack([x[i] * torch.clamp(1.0 / (x[i].norm() + 1e-6), max=1.0) for i in range(x.shape[0])])


PROGRAMS = {
    "normalise_rows": (normalise_rows, [(6, 16)]),
    "normalise_rows_eps": (normalise_rows_eps, [(6, 3, 8)]),
    "wgan_gp": (wgan_gp, [(5, 3, 4, 4)]),
    "capsule_squash": (capsule_squash, [(4, 6, 8)]),
    "dpsgd_norms": (dpsgd_norms, [(5, 4, 3), (5, 7), (5, 2, 2, 2)]),
    "dpsgd_clip": (dpsgd_clip, [(5, 6), (5, 3, 2)]),
    "edge_lengths": (edge_lengths, [(6, 3)]),
    "edge_lengths_norm": (edge_lengths_norm, [(6, 3)]),
    "distances_to_set": (distances_to_set, [(5, 3), (4, 3)]),
    "distances_to_set_sqrt": (distances_to_set_sqrt, [(5, 3), (4, 3)]),
    "scaled_by_weight": (scaled_by_weight, [(5, 6), (6,)]),
    "per_sample_clip_inside": (per_sample_clip_inside, [(5, 6)]),
}


def _inputs(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * 2).to(dtype) for s in shapes]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_program_rewritten_and_equal(name, dtype):
    fn, shapes = PROGRAMS[name]
    tol = dict(TOLERANCES[dtype])
    if dtype in (torch.float16, torch.bfloat16):  # several rounded ops after the norm
        tol = {k: v * 2 for k, v in tol.items()}
    traced = compare_with_eager(fn, *_inputs(shapes, dtype), tol=tol)
    assert len(traced.report.rewrites) == 1, traced.report
    report = traced.report
    assert report.nodes_after < report.nodes_before / 2, (report.nodes_before, report.nodes_after)


# Where one tensor feeds several slice positions (edges share endpoints) or every slice (a shared
# weight), autograd sums its gradient contributions in another order than the loop did: bitwise
# forward, rounding backward.
GRADIENTS_REORDERED = {
    "edge_lengths", "edge_lengths_norm", "scaled_by_weight", "distances_to_set", "distances_to_set_sqrt",
}


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_program_exact_mode_is_bitwise(name):
    fn, shapes = PROGRAMS[name]
    for dtype in (torch.float32, torch.float16):
        torch._dynamo.reset()
        reordered = name in GRADIENTS_REORDERED
        traced = compare_with_eager(fn, *_inputs(shapes, dtype), exact=True, bitwise=True, backward=not reordered)
        assert len(traced.report.rewrites) == 1
        if reordered:
            torch._dynamo.reset()
            compare_with_eager(fn, *_inputs(shapes, dtype), exact=True)


def test_program_graph_is_batched():
    traced = compare_with_eager(normalise_rows, *_inputs([(32, 8)], torch.float32))
    assert traced.count(torch.linalg.vector_norm) == 1
    assert traced.report.nodes_before == 32 * 3 + 3
    assert traced.report.nodes_after <= 5, traced.after
    (rw,) = traced.report.rewrites
    assert rw.slices == 32 and rw.source == "L['z']"


def test_dpsgd_graph_has_one_reduction_per_tensor():
    traced = compare_with_eager(dpsgd_norms, *_inputs([(16, 4, 3), (16, 7), (16, 2, 2, 2)], torch.float32))
    assert traced.after.count("torch.sum(") == 3, traced.after
    assert traced.report.rewrites[0].source == "L['g1'], L['g2'], L['g3']"


def test_edge_lengths_gather_once_per_endpoint():
    traced = compare_with_eager(edge_lengths_norm, *_inputs([(6, 3)], torch.float32))
    assert traced.count(torch.index_select) == 2
    assert traced.count(torch.linalg.vector_norm) == 1


def _eps_in_root_program(x):
    return torch.stack([x[i] / torch.sqrt((x[i] ** 2).sum() + 1e-6) for i in range(x.shape[0])])


def _squared_norm_program(x):
    return torch.stack([(x[i] ** 2).sum() * 0.5 for i in range(x.shape[0])])


def _program_with_mutation(x):
    y = x.clone()
    a = y[0] / y[0].norm()
    y.add_(1)
    b = y[1] / y[1].norm()
    return torch.stack([a, b])


def _program_intermediate_escapes(x):
    norms = [x[i].norm() for i in range(x.shape[0])]
    return torch.stack([x[i] / norms[i] for i in range(x.shape[0])]), norms[0] * 3


def _programs_differ(x):
    return torch.stack([x[0] / x[0].norm(), x[1] * x[1].norm()])


@pytest.mark.parametrize(
    "fn",
    [_eps_in_root_program, _squared_norm_program, _program_with_mutation, _program_intermediate_escapes, _programs_differ],
    ids=lambda f: f.__name__,
)
def test_program_near_misses_left_alone(fn):
    traced = compare_with_eager(fn, *_inputs([(4, 5)], torch.float32), backward="mutation" not in fn.__name__)
    assert traced.report.rewrites == [] and traced.after == traced.before


def test_distances_stay_one_fused_reduction_not_cdist():
    # Under Inductor the broadcast difference and its norm fuse into one kernel, 3-7x faster on
    # CPU than cdist's exact path; cdist's matmul path is faster for wide rows but off by ~1e-3
    # at duplicated points. So the batched program is kept as is.
    traced = compare_with_eager(distances_to_set, *_inputs([(16, 3), (9, 3)], torch.float32))
    assert traced.count(torch.linalg.vector_norm) == 1 and "cdist" not in traced.after
    assert "unsqueeze" in traced.after  # p[i] - q broadcast as P[:, None] - q


def test_self_loop_edge_with_sqrt_spelling_has_the_documented_zero_gradient():
    # sqrt(sum(d**2)) at d == 0 has a NaN gradient in the loop; the batched vector_norm gives 0
    fn = lambda p: torch.stack([torch.sqrt(((p[a] - p[b]) ** 2).sum()) for a, b in SELF_LOOP])  # noqa: E731
    p = _inputs([(6, 3)], torch.float32)[0]
    eager, comp = p.clone().requires_grad_(), p.clone().requires_grad_()
    fn(eager).sum().backward()
    traced = rewrite(fn, comp)
    traced.out.sum().backward()
    assert len(traced.report.rewrites) == 1
    torch.testing.assert_close(traced.out, fn(p))
    assert torch.isnan(eager.grad[3]).all() and not torch.isnan(comp.grad).any()
    torch.testing.assert_close(comp.grad[[0, 1, 2, 4, 5]], eager.grad[[0, 1, 2, 4, 5]])
