"""Rewriting one group of per-slice norms into one batched computation.

For a group over ``x`` sliced along ``d`` at ``indices`` and normed over ``R`` (in ``x``'s dims):

1. coverage: ``x`` itself when the slices cover ``d`` in order, ``x[a:b:s]`` for an arithmetic
   progression, else ``x.index_select(d, indices)``;
2. the norm: one ``torch.linalg.vector_norm(xs, ord, R)``; in exact mode the user's own chain
   (``pow``, ``sum``, ``sqrt``...) replayed on the whole tensor, with the sliced dim moved first
   and made contiguous so that every slice is reduced in the same order as the naive loop;
3. layout: the result is put in the combiner's layout with views (``movedim``, ``reshape``,
   ``flatten``); the common cases need none.

The new nodes are inserted before the group's first read of ``x`` and carry fake values; the
final node's shape and dtype are checked against the node it replaces before anything is
redirected.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from .graph_utils import NodeBuilder, RewriteError, op_name, same_shape, same_size, tensor_value
from .grouping import Combiner, NormGroup, ProgramGroup
from .programs import ProgramOp, Ref, reduce_dims
from .spellings import NormRecipe


def _coverage(b: NodeBuilder, source: fx.Node, d: int, idx: list[int]) -> tuple[fx.Node, str]:
    """``source`` restricted to positions ``idx`` along ``d``, in that order."""
    size = tensor_value(source).shape[d]
    n = len(idx)
    prefix = "" if d == 0 else ":, " * d
    if same_size(size, n) and idx == list(range(n)):
        return source, "all"
    step = idx[1] - idx[0] if n > 1 else 1
    if step >= 1 and all(b_ - a_ == step for a_, b_ in zip(idx, idx[1:])):
        stop = idx[-1] + 1
        picked = slice(idx[0], stop, None if step == 1 else step)
        index = picked if d == 0 else (slice(None),) * d + (picked,)
        text = f"[{prefix}{idx[0]}:{stop}" + ("" if step == 1 else f":{step}") + "]"
        return b.call(operator.getitem, source, index), text
    device = str(tensor_value(source).device)
    positions = b.call(torch.tensor, idx, dtype=torch.int64, device=device)
    return b.call(torch.index_select, source, d, positions), f"index_select(dim={d}, {n} indices)"


def _static_ord(value: float) -> int | float:
    return int(value) if math.isfinite(value) and value == int(value) else value


def _dims_arg(dims: tuple[int, ...]) -> int | tuple[int, ...]:
    return dims[0] if len(dims) == 1 else dims


def _target_shape(n: int, shape: torch.Size) -> tuple[Any, ...]:
    target: list[Any] = [n]
    symbolic = 0
    for size in shape:
        if isinstance(size, int):
            target.append(size)
        else:
            symbolic += 1
            target.append(-1)
    if symbolic > 1:
        raise RewriteError("more than one symbolic size in the per-slice result")
    return tuple(target)


def _vector_norm(b: NodeBuilder, xs: fx.Node, group: NormGroup, dims: tuple[int, ...], keepdim: bool) -> fx.Node:
    recipe = group.site.recipe
    kwargs = {"dtype": recipe.dtype} if recipe.dtype is not None else {}
    return b.call(torch.linalg.vector_norm, xs, _static_ord(recipe.ord), _dims_arg(dims), keepdim, **kwargs)


def _replay(b: NodeBuilder, z: fx.Node, recipe: NormRecipe, dims: tuple[int, ...], before_reduce=None) -> fx.Node:
    """The user's own chain, on the batched tensor, reducing ``dims`` with keepdim."""
    dim_arg = _dims_arg(dims)
    for step in recipe.steps:
        kind = step[0]
        if kind == "cast":
            continue  # applied before the batch is laid out
        if kind == "reduce" and before_reduce is not None:
            z = before_reduce(z)
        if kind == "abs":
            z = b.call(torch.abs, z)
        elif kind == "pow":
            z = b.call(torch.pow, z, step[1])
        elif kind == "square":
            z = b.call(torch.square, z)
        elif kind == "mul_self":
            z = b.call(torch.mul, z, z)
        elif kind == "reduce":
            reduce_kind, extra = step[1], step[2]
            if reduce_kind == "sum":
                kwargs = {"dtype": extra} if extra is not None else {}
                z = b.call(torch.sum, z, dim_arg, True, **kwargs)
            elif reduce_kind in ("amax", "amin"):
                z = b.call(getattr(torch, reduce_kind), z, dim_arg, True)
            elif reduce_kind in ("max_all", "min_all"):
                # no batched max() over several dims; vector_norm(|v|, ±inf) has its gradient
                z = b.call(torch.linalg.vector_norm, z, math.inf if reduce_kind == "max_all" else -math.inf, dim_arg, True)
            else:
                kwargs = {"dtype": recipe.dtype} if recipe.dtype is not None else {}
                z = b.call(torch.linalg.vector_norm, z, _static_ord(extra), dim_arg, True, **kwargs)
        elif kind == "sqrt":
            z = b.call(torch.sqrt, z)
        elif kind == "root":
            z = b.call(torch.pow, z, step[1])
        else:  # pragma: no cover - the recogniser emits no other step
            raise RewriteError(f"unknown step {kind}")
    return z


def _casts(b: NodeBuilder, xs: fx.Node, steps: tuple[tuple, ...]) -> fx.Node:
    for step in steps:
        if step[0] == "cast":
            xs = b.method("to", xs, step[1])
    return xs


def without_dims(shape: list[Any], dims: set[int]) -> list[Any]:
    return [s for i, s in enumerate(shape) if i not in dims]


def _direct(b: NodeBuilder, xs: fx.Node, group: NormGroup, per_slice: torch.Size) -> fx.Node | None:
    """One vector_norm whose layout is already the combiner's, if there is one."""
    comb, d, dims = group.combiner, group.dim, group.reduce_dims
    shape = list(tensor_value(xs).shape)
    dropped = without_dims(shape, set(dims))  # keepdim=False result
    kept = [1 if i in dims else s for i, s in enumerate(shape)]  # keepdim=True result
    d_dropped = d - sum(r < d for r in dims)
    per = list(per_slice)
    if comb.kind == "stack" and comb.dim == d_dropped and same_shape(per, without_dims(dropped, {d_dropped})):
        return _vector_norm(b, xs, group, dims, False)
    if comb.kind == "stack" and comb.dim == d and same_shape(per, without_dims(kept, {d})):
        return _vector_norm(b, xs, group, dims, True)
    if comb.kind == "cat" and comb.dim == d_dropped and same_shape(per, dropped[:d_dropped] + [1] + dropped[d_dropped + 1 :]):
        return _vector_norm(b, xs, group, dims, False)
    if comb.kind == "cat" and comb.dim == d and same_shape(per, kept[:d] + [1] + kept[d + 1 :]):
        return _vector_norm(b, xs, group, dims, True)
    if comb.kind == "sum" and same_shape(per, without_dims(dropped, {d_dropped})):
        return b.method("sum", _vector_norm(b, xs, group, dims, False), d_dropped)
    return None


def _place(b: NodeBuilder, stacked: fx.Node, comb: Combiner) -> fx.Node:
    """``stacked`` holds the per-slice results along dim 0; lay them out as the combiner does."""
    if comb.kind == "sum":
        return b.method("sum", stacked, 0)
    out = stacked if comb.dim == 0 else b.method("movedim", stacked, 0, comb.dim)
    if comb.kind == "cat":
        out = b.method("flatten", out, comb.dim, comb.dim + 1)
    return out


def emit_group(b: NodeBuilder, group: NormGroup, exact: bool) -> tuple[dict[fx.Node, fx.Node], str]:
    """Insert the batched computation; return {old node: new node} and the coverage text."""
    steps = group.site.recipe.steps
    xs, coverage = _coverage(b, group.source, group.dim, group.indices)
    xs = _casts(b, xs, steps)
    per_slice = tensor_value(group.site.root).shape
    n, d = len(group.indices), group.dim

    if not exact:
        final = _direct(b, xs, group, per_slice)
        if final is None:
            y = _vector_norm(b, xs, group, group.reduce_dims, True)
            y = y if d == 0 else b.method("movedim", y, d, 0)
            final = _place(b, b.method("reshape", y, _target_shape(n, per_slice)), group.combiner)
        replacements = {group.combiner.node: final}
    else:
        # Bitwise equality needs each slice reduced in the order the loop reduced it. A norm
        # called on the slice itself walks the slice's own strides: reduce the source in place.
        # Any op before the reduction (a cast, a square) hands the reduction a contiguous
        # per-slice tensor: lay the batch out the same way, slice dim first, contiguous.
        if steps[0][0] == "reduce":
            y = _replay(b, xs, group.site.recipe, group.reduce_dims)
            y = y if d == 0 else b.method("movedim", y, d, 0)
        else:
            reduced = tensor_value(group.site.reduction.args[0])
            if reduced is None or not reduced.is_contiguous():
                # e.g. slices strided in two dims: the loop reduces each in its own memory order
                raise RewriteError("exact mode cannot reproduce the loop's reduction order over a strided slice")
            z = xs if d == 0 else b.method("movedim", xs, d, 0)
            if not tensor_value(z).is_contiguous():
                z = b.method("contiguous", z)
            dims = tuple(sorted(r + 1 if r < d else r for r in group.reduce_dims))
            y = _replay(b, z, group.site.recipe, dims)
        stacked = b.method("reshape", y, _target_shape(n, per_slice))
        replacements = _combine(b, stacked, group.combiner, exact)
    _check(replacements)
    return replacements, coverage


def _combine(b: NodeBuilder, stacked: fx.Node, comb: Combiner, exact: bool) -> dict[fx.Node, fx.Node]:
    if comb.kind == "sum" and exact:
        # Keep the user's sequence of adds: a single sum would round differently.
        items = b.method("unbind", stacked, 0)
        replacements: dict[fx.Node, fx.Node] = {}
        for j, element in enumerate(comb.elements):
            if element not in replacements:
                replacements[element] = b.call(operator.getitem, items, j)
        return replacements
    out = _place(b, stacked, comb)
    if exact and not tensor_value(out).is_contiguous():
        # torch.stack/cat return contiguous tensors; a later reduction adds in memory order
        out = b.method("contiguous", out)
    return {comb.node: out}


def _check(replacements: dict[fx.Node, fx.Node]) -> None:
    for old, new in replacements.items():
        want, got = tensor_value(old), tensor_value(new)
        if want is None or got is None or not same_shape(want.shape, got.shape) or want.dtype != got.dtype:
            raise RewriteError(
                f"batched result {None if got is None else (tuple(got.shape), got.dtype)} does not match "
                f"{None if want is None else (tuple(want.shape), want.dtype)}"
            )


def _contiguous_like(b: NodeBuilder, per_slice: Any):
    """Exact mode: before a reduction, lay the batch out as the loop laid out each slice."""

    def fix(z: fx.Node) -> fx.Node:
        if per_slice is None or not per_slice.is_contiguous():
            raise RewriteError("exact mode cannot batch a reduction over a strided slice bit for bit")
        return z if tensor_value(z).is_contiguous() else b.method("contiguous", z)

    return fix


def emit_program(b: NodeBuilder, group: ProgramGroup, exact: bool) -> tuple[dict[fx.Node, fx.Node], str]:
    """Run one element's program once on batch-first tensors (see ``programs``)."""
    first = group.programs[0]
    n = len(group.programs)
    values: dict[Ref, tuple[fx.Node, int]] = {}
    coverages = []
    for j, sl in enumerate(first.leaves):
        xs, text = _coverage(b, sl.source, sl.dim, [p.leaves[j].index for p in group.programs])
        coverages.append(text)
        x = xs if sl.dim == 0 else b.method("movedim", xs, sl.dim, 0)
        if sl.keepdim:
            x = b.method("unsqueeze", x, sl.dim + 1)
        values[Ref("leaf", j)] = (x, tensor_value(sl.node).ndim)

    def batched(value: Any, rank: int) -> Any:
        if isinstance(value, Ref):
            if value.kind == "shared":
                return value.value
            if value.kind == "const":
                return value.value
            node, own = values[value]
            for _ in range(rank - own):
                node = b.method("unsqueeze", node, 1)
            return node
        if isinstance(value, (list, tuple)):
            return type(value)(batched(v, rank) for v in value)
        return value

    for k, op in enumerate(first.ops):
        out = tensor_value(op.node)
        rank = out.ndim
        if op.kind == "elementwise":
            args = batched(op.args, rank)
            kwargs = {key: batched(v, rank) for key, v in op.kwargs.items()}
            node = b.add(op.node.op, op.node.target, args, kwargs)
        elif op.kind == "reshape":
            node = b.method("reshape", values[op.args[0]][0], _target_shape(n, out.shape))
        elif op.kind == "reduce":
            x, own = values[op.args[0]]
            dims, keepdim = reduce_dims(op.node, own)
            if exact:
                x = _contiguous_like(b, tensor_value(op.node.args[0]))(x)
            kwargs = {"dtype": op.node.kwargs["dtype"]} if op.node.kwargs.get("dtype") is not None else {}
            node = b.call(getattr(torch, op_name(op.node)), x, tuple(d + 1 for d in dims), keepdim, **kwargs)
        else:
            node = _batched_norm(b, op, values[op.args[0]], exact)
        if not same_shape(tensor_value(node).shape, (n, *out.shape)):
            node = b.method("reshape", node, _target_shape(n, out.shape))
        values[Ref("op", k)] = (node, rank)

    replacements = _combine(b, values[Ref("op", len(first.ops) - 1)][0], group.combiner, exact)
    _check(replacements)
    return replacements, "; ".join(dict.fromkeys(coverages))


def _batched_norm(b: NodeBuilder, op: ProgramOp, operand: tuple[fx.Node, int], exact: bool) -> fx.Node:
    site = op.site
    x, own = operand
    if own == 0:
        raise RewriteError("a norm of a per-slice scalar")
    recipe = site.recipe
    dims = tuple(d + 1 for d in (site.dims if site.dims is not None else range(own)))
    x = _casts(b, x, recipe.steps)
    if not exact:
        kwargs = {"dtype": recipe.dtype} if recipe.dtype is not None else {}
        return b.call(torch.linalg.vector_norm, x, _static_ord(recipe.ord), _dims_arg(dims), site.keepdim, **kwargs)
    reduced = site.reduction.args[0] if site.reduction.args else site.reduction.kwargs.get("input")
    return _replay(b, x, recipe, dims, before_reduce=_contiguous_like(b, tensor_value(reduced)))
