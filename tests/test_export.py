"""ATen-level graphs: a program from torch.export is rewritten in place and still runs."""

from __future__ import annotations

import pytest
import torch

import normfuse


class Naive(torch.nn.Module):
    def forward(self, x, g):
        a = torch.stack([torch.sqrt((x[i] ** 2).sum()) for i in range(x.shape[0])])
        b = torch.stack([r.norm() for r in x.unbind(0)])
        c = torch.cat([r.pow(2).sum(1, keepdim=True).sqrt() for r in x.split(1)])
        d = torch.stack([x[:, j].abs().sum() for j in range(x.shape[1])])
        e = torch.stack([x[i] / x[i].norm() for i in range(x.shape[0])])
        f = torch.stack([(gi.norm() - 1) ** 2 for gi in g]).mean()
        h = torch.cat([x[i : i + 1].abs().amax(-1) for i in range(x.shape[0])])
        return a, b, c, d, e, f, h


def _exported():
    x, g = torch.randn(5, 6), torch.randn(4, 3, 2)
    return torch.export.export(Naive(), (x, g)), (x, g)


def _aten_counts(gm, op):
    return sum(1 for n in gm.graph.nodes if n.target is op)


def test_export_rewritten_in_place():
    ep, args = _exported()
    want = Naive()(*args)
    before = len(ep.graph_module.graph.nodes)
    report = normfuse.fuse_norms(ep)
    assert len(report.rewrites) == 7, report
    gm = ep.graph_module
    assert len(gm.graph.nodes) < before / 3
    assert _aten_counts(gm, torch.ops.aten.select.int) == 0
    assert _aten_counts(gm, torch.ops.aten.stack.default) == 0
    # every new node is an ATen overload with a fake value, as export's own nodes are
    for node in gm.graph.nodes:
        if node.op == "call_function":
            assert isinstance(node.target, torch._ops.OpOverload) or node.target.__name__ == "getitem", node
            assert "val" in node.meta
    got = ep.module()(*args)
    for w, o in zip(want, got):
        torch.testing.assert_close(o, w)


def test_export_exact_mode_bitwise():
    ep, args = _exported()
    want = Naive()(*args)
    report = normfuse.fuse_norms(ep, exact=True)
    assert len(report.rewrites) == 7
    for w, o in zip(want, ep.module()(*args)):
        assert torch.equal(o, w)


def test_export_index_list_left_alone():
    class Reversed(torch.nn.Module):
        def forward(self, x):
            return torch.stack([x[i].norm() for i in reversed(range(x.shape[0]))])

    x = torch.randn(4, 3)
    ep = torch.export.export(Reversed(), (x,))
    report = normfuse.fuse_norms(ep)
    assert report.rewrites == [] and report.skipped[0].reason.startswith("cannot batch")
    torch.testing.assert_close(ep.module()(x), Reversed()(x))


@pytest.mark.inductor
def test_export_then_aot_inductor(tmp_path):
    ep, args = _exported()
    want = Naive()(*args)
    normfuse.fuse_norms(ep)
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "naive.pt2"))
    compiled = torch._inductor.aoti_load_package(path)
    for w, o in zip(want, compiled(*args)):
        torch.testing.assert_close(o, w)
