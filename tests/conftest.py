from __future__ import annotations

import dataclasses
from typing import Any, Callable

import pytest
import torch
from torch._dynamo.utils import counters

import normfuse

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# vector_norm and the naive chain round differently (about 1 ulp of the result, more for the
# half types, whose naive chain also rounds every square); see the README's numerics section.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@dataclasses.dataclass
class Traced:
    report: normfuse.FuseReport
    before: str
    after: str
    gm: torch.fx.GraphModule
    out: Any = None

    def targets(self) -> list[Any]:
        return [n.target for n in self.gm.graph.nodes if n.op in ("call_function", "call_method")]

    def count(self, target: Any) -> int:
        return self.targets().count(target)


def rewrite(fn: Callable, *args: Any, exact: bool = False, fullgraph: bool = True) -> Traced:
    """Trace ``fn`` with Dynamo, run ``fuse_norms`` on its one graph, run the result eagerly."""
    seen: list[Traced] = []

    def backend(gm, example_inputs):
        before = gm.code
        report = normfuse.fuse_norms(gm, exact=exact)
        seen.append(Traced(report, before, gm.code, gm))
        return gm.forward

    out = torch.compile(fn, backend=backend, fullgraph=fullgraph)(*args)
    assert len(seen) == 1, f"expected one graph, got {len(seen)}"
    seen[0].out = out
    return seen[0]


def leaf(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone()
    return x.requires_grad_(True) if (x.is_floating_point() or x.is_complex()) else x


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def compare_with_eager(fn: Callable, *inputs: torch.Tensor, exact: bool = False, bitwise: bool = False,
                       backward: bool = True, tol: dict | None = None) -> Traced:
    """Forward and backward of the rewritten graph against eager, NaN and inf positions included."""
    eager_in = [leaf(x) for x in inputs]
    comp_in = [leaf(x) for x in inputs]
    want = _flat(fn(*eager_in))
    traced = rewrite(fn, *comp_in, exact=exact)
    got = _flat(traced.out)
    tol = tol or TOLERANCES.get(inputs[0].dtype, {})
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        if bitwise:
            assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.nan_to_num(), w.nan_to_num()), (g, w)
        else:
            torch.testing.assert_close(g, w, equal_nan=True, **tol)
    differentiable = [i for i, x in enumerate(eager_in) if x.requires_grad]
    if backward and differentiable and any(w.requires_grad for w in want):
        gen = torch.Generator().manual_seed(1)
        seeds = [torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w.dtype) for w in want]
        torch.autograd.backward([w for w in want if w.requires_grad], [s for s, w in zip(seeds, want) if w.requires_grad])
        torch.autograd.backward([g for g in got if g.requires_grad], [s for s, g in zip(seeds, got) if g.requires_grad])
        for i in differentiable:
            gw, gg = eager_in[i].grad, comp_in[i].grad
            # Python's max() over tensors picks one in eager (the others get no gradient);
            # Dynamo records torch.maximum, whose losers get zeros: the same gradient
            gw = torch.zeros_like(eager_in[i]) if gw is None else gw
            gg = torch.zeros_like(comp_in[i]) if gg is None else gg
            if bitwise:
                assert torch.equal(gg.isnan(), gw.isnan()) and torch.equal(gg.nan_to_num(), gw.nan_to_num())
            else:
                torch.testing.assert_close(gg, gw, equal_nan=True, **tol)
    return traced
