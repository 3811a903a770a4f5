"""Grouping per-slice norms into one batch.

A *combiner* gathers per-slice results: ``torch.stack(list, dim)``, ``torch.cat(list, dim)``, or
the ``operator.add`` chain Dynamo records for Python's ``sum(...)``. ``find_groups`` reads every
combiner in the graph and returns, for each, either a ``NormGroup`` (every element is the same
norm of a slice of one source tensor, and rewriting it is safe) or a ``Skipped`` with the reason
in words. Nothing here changes the graph.
"""

from __future__ import annotations

import dataclasses
import torch
import torch.fx as fx

from .graph_utils import (
    bind,
    is_mutating,
    is_plain_add,
    is_number,
    may_alias,
    normalize_dim,
    op_name,
    tensor_value,
    topo_order,
)
from .programs import NotAProgram, Program, extract_program, holds_a_norm
from .spellings import NormSite, SliceOf, match_norm, match_slice

_REAL_FLOATS = {torch.float16, torch.bfloat16, torch.float32, torch.float64}


@dataclasses.dataclass
class Combiner:
    node: fx.Node  # the node whose value the rewrite replaces
    kind: str  # "stack", "cat" or "sum"
    elements: list[fx.Node]
    dim: int = 0  # stack/cat dim, normalised against the combined result
    chain: list[fx.Node] = dataclasses.field(default_factory=list)  # the add nodes of a "sum"


@dataclasses.dataclass
class NormGroup:
    combiner: Combiner
    sites: list[NormSite]
    slices: list[SliceOf]  # one per site (the first input of each)
    source: fx.Node
    dim: int  # the sliced dim of ``source``
    indices: list[int]
    reduce_dims: tuple[int, ...]  # dims of ``source`` the norm reduces, ``dim`` excluded
    anchor: fx.Node  # new nodes go before this node: the first read of ``source``

    @property
    def site(self) -> NormSite:
        return self.sites[0]

    def owned_nodes(self) -> set[fx.Node]:
        """Every node the rewrite makes dead if nothing else uses it."""
        nodes = [n for site in self.sites for n in (*site.nodes, *site.inputs)]
        return _owned(self.combiner, nodes, self.slices)


@dataclasses.dataclass
class ProgramGroup:
    """Elements that run one per-slice program around a norm (see ``programs``)."""

    combiner: Combiner
    programs: list[Program]
    anchor: fx.Node

    def owned_nodes(self) -> set[fx.Node]:
        nodes = [n for program in self.programs for n in program.nodes]
        return _owned(self.combiner, nodes, [sl for program in self.programs for sl in program.leaves])


def _owned(combiner: Combiner, nodes: list[fx.Node], slices: list[SliceOf]) -> set[fx.Node]:
    owned = {combiner.node, *combiner.chain, *nodes}
    for sl in slices:
        owned.add(sl.node)
        if sl.parent is not None:
            owned.add(sl.parent)
    return owned


@dataclasses.dataclass
class Skipped:
    combiner: Combiner
    reason: str


def _combiner(node: fx.Node) -> Combiner | None:
    name = op_name(node)
    if name in ("stack", "cat") and node.op == "call_function":
        args = bind(node)
        if args is None:
            return None
        tensors = args["tensors"]
        out = tensor_value(node)
        if not isinstance(tensors, (list, tuple)) or not tensors or out is None:
            return None
        if not all(isinstance(t, fx.Node) for t in tensors):
            return None
        dim = normalize_dim(args["dim"], out.ndim)
        if dim is None:
            return None
        return Combiner(node, name, list(tensors), dim)
    if is_plain_add(node):
        return _sum_chain(node)
    return None


def _sum_chain(last: fx.Node) -> Combiner | None:
    """The add chain ending at ``last`` (``sum(gen)`` or ``a + b + c``), read back to its start."""
    if len(last.users) == 1 and is_plain_add(next(iter(last.users))):
        return None  # not the end of the chain
    chain, elements = [last], []
    node = last
    while True:
        lhs, rhs = node.args
        if not isinstance(rhs, fx.Node):
            return None
        elements.append(rhs)
        if isinstance(lhs, fx.Node) and _chain_link(lhs):
            chain.append(lhs)
            node = lhs
            continue
        if isinstance(lhs, fx.Node):
            elements.append(lhs)
        elif not (is_number(lhs) and lhs == 0):
            return None
        break
    if len(elements) < 2:
        return None
    return Combiner(last, "sum", elements[::-1], 0, chain[::-1])


def _chain_link(node: fx.Node) -> bool:
    """An add that continues a sum: it adds an element to the sum so far (or to sum's start, 0).
    ``n * 2 + 1`` adds a constant: it is an element that ends in an add, not a link."""
    if not (is_plain_add(node) and len(node.users) == 1):
        return False
    lhs, rhs = node.args
    return isinstance(rhs, fx.Node) and (isinstance(lhs, fx.Node) or (is_number(lhs) and lhs == 0))


def _near_miss_reason(root: fx.Node) -> str | None:
    """A reason in words for an element that looks like a norm but is not one we may rewrite."""
    name = op_name(root)
    if name == "sqrt" or (name == "pow" and len(root.args) > 1 and root.args[1] == 0.5):
        below = root.args[0]
        if isinstance(below, fx.Node) and op_name(below) == "add":
            return "eps inside the root"
        if isinstance(below, fx.Node) and op_name(below) in ("sum", "amax", "max"):
            return "the root does not undo the power"
    if name == "sum":
        inner = root.args[0] if root.args else None
        if isinstance(inner, fx.Node) and op_name(inner) in ("pow", "square", "mul"):
            return "squared norm with no root"
    if name in ("norm", "linalg_norm"):
        return "matrix norm"
    if name == "pow" and isinstance(root.args[0], fx.Node) and op_name(root.args[0]) == "sum":
        return "the root does not undo the power"
    return None


def _analyse(comb: Combiner, order: dict[fx.Node, int], nodes: list[fx.Node]) -> NormGroup | Skipped | None:
    sites = [match_norm(e) for e in comb.elements]
    if not any(sites):
        reasons = {_near_miss_reason(e) for e in comb.elements} - {None}
        if not reasons:
            return None  # not a norm combiner at all
        return Skipped(comb, sorted(reasons)[0])
    if not all(sites):
        return Skipped(comb, "not every element is a norm")
    slices: list[SliceOf] = []
    for site in sites:
        found = [match_slice(i) for i in site.inputs]
        if not all(found):
            return Skipped(comb, "a norm input is not a slice of a tensor")
        slices.append(found[0])
    first = slices[0]
    if any(s.key != first.key for s in slices):
        return Skipped(comb, "slices of different source tensors or dims")
    if any(site.signature != sites[0].signature for site in sites):
        return Skipped(comb, "the norms are not all the same")

    source = first.source
    src = tensor_value(source)
    if src is None:
        return Skipped(comb, "unknown source tensor")
    if src.dtype.is_complex:
        return Skipped(comb, "complex input")
    math_dtype = src.dtype
    for step in sites[0].recipe.steps:
        if step[0] == "cast":
            math_dtype = step[1]
    if math_dtype not in _REAL_FLOATS:
        kind = "integer" if not math_dtype.is_floating_point and math_dtype != torch.bool else str(math_dtype)
        return Skipped(comb, f"{kind.replace('torch.', '')} input")
    if sites[0].recipe.dtype is not None and sites[0].recipe.dtype not in _REAL_FLOATS:
        return Skipped(comb, "non-float reduction dtype")

    # Uses outside the site: the rewrite would keep the per-slice work alive (or change a value).
    members = set(comb.chain) | {comb.node}
    for site in sites:
        inner = set(site.nodes) - {site.root}
        members |= set(site.nodes)
        for node in inner:
            if any(u not in site.nodes for u in node.users):
                return Skipped(comb, "an intermediate is used elsewhere")
    for site in sites:
        if any(u not in members for u in site.root.users):
            return Skipped(comb, "a per-slice norm is used elsewhere")

    reduce_dims = _source_reduce_dims(sites[0], first, src.ndim)
    if reduce_dims is None:
        return Skipped(comb, "the norm reduces no dim besides the sliced one")

    reads = [s.node for s in slices] + [s.parent for s in slices if s.parent is not None]
    for site in sites:
        reads += list(site.inputs)
    first_read = _mutation_between(reads, [n for site in sites for n in site.nodes], [source], order, nodes)
    if first_read is None:
        return Skipped(comb, "the source is mutated between the slices")
    return NormGroup(comb, sites, slices, source, first.dim, [s.index for s in slices], reduce_dims, first_read)


def _mutation_between(reads, uses, sources, order, nodes) -> fx.Node | None:
    """The first read, if nothing may write to a source between it and the last use; else None."""
    first_read = min(reads, key=order.__getitem__)
    last_use = max(uses, key=order.__getitem__)
    for node in nodes[order[first_read] : order[last_use] + 1]:
        if is_mutating(node) and any(not node.args or may_alias(src, node.args[0]) for src in sources):
            return None
    return first_read


def _analyse_program(comb: Combiner, order: dict[fx.Node, int], nodes: list[fx.Node]) -> ProgramGroup | str | None:
    """A ProgramGroup; a reason (str) if the elements are one program but may not be batched;
    None if they are not one program around a norm."""
    try:
        programs = [extract_program(e) for e in comb.elements]
    except NotAProgram:
        return None
    if any(p.signature != programs[0].signature for p in programs) or not holds_a_norm(programs[0]):
        return None
    for sl in programs[0].leaves:
        dtype = tensor_value(sl.source).dtype
        if dtype not in _REAL_FLOATS:
            return "complex input" if dtype.is_complex else "integer input"
    members = set(comb.chain) | {comb.node}
    if len(set().union(*(p.nodes for p in programs))) != sum(len(p.nodes) for p in programs):
        return "an intermediate is used elsewhere"
    for program in programs:
        for node in program.nodes:
            allowed = program.nodes | (members if node is program.root else set())
            if any(u not in allowed for u in node.users):
                return "an intermediate is used elsewhere" if node is not program.root else "a per-slice norm is used elsewhere"
    reads = [sl.node for p in programs for sl in p.leaves] + [
        sl.parent for p in programs for sl in p.leaves if sl.parent is not None
    ]
    sources = list({sl.source: None for sl in programs[0].leaves})
    first_read = _mutation_between(reads, [n for p in programs for n in p.nodes], sources, order, nodes)
    if first_read is None:
        return "the source is mutated between the slices"
    # the batch goes where the first program could have run: after the values it shares
    anchor = max([first_read, *(s.next for s in programs[0].shared)], key=lambda n: order.get(n, len(nodes)))
    return ProgramGroup(comb, programs, anchor)


def _source_reduce_dims(site: NormSite, sl: SliceOf, src_ndim: int) -> tuple[int, ...] | None:
    """The norm's reduced dims in the source's coordinates, the sliced dim left out."""
    slice_ndim = src_ndim if sl.keepdim else src_ndim - 1
    dims = site.dims if site.dims is not None else tuple(range(slice_ndim))
    if sl.keepdim:
        out = tuple(d for d in dims if d != sl.dim)
    else:
        out = tuple(d if d < sl.dim else d + 1 for d in dims)
    return tuple(sorted(out)) or None


def find_groups(graph: fx.Graph) -> list[NormGroup | ProgramGroup | Skipped]:
    """Every combiner's verdict, latest combiner first: a group claims its nodes, so a combiner
    inside another group's program (an inner ``sum`` of squares, say) is not looked at again."""
    order = topo_order(graph)
    nodes = list(graph.nodes)
    found: list[NormGroup | ProgramGroup | Skipped] = []
    claimed: set[fx.Node] = set()
    for node in reversed(nodes):
        if node in claimed:
            continue
        comb = _combiner(node)
        if comb is None or any(e in claimed for e in comb.elements):
            continue
        result = _analyse(comb, order, nodes)
        if not isinstance(result, NormGroup):
            program = _analyse_program(comb, order, nodes)
            if isinstance(program, ProgramGroup):
                result = program
            elif result is None and isinstance(program, str):
                result = Skipped(comb, program)
        if result is None:
            continue
        if not isinstance(result, Skipped):
            claimed |= result.owned_nodes()
        found.append(result)
    return found[::-1]
