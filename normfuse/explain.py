"""``normfuse.explain``: what the pass would rewrite in a function, without compiling it."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .backend import run_pass
from .report import FuseReport


def explain(fn: Callable[..., Any], *args: Any, exact: bool = False, **kwargs: Any) -> FuseReport:
    """Trace ``fn(*args, **kwargs)`` with Dynamo and report what normfuse would rewrite.

    Nothing is compiled: each captured graph is rewritten and run eagerly. Like
    ``torch._dynamo.explain``, this resets Dynamo's caches first.
    """
    reports: list[FuseReport] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list[Any]):
        reports.append(run_pass(gm, exact=exact))
        return gm.forward

    torch._dynamo.reset()
    try:
        torch.compile(fn, backend=capture)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return FuseReport.merge(reports)
