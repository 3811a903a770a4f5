"""normfuse as an Inductor pre-grad custom pass, so plain ``torch.compile(model)`` benefits.

    import normfuse
    normfuse.install()            # appends the pass to torch._inductor.config.pre_grad_custom_pass
    torch.compile(model)          # stock backend="inductor", norm loops batched
    normfuse.uninstall()          # removes it again, leaving any other pass in place

The pass is a ``CustomGraphPass`` with a ``uuid()`` (a hash of normfuse's own sources and its
options), so Inductor resolves ``pre_grad_pass_timing="default"`` to ``"late"``: the FX graph and
AOTAutograd caches are used, not bypassed, and the pass runs only when they miss.

In that hook Inductor hands over a ``torch.fx.Graph``; its owning module is the GraphModule
Dynamo captured, whose nodes still carry Dynamo's ``example_value`` fake tensors (checked on
torch 2.13: the pre-grad passes run inside ``aot_module_simplified``, before any AOT ``val``
exists). A graph without an owning module or without fake values (a higher-order op's subgraph,
a hand-made graph) is left alone and counted in ``counters["normfuse"]["pre_grad_skipped: ..."]``.
Failures inside the pass are handled as in the backend: a warning, ``pass_failed``, and the
graph left as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch.fx as fx
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .passes.graph_utils import tensor_value

log = logging.getLogger("normfuse")

_PACKAGE = Path(__file__).resolve().parent


def _sources() -> tuple[str, ...]:
    """Every source file whose change can change what the pass does (the cache key)."""
    return tuple(sorted(str(p) for p in _PACKAGE.rglob("*.py")))


class NormFusePass(CustomGraphPass):
    """``fuse_norms`` for ``torch._inductor.config.pre_grad_custom_pass``."""

    def __init__(self, *, exact: bool = False):
        self.exact = bool(exact)
        self._was_single = False  # install() wrapped a lone pass of someone else's in a list

    def __call__(self, graph: fx.Graph) -> None:
        from .backend import run_pass  # never raises

        gm = graph.owning_module
        reason = None
        if not isinstance(gm, fx.GraphModule) or gm.graph is not graph:
            reason = "no owning GraphModule"
        elif not any(tensor_value(n) is not None for n in graph.nodes):
            reason = "no fake values on the graph"
        if reason is not None:
            counters["normfuse"][f"pre_grad_skipped: {reason}"] += 1
            log.debug("normfuse: pre-grad pass skipped a graph: %s", reason)
            return
        counters["normfuse"]["pre_grad_runs"] += 1
        run_pass(gm, exact=self.exact)

    def uuid(self) -> Any:
        return get_hash_for_files(_sources(), extra=f"normfuse.NormFusePass(exact={self.exact})").hex()

    def __repr__(self) -> str:
        return f"NormFusePass(exact={self.exact})"


def _installed() -> list[Any]:
    current = inductor_config.pre_grad_custom_pass
    if current is None:
        return []
    return list(current) if isinstance(current, (list, tuple)) else [current]


def install(*, exact: bool = False) -> NormFusePass:
    """Append normfuse to Inductor's ``pre_grad_custom_pass``, keeping any passes already there.

    Installing again replaces normfuse's own entry (so ``exact`` can be changed) and never adds a
    second one. Returns the installed pass. The setting is Inductor's global config; use
    ``torch._inductor.config.patch(pre_grad_custom_pass=...)`` for a scoped alternative.
    """
    new = NormFusePass(exact=exact)
    current = inductor_config.pre_grad_custom_pass
    previous = [p for p in _installed() if isinstance(p, NormFusePass)]
    others = [p for p in _installed() if not isinstance(p, NormFusePass)]
    if not others:
        inductor_config.pre_grad_custom_pass = new
    elif isinstance(current, (list, tuple)):
        new._was_single = any(p._was_single for p in previous)
        inductor_config.pre_grad_custom_pass = type(current)(others + [new])
    else:  # one pass of someone else's, not in a list: keep it, first
        new._was_single = True
        inductor_config.pre_grad_custom_pass = [current, new]
    return new


def uninstall() -> bool:
    """Remove normfuse from ``pre_grad_custom_pass``; other passes stay, in their order.

    Returns whether a normfuse pass was installed.
    """
    current = inductor_config.pre_grad_custom_pass
    passes = _installed()
    others = [p for p in passes if not isinstance(p, NormFusePass)]
    ours = [p for p in passes if isinstance(p, NormFusePass)]
    if not ours:
        return False
    if not others:
        inductor_config.pre_grad_custom_pass = None
    elif len(others) == 1 and any(p._was_single for p in ours):
        inductor_config.pre_grad_custom_pass = others[0]  # as it was before install()
    else:
        inductor_config.pre_grad_custom_pass = type(current)(others)
    return True
