"""``normfuse.explain``: what the pass would rewrite in a function or module, without compiling it.

For every naive site it prints and returns where it is in the user's code, the pattern, whether
it was rewritten or left alone (and why), the graph nodes before and after, and the batched code
a person could write instead. Each suggestion is *checked*: the unmodified graph is run once more
on copies of the example inputs, and when it reaches the node the group replaced (the
``torch.stack``, ``torch.cat`` or ``sum``), the suggestion is evaluated on the values its names
hold at that point and compared with that node's value (``Rewrite.check``, ``max_abs_diff``).
"""

from __future__ import annotations

import copy
import operator
import re
from typing import Any, Callable

import torch
import torch.fx as fx

from .backend import run_pass
from .report import FuseReport, Rewrite
from .suggest import KIND_NORM_PART, evaluate, namespace

# suggestion against the loop: vector_norm rounds differently from the naive chain (see the
# README's numerics); low-precision loops also round every square
TOLERANCES = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def explain(fn: Callable[..., Any], *args: Any, exact: bool = False, print_table: bool = True, **kwargs: Any) -> FuseReport:
    """Trace ``fn(*args, **kwargs)`` with Dynamo and report what normfuse would rewrite.

    ``fn`` may be a function or an ``nn.Module``. Nothing is compiled: each captured graph is
    rewritten and run eagerly, and each rewrite's suggested batched code is run on the example
    inputs and compared with the loop's result. The report (a ``FuseReport``) is printed unless
    ``print_table=False``, and returned. Like ``torch._dynamo.explain``, this resets Dynamo's
    caches before and after, so functions compiled earlier compile again on their next call.
    """
    reports: list[FuseReport] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list[Any]):
        original = _copy(gm)
        report = run_pass(gm, exact=exact)
        report.detailed = True
        if original is not None and report.rewrites:
            _graph_texts(report.rewrites, original, gm)
            _check(report.rewrites, original, example_inputs)
        reports.append(report)
        return gm.forward

    torch._dynamo.reset()
    try:
        torch.compile(fn, backend=capture)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    report = FuseReport.merge(reports)
    report.detailed = True
    if print_table:
        print(report)
    return report


def _copy(gm: fx.GraphModule) -> fx.GraphModule | None:
    try:
        return fx.GraphModule(gm, copy.deepcopy(gm.graph))
    except Exception:
        return None


# --- the graph before and after ----------------------------------------------------------------


def _statements(code: str) -> dict[str, str]:
    """Each node's assignment in a GraphModule's code, by node name (``x = None`` frees skipped)."""
    out: dict[str, str] = {}
    for line in code.splitlines():
        for statement in line.strip().split(";  "):
            found = re.match(r"([A-Za-z_]\w*) = (.*)$", statement)
            if found and not statement.endswith("= None") and found.group(1) not in out:
                out[found.group(1)] = statement
    return out


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 5] + " ...]"


def _graph_texts(rewrites: list[Rewrite], original: fx.GraphModule, gm: fx.GraphModule) -> None:
    before, after = _statements(original.code), _statements(gm.code)
    order = {n.name: i for i, n in enumerate(original.graph.nodes)}
    users = {n.name: [u.name for u in n.users] for n in original.graph.nodes}
    now = {n.name: n for n in gm.graph.nodes}
    for r in rewrites:
        if not r.node:
            continue
        mine = sorted((n for n in r.element_nodes if n in order), key=order.__getitem__)
        lines = [before[n] for n in mine if n in before]
        if lines:
            lines[-1] += f"    # 1 of {r.slices}"
        lines.append(_short(before.get(r.node, "")))
        r.graph_before = "\n".join(line for line in lines if line)
        # the inserted nodes: what the combiner's users read now, and what that was computed from
        starts = [now[u] for u in users.get(r.node, []) if u in now]
        if r.node in now:  # the combiner kept (exact mode keeps the adds of a Python sum)
            starts.append(now[r.node])
        new = _inserted(starts, order)
        r.graph_after = "\n".join(after[n.name] for n in gm.graph.nodes if n in new and n.name in after)


def _inserted(starts: list[fx.Node], old: dict[str, int]) -> set[fx.Node]:
    """The nodes not in the original graph that ``starts`` read, directly or through one another
    (or through an add chain the rewrite kept)."""
    found: set[fx.Node] = set()
    todo = [a for s in starts for a in s.all_input_nodes]
    while todo:
        node = todo.pop()
        if node in found:
            continue
        if node.name not in old:
            found.add(node)
            todo += node.all_input_nodes
        elif node.target is operator.add and any(s.target is operator.add for s in starts):
            todo += node.all_input_nodes
    return found


# --- checking the suggestions ------------------------------------------------------------------


def _fresh(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        out = value.detach().clone()
        return out.requires_grad_(value.requires_grad) if out.is_leaf and value.requires_grad else out
    return value


class _Checker(fx.Interpreter):
    """Runs the unmodified graph; at each replaced node, evaluates that group's suggestion."""

    def __init__(self, gm: fx.GraphModule, rewrites: list[Rewrite]):
        super().__init__(gm)
        self.at = {r.node: r for r in rewrites}
        self.wanted = {name for r in rewrites for name in r.names.values()}
        self.kept: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.kept[n.name] = out  # the live value: in-place writes up to the check show in it
        if n.name in self.at:
            _check_one(self.at.pop(n.name), out, self.kept)
        return out


def _check(rewrites: list[Rewrite], original: fx.GraphModule, example_inputs: list[Any]) -> None:
    todo = []
    for r in rewrites:
        if not r.suggestion:
            continue
        if r.suggestion_kind == KIND_NORM_PART:
            r.check = "not checked: the norm part alone is not the loop's value"
        else:
            todo.append(r)
    if not todo:
        return
    checker = _Checker(original, todo)
    try:
        checker.run(*[_fresh(x) for x in example_inputs])
    except Exception as e:
        for r in checker.at.values():
            r.check = f"not checked: the unmodified graph failed to run ({type(e).__name__}: {e})"
        return
    for r in checker.at.values():
        r.check = "not checked: the replaced node was not reached"


def _check_one(r: Rewrite, want: Any, kept: dict[str, Any]) -> None:
    try:
        with torch.no_grad():
            got = evaluate(r.suggestion, namespace({expr: kept[node] for expr, node in r.names.items()}))
    except Exception as e:
        r.check = f"failed: {type(e).__name__}: {e}"
        return
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor):
        r.check = "failed: not a tensor"
        return
    if got.shape != want.shape or got.dtype != want.dtype:
        r.check = f"failed: {tuple(got.shape)} {got.dtype} instead of {tuple(want.shape)} {want.dtype}"
        return
    a, b = got.detach().double(), want.detach().double()
    same = (a == b) | (a.isnan() & b.isnan())
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs())
    r.max_abs_diff = float(diff.max()) if diff.numel() else 0.0
    rtol, atol = TOLERANCES.get(want.dtype, (1e-4, 1e-5))
    r.check = "passed" if torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True) else "failed"
