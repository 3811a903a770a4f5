"""The torch.compile backend end to end through Inductor, its options, and its safety net."""

from __future__ import annotations

import functools
import importlib
import logging

import pytest
import torch
from torch._dynamo.utils import counters

import normfuse
from conftest import leaf, rewrite


def naive(x):
    return torch.stack([torch.sqrt((x[i] ** 2).sum()) for i in range(x.shape[0])])


def naive_rows(x):
    return torch.stack([row.norm() for row in x])


def naive_sum(x):
    return sum(x[:, j].abs().sum() for j in range(x.shape[1]))


def naive_cat(x):
    return torch.cat([r.pow(2).sum(1, keepdim=True).sqrt() for r in x.split(1)])


def _check_inductor(fn, x, backend, **tol):
    xe, xc = leaf(x), leaf(x)
    want = fn(xe)
    got = torch.compile(fn, backend=backend)(xc)
    torch.testing.assert_close(got, want, equal_nan=True, **tol)
    seed = torch.randn_like(want)
    want.backward(seed)
    got.backward(seed)
    torch.testing.assert_close(xc.grad, xe.grad, equal_nan=True, **tol)
    return got


@pytest.mark.inductor
@pytest.mark.parametrize("fn", [naive, naive_rows, naive_sum, naive_cat], ids=lambda f: f.__name__)
def test_inductor_end_to_end(fn):
    _check_inductor(fn, torch.randn(16, 32), normfuse.backend)
    assert counters["normfuse"]["rewrites"] == 1
    assert counters["normfuse"].get("pass_failed", 0) == 0


@pytest.mark.inductor
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_inductor_half_types(dtype):
    _check_inductor(naive, torch.randn(8, 24).to(dtype), "normfuse", rtol=4e-2, atol=4e-2)
    assert counters["normfuse"]["rewrites"] == 1


@pytest.mark.inductor
def test_backend_by_name_after_install():
    assert "normfuse" in torch._dynamo.list_backends()
    _check_inductor(naive, torch.randn(6, 10), "normfuse")
    assert counters["normfuse"]["slices_collapsed"] == 6


@pytest.mark.inductor
def test_exact_option_reaches_the_pass():
    x = torch.randn(4, 8)
    x[1] = 0
    for backend in ("normfuse", functools.partial(normfuse.backend, exact=True)):
        torch._dynamo.reset()
        xc = leaf(x)
        options = {"normfuse.exact": True} if backend == "normfuse" else None
        out = torch.compile(naive, backend=backend, options=options)(xc)
        out.sum().backward()
        assert torch.isnan(xc.grad[1]).all()  # the naive gradient, kept by exact mode


def test_mode_and_options_are_inductor_config(monkeypatch):
    seen = []
    import torch._inductor.compile_fx as cfx

    def spy(gm, inputs, config_patches=None, **kwargs):
        seen.append(dict(config_patches or {}))
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", spy)
    x = torch.randn(3, 4)
    torch.compile(naive, backend="normfuse", mode="max-autotune-no-cudagraphs")(x)
    assert seen[-1]["max_autotune"] is True and seen[-1]["coordinate_descent_tuning"] is True
    torch._dynamo.reset()
    torch.compile(naive, backend="normfuse", options={"max_fusion_size": 32, "normfuse.exact": True})(x)
    assert seen[-1] == {"max_fusion_size": 32}
    torch._dynamo.reset()
    with pytest.raises(Exception, match="Unexpected optimization option"):
        torch.compile(naive, backend="normfuse", options={"not_an_inductor_option": 1})(x)


def test_failure_in_analysis_falls_back(monkeypatch, caplog):
    pass_module = importlib.import_module("normfuse.passes.fuse_norms")

    def boom(graph):
        raise RuntimeError("injected")

    monkeypatch.setattr(pass_module, "find_groups", boom)
    from normfuse.backend import run_pass

    seen = []

    def backend(gm, inputs):
        before = gm.code
        seen.append((before, run_pass(gm), gm.code))
        return gm.forward

    x = torch.randn(5, 3)
    with caplog.at_level(logging.WARNING, logger="normfuse"):
        out = torch.compile(naive, backend=backend)(x)
    torch.testing.assert_close(out, naive(x))
    before, report, after = seen[0]
    assert before == after and report.error == "RuntimeError: injected" and not report.rewrites
    assert counters["normfuse"]["pass_failed"] == 1
    assert any("pass failed" in r.message and "injected" in r.message for r in caplog.records)


def test_failure_while_emitting_leaves_graph_untouched(monkeypatch):
    pass_module = importlib.import_module("normfuse.passes.fuse_norms")

    real = pass_module.emit_group

    def half_done(builder, group, exact):
        real(builder, group, exact)  # nodes are in the graph now
        raise ValueError("injected after emission")

    monkeypatch.setitem(pass_module._EMITTERS, pass_module.NormGroup, half_done)
    from normfuse.backend import run_pass

    seen = []

    def backend(gm, inputs):
        before = gm.code
        seen.append((before, run_pass(gm), gm.code))
        gm.graph.lint()
        return gm.forward

    x = torch.randn(5, 3)
    torch.testing.assert_close(torch.compile(naive, backend=backend)(x), naive(x))
    before, report, after = seen[0]
    assert before == after and "injected after emission" in report.error


@pytest.mark.inductor
def test_failure_inside_the_backend_still_compiles(monkeypatch, caplog):
    pass_module = importlib.import_module("normfuse.passes.fuse_norms")

    monkeypatch.setattr(pass_module, "find_groups", lambda graph: 1 / 0)
    with caplog.at_level(logging.WARNING, logger="normfuse"):
        _check_inductor(naive, torch.randn(4, 6), normfuse.backend)
    assert counters["normfuse"]["pass_failed"] >= 1
    assert any("ZeroDivisionError" in r.message for r in caplog.records)


def test_dynamic_shapes_do_not_crash():
    fn = lambda x: torch.stack([x[i].norm() for i in range(4)])  # noqa: E731
    seen = []

    def backend(gm, inputs):
        seen.append(normfuse.fuse_norms(gm))
        return gm.forward

    compiled = torch.compile(fn, backend=backend, dynamic=True)
    for shape in ((4, 5), (6, 7), (9, 3)):
        x = torch.randn(shape)
        torch.testing.assert_close(compiled(x), fn(x))
    assert all(r.error is None for r in seen)
    assert sum(len(r.rewrites) for r in seen) == len(seen) >= 1


def test_explain_prints_a_table(capsys):
    def model(x, y):
        a = torch.stack([x[i].norm() for i in range(x.shape[0])])
        b = torch.stack([torch.sqrt((y[i] ** 2).sum() + 1e-8) for i in range(y.shape[0])])
        return a.sum() + b.sum()

    report = normfuse.explain(model, torch.randn(4, 3), torch.randn(2, 3))
    assert len(report.rewrites) == 1 and len(report.skipped) == 1
    text = str(report)
    assert "stack of 4 slices of L['x'] (dim 0)" in text
    assert "left alone: eps inside the root" in text
    assert "test_backend.py:" in text
    print(report)
    assert "rewritten" in capsys.readouterr().out


def test_report_fields():
    traced = rewrite(naive_rows, torch.randn(7, 3))
    (rw,) = traced.report.rewrites
    assert (rw.pattern, rw.source, rw.dim, rw.slices, rw.coverage, rw.ord, rw.dims) == (
        "stack", "L['x']", 0, 7, "all", 2.0, (1,)
    )
    assert rw.spelling == "norm(v, 2.0)"
    assert rw.code == "return torch.stack([row.norm() for row in x])"
    assert rw.nodes_removed == traced.report.nodes_before - traced.report.nodes_after == 7 + 7 + 1 - 1
    assert counters["normfuse"]["rewrites"] == 1 and counters["normfuse"]["nodes_removed"] == rw.nodes_removed
