"""normfuse.install(): the pass in Inductor's pre_grad_custom_pass, caches kept."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
import torch.fx as fx
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor.codecache import resolve_pre_grad_pass_timing
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import fresh_cache

import normfuse
from normfuse.inductor_pass import NormFusePass


def naive(x):
    return torch.stack([torch.sqrt((x[i] ** 2).sum()) for i in range(x.shape[0])])


@pytest.fixture(autouse=True)
def clean_config():
    """Every test starts with no pre-grad pass and leaves none behind, and with empty Inductor
    caches: a warm cache from an earlier run (same normfuse source, same uuid) would skip the pass."""
    with inductor_config.patch(pre_grad_custom_pass=None), fresh_cache():
        yield


def other_pass(graph):  # someone else's pass, a plain callable
    pass


def test_install_appends_and_uninstall_restores():
    assert normfuse.uninstall() is False
    nf = normfuse.install()
    assert inductor_config.pre_grad_custom_pass is nf and isinstance(nf, CustomGraphPass)
    again = normfuse.install(exact=True)  # replaces its own entry, never two
    assert inductor_config.pre_grad_custom_pass is again and again.exact
    assert normfuse.uninstall() is True
    assert inductor_config.pre_grad_custom_pass is None

    inductor_config.pre_grad_custom_pass = other_pass
    nf = normfuse.install()
    assert inductor_config.pre_grad_custom_pass == [other_pass, nf]
    normfuse.install()
    assert len(inductor_config.pre_grad_custom_pass) == 2
    normfuse.uninstall()
    assert inductor_config.pre_grad_custom_pass is other_pass

    def third(graph):
        pass

    for container in (list, tuple):
        inductor_config.pre_grad_custom_pass = container([other_pass, third])
        nf = normfuse.install()
        assert inductor_config.pre_grad_custom_pass == container([other_pass, third, nf])
        inductor_config.pre_grad_custom_pass = container(list(inductor_config.pre_grad_custom_pass) + [other_pass])
        normfuse.uninstall()  # others stay, in their order, whoever added them after us
        assert inductor_config.pre_grad_custom_pass == container([other_pass, third, other_pass])


def test_uuid_keys_the_cache_and_timing_is_late():
    a, b, c = NormFusePass(), NormFusePass(), NormFusePass(exact=True)
    assert a.uuid() and a.uuid() == b.uuid() != c.uuid()
    normfuse.install()
    # every pre-grad pass has a uuid: Inductor runs them after the cache lookup, caches on
    assert resolve_pre_grad_pass_timing() == "late"
    inductor_config.pre_grad_custom_pass = [other_pass, NormFusePass()]
    assert resolve_pre_grad_pass_timing() == "early"  # the other pass has no uuid: not ours to fix


def test_graphs_the_hook_cannot_read_are_skipped():
    nf = NormFusePass()
    nf(fx.Graph())  # no owning module
    traced = fx.symbolic_trace(lambda x: torch.stack([x[i].norm() for i in range(3)]))
    before = traced.code
    nf(traced.graph)  # no fake values (not a Dynamo graph)
    assert traced.code == before
    assert counters["normfuse"]["pre_grad_skipped: no owning GraphModule"] == 1
    assert counters["normfuse"]["pre_grad_skipped: no fake values on the graph"] == 1
    assert counters["normfuse"].get("pass_failed", 0) == 0


def _check(fn, x, compiled):
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = fn(xe), compiled(xc)
    torch.testing.assert_close(got, want)
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.inductor
def test_plain_torch_compile_benefits():
    normfuse.install()
    _check(naive, torch.randn(6, 5), torch.compile(naive))
    assert counters["normfuse"]["pre_grad_runs"] == 1
    assert counters["normfuse"]["rewrites"] == 1 and counters["normfuse"]["slices_collapsed"] == 6


@pytest.mark.inductor
def test_warm_compile_hits_the_fx_graph_cache():
    x = torch.randn(5, 4)
    with fresh_cache(), inductor_config.patch(fx_graph_cache=True), torch._functorch.config.patch(enable_autograd_cache=True):
        normfuse.install()
        torch.testing.assert_close(torch.compile(naive)(x), naive(x))
        cold = dict(counters["inductor"]), dict(counters["aot_autograd"]), counters["normfuse"]["rewrites"]
        assert cold[0].get("fxgraph_cache_miss") == 1 and cold[2] == 1
        assert not cold[0].get("fxgraph_cache_bypass")

        torch._dynamo.reset()
        counters.clear()
        torch.testing.assert_close(torch.compile(naive)(x), naive(x))
        assert counters["aot_autograd"]["autograd_cache_hit"] == 1
        assert counters["inductor"]["fxgraph_cache_hit"] == 1
        assert not counters["inductor"].get("fxgraph_cache_bypass")
        assert counters["normfuse"]["pre_grad_runs"] == 0  # a hit does not even run the pass

        # the pass's uuid is part of the key: another normfuse (exact mode) is another entry
        torch._dynamo.reset()
        counters.clear()
        normfuse.install(exact=True)
        torch.testing.assert_close(torch.compile(naive)(x), naive(x))
        assert counters["inductor"]["fxgraph_cache_miss"] == 1 and counters["normfuse"]["rewrites"] == 1


@pytest.mark.inductor
def test_failure_inside_the_hook_falls_back(monkeypatch, caplog):
    pass_module = importlib.import_module("normfuse.passes.fuse_norms")
    monkeypatch.setattr(pass_module, "find_groups", lambda graph: 1 / 0)
    normfuse.install()
    with caplog.at_level(logging.WARNING, logger="normfuse"):
        _check(naive, torch.randn(4, 3), torch.compile(naive))
    assert counters["normfuse"]["pass_failed"] == 1
    assert any("ZeroDivisionError" in r.getMessage() for r in caplog.records)
