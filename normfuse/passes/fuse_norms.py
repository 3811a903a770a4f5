"""fuse_norms: collapse per-slice vector norms, unrolled by Dynamo, into one batched norm.

``torch.stack([torch.sqrt((x[i] ** 2).sum()) for i in range(3)])`` reaches the backend as::

    getitem = l_x_[0];  pow_1 = getitem ** 2;  sum_1 = pow_1.sum();  sqrt = torch.sqrt(sum_1)
    getitem_1 = l_x_[1];  pow_2 = getitem_1 ** 2;  sum_2 = pow_2.sum();  sqrt_1 = torch.sqrt(sum_2)
    getitem_2 = l_x_[2];  pow_3 = getitem_2 ** 2;  sum_3 = pow_3.sum();  sqrt_2 = torch.sqrt(sum_3)
    stack = torch.stack([sqrt, sqrt_1, sqrt_2])

and leaves this pass as::

    vector_norm = torch.linalg.vector_norm(l_x_, 2, 1, False)

whatever the batch size. With ``exact=True`` the user's own ops are batched instead
(``torch.sqrt(torch.sum(torch.pow(l_x_, 2), 1, True)).reshape(3)``), which reproduces the loop
bit for bit in eager.

The pass runs on Dynamo's torch-level graph, before AOTAutograd, so autograd derives one small
backward instead of B ``select_backward`` copies and an add chain. Recognition lives in
``spellings`` (what is a slice, what is a norm), grouping and safety checks in ``grouping``,
emission in ``rewrite``. Every rewrite is checked against the node it replaces (shape, dtype)
before any use is redirected, and undone if the graph then fails ``lint``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from ..report import FuseReport, Rewrite, Skip
from .graph_utils import NodeBuilder, describe_source, is_impure, location, source_line, topo_order
from .chains import ChainGroup, MultiNormGroup, emit_chain, emit_multi_norm, find_chains, find_multi_norms
from .grouping import NormGroup, ProgramGroup, Skipped, find_groups
from .rewrite import RewriteError, emit_group, emit_program

log = logging.getLogger("normfuse")


def _skip(report: FuseReport, comb, reason: str) -> None:
    node = comb.elements[0] if comb.elements else comb.node
    report.skipped.append(
        Skip(comb.kind, reason, len(comb.elements), location(node) or location(comb.node), source_line(node))
    )
    counters["normfuse"][f"skipped: {reason}"] += 1
    log.debug("normfuse: left a %s of %d alone: %s", comb.kind, len(comb.elements), reason)


_EMITTERS = {
    NormGroup: emit_group,
    ProgramGroup: emit_program,
    ChainGroup: emit_chain,
    MultiNormGroup: emit_multi_norm,
}


def _replaced(item: Any) -> fx.Node:
    """The node a group's result replaces (its new nodes inherit this node's stack trace)."""
    if isinstance(item, ChainGroup):
        return item.site.root
    if isinstance(item, MultiNormGroup):
        return item.root
    return item.combiner.node


def _find_all(graph: fx.Graph, exact: bool) -> list[Any]:
    """Loops first; then, in the default mode, norms over several tensors and loop-free chains
    among the nodes no loop group claimed."""
    found: list[Any] = find_groups(graph)
    if exact:
        return found
    claimed: set[fx.Node] = set()
    for item in found:
        if not isinstance(item, Skipped):
            claimed |= item.owned_nodes()
    order = topo_order(graph)
    nodes = list(graph.nodes)
    loop_free = find_multi_norms(graph, claimed, order, nodes) + find_chains(graph, claimed, order, nodes)
    # an add chain of squared norms is no loop to report when it is part of a global norm
    # (rewritten, or kept as the fastest form: either way the finders claimed it)
    found = [f for f in found if not (isinstance(f, Skipped) and f.combiner.node in claimed)]
    return found + loop_free


def _describe_loop_free(item: ChainGroup | MultiNormGroup, coverage: str, removed: int) -> Rewrite:
    if isinstance(item, ChainGroup):
        site, root = item.site, item.site.root
        source, ord_, dims, spelling, pattern = (
            describe_source(site.inputs[0]), site.recipe.ord, site.dims or (), site.recipe.spelling, "chain"
        )
        count = 1
    else:
        root = item.root
        source = ", ".join(dict.fromkeys(describe_source(t) for t in item.tensors))
        ord_, dims, spelling, pattern, count = item.ord, (), item.spelling, "multi-tensor", len(item.tensors)
    rewrite = Rewrite(
        pattern=pattern, source=source, dim=-1, slices=count, coverage=coverage, ord=ord_,
        dims=tuple(dims), spelling=spelling, nodes_removed=removed, location=location(root),
        code=source_line(root), exact=False, node=root.name, anchor=item.anchor.name,
    )
    _attach_suggestion(rewrite, item, root.graph)
    return rewrite


def _describe(item: NormGroup | ProgramGroup, coverage: str, removed: int, exact: bool) -> Rewrite:
    comb = item.combiner
    if isinstance(item, NormGroup):
        site = item.site
        source, dim, ord_, dims, spelling = (
            describe_source(item.source), item.dim, site.recipe.ord, item.reduce_dims, site.recipe.spelling
        )
        slices, root = len(item.sites), site.root
    else:
        program = item.programs[0]
        sources = dict.fromkeys(describe_source(sl.source) for sl in program.leaves)
        norms = [op.site for op in program.ops if op.kind == "norm"]
        source, dim = ", ".join(sources), program.leaves[0].dim
        ord_ = norms[0].recipe.ord if norms else 2.0
        dims = norms[0].dims or () if norms else ()
        spelling = "program: " + " -> ".join(
            op.site.recipe.spelling if op.kind == "norm" else getattr(op.node.target, "__name__", None) or str(op.node.target)
            for op in program.ops
        )
        slices, root = len(item.programs), program.root
    rewrite = Rewrite(
        pattern=comb.kind,
        source=source,
        dim=dim,
        slices=slices,
        coverage=coverage,
        ord=ord_,
        dims=tuple(dims),
        spelling=spelling,
        nodes_removed=removed,
        location=location(root) or location(comb.node),
        code=source_line(root),
        exact=exact,
        node=comb.node.name,
        anchor=item.anchor.name,
    )
    _attach_suggestion(rewrite, item, comb.node.graph)
    return rewrite


def _attach_suggestion(rewrite: Rewrite, item: Any, graph: fx.Graph) -> None:
    from ..suggest import element_nodes, suggest  # here: normfuse.suggest imports this package

    try:  # the graph is rewritten by now: describing it must not fail the pass
        rewrite.element_nodes = element_nodes(item)
        found = suggest(item, graph)
    except Exception as e:
        log.debug("normfuse: no suggestion for the %s at %s: %s: %s", rewrite.pattern, rewrite.location, type(e).__name__, e)
        found = None
    if found is not None:
        rewrite.suggestion, rewrite.suggestion_kind, rewrite.names, rewrite.note = (
            found.code, found.kind, found.names, found.note
        )


def _fuse_exported(ep: "torch.export.ExportedProgram", exact: bool) -> FuseReport:
    """The pass on an exported program's ATen graph; its signature names the new outputs."""
    gm = ep.graph_module
    report = fuse_norms(gm, exact=exact)
    if report.rewrites:
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        for spec, arg in zip(ep.graph_signature.output_specs, output.args[0]):
            if isinstance(arg, fx.Node) and hasattr(spec.arg, "name"):
                spec.arg.name = arg.name
    return report


def fuse_norms(gm: fx.GraphModule, *, exact: bool = False) -> FuseReport:
    """Rewrite every group of per-slice norms in ``gm`` into one batched norm, in place.

    Args:
        gm: a GraphModule captured by Dynamo (torch-level ops, ``example_value`` metadata), an
            ATen-level GraphModule (``val`` metadata), or a ``torch.export.ExportedProgram``
            (rewritten in place, signature included, ready for AOTInductor).
        exact: emit the user's own chain of ops, batched, instead of ``vector_norm``; this
            reproduces the naive loop bit for bit in eager, overflow and NaN gradients included.

    Returns:
        A ``FuseReport`` listing what was rewritten and what was left alone, and why.

    Example::

        >>> gm = ...  # from a Dynamo backend
        >>> print(normfuse.fuse_norms(gm))
    """
    if isinstance(gm, torch.export.ExportedProgram):
        return _fuse_exported(gm, exact)
    graph = gm.graph
    report = FuseReport(exact=exact, nodes_before=len(graph.nodes))
    log.debug("normfuse: graph before\n%s", gm.code if log.isEnabledFor(logging.DEBUG) else "")

    planned: list[tuple[Any, NodeBuilder, dict[fx.Node, fx.Node], str]] = []
    for item in _find_all(graph, exact):
        if isinstance(item, Skipped):
            _skip(report, item.combiner, item.reason)
            continue
        builder = NodeBuilder(graph, item.anchor, _replaced(item))
        try:
            replacements, coverage = _EMITTERS[type(item)](builder, item, exact)
        except RewriteError as e:
            builder.discard()
            if hasattr(item, "combiner"):
                _skip(report, item.combiner, f"cannot batch: {e}")
            continue
        except Exception:
            builder.discard()
            for _, b, _, _ in planned:
                b.discard()
            raise
        planned.append((item, builder, replacements, coverage))

    if not planned:
        report.nodes_after = report.nodes_before
        return report

    journal: list[tuple[fx.Node, fx.Node]] = []
    try:
        for _, _, replacements, _ in planned:
            for old, new in replacements.items():
                old.replace_all_uses_with(new)
                journal.append((old, new))
        graph.lint()
    except Exception:
        for old, new in reversed(journal):
            new.replace_all_uses_with(old)
        for _, b, _, _ in planned:
            b.discard()
        raise

    try:
        return _finish(gm, planned, report, exact)
    except Exception as e:
        raise RewrittenThenFailed(f"{type(e).__name__}: {e}") from e


class RewrittenThenFailed(Exception):
    """A failure after the rewrite was committed: the graph is rewritten (and consistent)."""


def _finish(gm: fx.GraphModule, planned: list, report: FuseReport, exact: bool) -> FuseReport:
    """Dead-code elimination, recompile, and the report, once the new nodes are in use."""
    graph = gm.graph
    owned = [item.owned_nodes() for item, *_ in planned]
    graph.eliminate_dead_code(is_impure_node=is_impure)
    graph.lint()
    gm.recompile()
    alive = set(graph.nodes)

    for (item, builder, _, coverage), nodes in zip(planned, owned):
        removed = sum(n not in alive for n in nodes) - len(builder.created)
        if isinstance(item, (NormGroup, ProgramGroup)):
            rewrite = _describe(item, coverage, removed, exact)
        else:
            rewrite = _describe_loop_free(item, coverage, removed)
        report.rewrites.append(rewrite)
        counters["normfuse"]["rewrites"] += 1
        counters["normfuse"]["slices_collapsed"] += rewrite.slices
        counters["normfuse"]["nodes_removed"] += removed
        log.info(
            "normfuse: %s of %d per-slice %s of %s (dim %d) -> one batch, ord=%s dims=%s%s [%s]%s",
            rewrite.pattern, rewrite.slices, rewrite.spelling, rewrite.source, rewrite.dim, rewrite.ord,
            rewrite.dims, " (exact)" if exact else "", rewrite.location,
            f"; instead: {'; '.join(rewrite.suggestion.splitlines())}" if rewrite.suggestion else "",
        )

    report.nodes_after = len(graph.nodes)
    log.debug("normfuse: graph after\n%s", gm.code if log.isEnabledFor(logging.DEBUG) else "")
    return report
