"""Per-slice programs: the same small computation around a norm, repeated for every slice.

Loops compute more than a bare norm per sample: ``e[i] / e[i].norm()`` (normalising embeddings),
``(g[i].norm() - 1) ** 2`` (WGAN-GP), ``sqrt(sum((g[i] ** 2).sum() for g in grads))`` (DP-SGD
per-sample norms over several tensors), ``(p[a] - p[b]).norm()`` (edge lengths). Dynamo unrolls each
into B copies of one *program*: the same ops, on slices ``x[i]`` of the same tensors (one index list
per slice position), on the same shared values (a weight, a constant).

``extract_program`` reads one element of a combiner as such a program; elements whose programs
have equal ``signature``\\ s are one batch. The batch is emitted by ``rewrite.emit_program`` in a
batch-first layout: slice ``x[i]`` of shape S becomes ``X`` of shape (n, *S), every elementwise op
runs once on the batched operands (aligned so that broadcasting means what it meant per slice), a
reduction over per-slice dims reduces the same dims shifted by one, and every recognised norm
becomes one ``vector_norm``.

A program qualifies only if it holds a norm: a recognised norm site, or a root that undoes the
power of a sum of powered reductions (the norm of several tensors, as in DP-SGD). Batching other
programs is not this pass's business (and a squared norm, or an eps inside a root, stays as it is).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

from .graph_utils import bind, is_mutating, is_number, normalize_dims, op_name, tensor_value
from .spellings import NormSite, SliceOf, elementwise_power, match_norm, match_slice, root_exponent

_ELEMENTWISE = {
    "add", "sub", "mul", "div", "pow", "neg", "abs", "sqrt", "rsqrt", "exp", "log", "log1p",
    "expm1", "sigmoid", "tanh", "relu", "square", "reciprocal", "clamp", "clamp_min", "clamp_max",
    "maximum", "minimum", "sign", "sin", "cos", "float", "double", "half", "bfloat16", "to",
}
_REDUCTIONS = {"sum", "mean", "amax", "amin"}
_RESHAPES = {"view", "reshape", "flatten", "unsqueeze", "squeeze"}


@dataclasses.dataclass(frozen=True)
class Ref:
    """An operand of a program op: a slice position, an earlier op, a shared node, a constant."""

    kind: str  # "leaf", "op", "shared", "const"
    value: Any  # leaf or op number, the shared node, the constant


@dataclasses.dataclass
class ProgramOp:
    kind: str  # "elementwise", "reduce", "reshape", "norm"
    node: fx.Node  # this element's node for the op (the site's root for a norm)
    args: Any  # node.args with Refs in place of nodes (for a norm: (input Ref,))
    kwargs: dict[str, Any]
    site: NormSite | None = None


@dataclasses.dataclass
class Program:
    """One element's program; ``leaves`` are its slices, numbered by first use."""

    leaves: list[SliceOf]
    ops: list[ProgramOp]  # in dependency order; the last is the element's result
    nodes: set[fx.Node]  # the element's own nodes (ops, site nodes), slices excluded
    shared: set[fx.Node]  # values computed outside the program that it reads
    signature: tuple

    @property
    def root(self) -> fx.Node:
        return self.ops[-1].node


class NotAProgram(Exception):
    pass


def _const_key(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_const_key(v) for v in value))
    if isinstance(value, slice):
        return ("slice", value.start, value.stop, value.step)
    if isinstance(value, float) and value != value:
        return ("nan",)
    return (type(value).__name__, value)


def extract_program(root: fx.Node) -> Program:
    """Read the program computing ``root``; raise ``NotAProgram`` if it is not one."""
    leaves: list[SliceOf] = []
    leaf_ids: dict[fx.Node, int] = {}
    ops: list[ProgramOp] = []
    memo: dict[fx.Node, Ref] = {}
    nodes: set[fx.Node] = set()

    def leaf(sl: SliceOf) -> Ref:
        # One position per slice *node*: ``p[a] - p[b]`` keeps two positions when a == b, so
        # that a self-loop edge runs the same program as every other edge.
        if sl.node not in leaf_ids:
            leaf_ids[sl.node] = len(leaves)
            leaves.append(sl)
        return Ref("leaf", leaf_ids[sl.node])

    def operand(value: Any) -> Any:
        if isinstance(value, fx.Node):
            return visit(value)
        if isinstance(value, (list, tuple)):
            return type(value)(operand(v) for v in value)
        return Ref("const", value)

    def depends(ref: Any) -> bool:
        if isinstance(ref, Ref):
            return ref.kind in ("leaf", "op")
        if isinstance(ref, (list, tuple)):
            return any(depends(r) for r in ref)
        return False

    def visit(node: fx.Node) -> Ref:
        if node in memo:
            return memo[node]
        ref = _visit(node)
        memo[node] = ref
        return ref

    def _visit(node: fx.Node) -> Ref:
        sl = match_slice(node)
        if sl is not None:
            return leaf(sl)
        site = match_norm(node)
        if site is not None and _site_is_private(site) and not _under_a_root(site):
            # ``x[i] * x[i]`` has two slice nodes of one position (match_norm checked): read the first
            inputs = [visit(site.inputs[0])]
            if not depends(inputs[0]):
                raise NotAProgram("norm of a value that is not per slice")
            nodes.update(site.nodes)
            ops.append(ProgramOp("norm", node, (inputs[0],), {}, site))
            return Ref("op", len(ops) - 1)
        name = op_name(node)
        kind = (
            "elementwise" if name in _ELEMENTWISE
            else "reduce" if name in _REDUCTIONS
            else "reshape" if name in _RESHAPES or _is_newaxis(node)
            else None
        )
        if kind is None or is_mutating(node) or tensor_value(node) is None:
            return Ref("shared", node)
        args = tuple(operand(a) for a in node.args)
        kwargs = {k: operand(v) for k, v in node.kwargs.items()}
        if not depends(args) and not depends(tuple(kwargs.values())):
            return Ref("shared", node)
        if kind != "elementwise" and not (isinstance(args[0], Ref) and depends(args[0]) and not depends(args[1:])):
            raise NotAProgram(f"{name} of a per-slice value by another")
        nodes.add(node)
        ops.append(ProgramOp(kind, node, args, kwargs))
        return Ref("op", len(ops) - 1)

    top = visit(root)
    if top.kind != "op":
        raise NotAProgram("the element is not computed per slice")
    signature = (
        tuple(sl.key for sl in leaves),
        tuple(_op_key(op) for op in ops),
    )
    shared = {ref.value for ref in memo.values() if ref.kind == "shared"}
    return Program(leaves, ops, nodes, shared, signature)


def _site_is_private(site: NormSite) -> bool:
    inner = set(site.nodes) - {site.root}
    return all(u in site.nodes for n in inner for u in n.users)


def _under_a_root(site: NormSite) -> bool:
    """``sqrt(v.abs().sum())``: a root over a root-less norm is a mismatched root, not a norm."""
    has_root = any(step[0] in ("sqrt", "root") for step in site.recipe.steps)
    direct_call = any(step[1] == "norm_call" for step in site.recipe.steps if step[0] == "reduce")
    return not has_root and not direct_call and any(root_exponent(u) is not None for u in site.root.users)


def _is_newaxis(node: fx.Node) -> bool:
    from .spellings import _is_newaxis_index

    return op_name(node) == "getitem" and len(node.args) == 2 and _is_newaxis_index(node.args[1])


def _shared_key(node: fx.Node) -> Any:
    """Loops recompute loop-invariant values (``w.sum()`` in every iteration): two such nodes are
    the same value if they run the same deterministic op on the same operands."""
    name = op_name(node)
    if name in _ELEMENTWISE | _REDUCTIONS | _RESHAPES and not is_mutating(node):
        args = tuple(_shared_key(a) if isinstance(a, fx.Node) else _const_key(a) for a in node.args)
        kwargs = tuple(sorted((k, _shared_key(v) if isinstance(v, fx.Node) else _const_key(v)) for k, v in node.kwargs.items()))
        return ("computed", node.op, node.target, args, kwargs)
    return ("node", node)


def _ref_key(value: Any) -> Any:
    if isinstance(value, Ref):
        if value.kind == "shared":
            return ("shared", _shared_key(value.value))
        return (value.kind, value.value if value.kind != "const" else _const_key(value.value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_ref_key(v) for v in value))
    return _const_key(value)


def _op_key(op: ProgramOp) -> tuple:
    value = tensor_value(op.node)
    shape = tuple(value.shape) if value is not None else None
    dtype = value.dtype if value is not None else None
    if op.kind == "norm":
        return ("norm", op.site.signature, _ref_key(op.args), shape, dtype)
    return (op.kind, op.node.op, op.node.target, _ref_key(op.args), _ref_key(op.kwargs), shape, dtype)


def holds_a_norm(program: Program) -> bool:
    """A recognised norm site, or a root undoing the power of summed powered reductions."""
    for op in program.ops:
        if op.kind == "norm":
            return True
        if op.kind == "elementwise":
            found = root_exponent(op.node)
            if found is not None and _is_power_sum(found[1], found[0], program):
                return True
    return False


def _is_power_sum(node: Any, root_exp: float, program: Program) -> bool:
    """Whether ``node`` is a sum (add tree, zero constants allowed) of sum(|v|**p), p*root == 1."""
    if is_number(node):
        return node == 0
    if not isinstance(node, fx.Node) or node not in program.nodes:
        return False
    name = op_name(node)
    if name == "add" and node.target in (operator.add, torch.add) and not node.kwargs:
        return all(_is_power_sum(a, root_exp, program) for a in node.args) and any(
            isinstance(a, fx.Node) for a in node.args
        )
    if name != "sum":
        return False
    args = bind(node)
    if args is None or args["dtype"] is not None or not isinstance(args["input"], fx.Node):
        return False
    power = elementwise_power(args["input"])
    if power is None:
        return False
    p, has_abs = power.p, power.has_abs
    if p == 1 or (not has_abs and not (p == int(p) and int(p) % 2 == 0)):
        return False
    return abs(root_exp * p - 1) <= 1e-9


def reduce_dims(node: fx.Node, rank: int) -> tuple[tuple[int, ...], bool]:
    """(dims, keepdim) of a sum/mean/amax/amin on a per-slice value of ``rank``."""
    args = bind(node)
    if args is None:
        raise NotAProgram("unreadable reduction")
    dims = args.get("dim")
    if dims is None or dims == () or dims == []:
        out = tuple(range(rank))
    else:
        out = normalize_dims(dims, rank)
        if out is None:
            raise NotAProgram("unreadable reduction dims")
    return out, bool(args.get("keepdim", False))
