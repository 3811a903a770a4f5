"""The ``normfuse`` torch.compile backend: rewrite per-slice norms, then compile with Inductor."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from .passes import fuse_norms
from .passes.fuse_norms import RewrittenThenFailed
from .report import FuseReport

log = logging.getLogger("normfuse")

#: Keys of ``torch.compile(..., options=...)`` that normfuse reads; the rest go to Inductor.
OPTION_EXACT = "normfuse.exact"


def run_pass(gm: fx.GraphModule, *, exact: bool = False) -> FuseReport:
    """``fuse_norms`` that never raises. A failure before the rewrite is committed leaves the graph
    unmodified; one after it (dead-code elimination, recompile, the report) leaves it rewritten,
    consistent and checked, and the warning says which."""
    try:
        return fuse_norms(gm, exact=exact)
    except RewrittenThenFailed as e:
        what, error = "pass failed after rewriting the graph, which is compiled as rewritten", str(e)
    except Exception as e:  # the user's compile must not break because of us
        what, error = "pass failed, compiling the unmodified graph", f"{type(e).__name__}: {e}"
    counters["normfuse"]["pass_failed"] += 1
    log.warning("normfuse: %s: %s", what, error, exc_info=log.isEnabledFor(logging.DEBUG))
    n = len(gm.graph.nodes)
    return FuseReport(nodes_before=n, nodes_after=n, exact=exact, error=error)


def backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    exact: bool = False,
):
    """A Dynamo backend: ``torch.compile(model, backend=normfuse.backend)`` or ``backend="normfuse"``.

    Args:
        gm, example_inputs: what Dynamo hands every backend.
        mode, options: as for ``backend="inductor"``; ``options`` may also hold
            ``"normfuse.exact": True``, which is how ``backend="normfuse"`` asks for exact mode.
        exact: batch the user's own ops instead of emitting ``torch.linalg.vector_norm``
            (bit-for-bit equal to the naive loop in eager). ``functools.partial(normfuse.backend,
            exact=True)`` is the other way to ask for it.
    """
    options = dict(options or {})
    exact = bool(options.pop(OPTION_EXACT, exact))
    run_pass(gm, exact=exact)
    # The same wrapper torch.compile builds for backend="inductor", so mode= and options= mean
    # exactly what they mean there (validation of option names included).
    inductor = torch._TorchCompileInductorWrapper(mode, options or None, None)
    return inductor(gm, example_inputs)
