"""Dynamic shapes: symbolic sizes never crash the pass, and normfuse adds no recompiles.

Dynamo specialises the loop's trip count (``range(x.shape[0])`` guards on B), so a new B
recompiles with or without normfuse; feature dims can stay symbolic. The pass reads sizes only
through ``statically_known_true`` (no guards), so the frames compiled with normfuse must be exactly
those compiled without it: counted with ``CompileCounterWithBackend``, against a pass-free backend
for every program and against stock Inductor for two.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from torch._dynamo.utils import counters

import normfuse
from normfuse.backend import run_pass


def rows_fixed(x, y):
    return torch.stack([x[i].norm() for i in range(3)])


def rows_all(x, y):
    return torch.stack([row.pow(2).sum().sqrt() for row in x])


def columns(x, y):
    return torch.stack([x[:, j].abs().sum() for j in range(2)])


def split_keepdim(x, y):
    return torch.cat([r.pow(2).sum(1, keepdim=True).sqrt() for r in x.split(1)])


def python_sum(x, y):
    return sum(x[i].norm(dim=-1) for i in range(3))


def normalise(x, y):
    return torch.stack([e / e.norm() for e in x])


def wgan(x, y):
    return torch.stack([(g.norm(2) - 1) ** 2 for g in x]).mean()


def dpsgd(x, y):
    return torch.stack([torch.sqrt((x[i] ** 2).sum() + (y[i] ** 2).sum()) for i in range(3)])


def edges(x, y):
    return torch.stack([(x[a] - x[b]).norm(dim=-1) for a, b in ((0, 1), (1, 2), (2, 0))])


PROGRAMS = [rows_fixed, rows_all, columns, split_keepdim, python_sum, normalise, wgan, dpsgd, edges]

# (x shape, y shape) per call: B fixed (3) while the feature dims move, then B moves too
SHAPES = [((3, 5), (3, 4)), ((3, 7), (3, 6)), ((3, 9), (3, 2)), ((4, 6), (4, 3))]


def _inputs(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def _mark_features(*tensors):
    for t in tensors:
        for d in range(1, t.dim()):
            torch._dynamo.mark_dynamic(t, d)


class PassOnly:
    """A backend that runs the pass (never raising) and then the graph eagerly."""

    def __init__(self):
        self.reports = []

    def __call__(self, gm, example_inputs):
        self.reports.append(run_pass(gm))
        return gm.forward


def _frames(fn, backend, dynamic, mark):
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend) if isinstance(backend, str) else None
    seen = []

    def count(gm, example_inputs):
        seen.append(gm)
        return backend(gm, example_inputs) if counter is None else counter(gm, example_inputs)

    compiled = torch.compile(fn, backend=count, dynamic=dynamic)
    for shapes in SHAPES:
        x, y = _inputs(shapes)
        if mark:
            _mark_features(x, y)
        torch.testing.assert_close(compiled(x, y), fn(x, y))
    return len(seen)


@pytest.mark.parametrize("mode", ["dynamic=True", "mark_dynamic"])
@pytest.mark.parametrize("fn", PROGRAMS, ids=lambda f: f.__name__)
def test_symbolic_sizes_and_no_extra_recompiles(fn, mode):
    dynamic, mark = (True, False) if mode == "dynamic=True" else (None, True)
    with_pass = PassOnly()
    frames_with = _frames(fn, with_pass, dynamic, mark)
    assert all(r.error is None for r in with_pass.reports), [r.error for r in with_pass.reports]
    assert sum(len(r.rewrites) for r in with_pass.reports) >= 1  # symbolic feature dims still rewritten
    frames_without = _frames(fn, lambda gm, ex: gm.forward, dynamic, mark)
    assert frames_with == frames_without


@pytest.mark.inductor
@pytest.mark.parametrize("fn", [rows_fixed, normalise], ids=lambda f: f.__name__)
def test_recompiles_match_stock_inductor(fn):
    stock = _frames(fn, "inductor", True, False)
    ours = _frames(fn, "normfuse", True, False)
    assert ours == stock
    assert counters["normfuse"]["rewrites"] >= 1
    assert counters["normfuse"].get("pass_failed", 0) == 0


@pytest.mark.inductor
def test_mark_dynamic_through_inductor_with_backward():
    compiled = torch.compile(normalise, backend=normfuse.backend)
    for shapes in SHAPES[:3]:
        x, y = _inputs(shapes)
        _mark_features(x)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        want, got = normalise(xe, y), compiled(xc, y)
        torch.testing.assert_close(got, want)
        seed = torch.randn_like(want)
        want.backward(seed)
        got.backward(seed)
        torch.testing.assert_close(xc.grad, xe.grad)
    assert counters["normfuse"]["rewrites"] >= 1 and counters["normfuse"].get("pass_failed", 0) == 0
