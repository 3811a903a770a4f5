"""Recognising the ways people spell a slice of a tensor and a vector norm of it.

Two recognisers, both pure (they read the graph and never change it):

* ``match_slice(node)``: is ``node`` one slice ``x[i]`` of a source tensor along one dim?
  ``x[i]``, ``x.select(d, i)``, ``for row in x``, ``x.unbind(d)[i]``, ``x[:, j]``, ``x[..., j]``
  drop the dim; ``x[i:i+1]``, ``x.narrow(d, i, 1)``, ``x.split(1, d)[i]`` and ``x.chunk(n, d)[i]``
  with ``n == x.shape[d]`` keep it (size 1).
* ``match_norm(node)``: is ``node`` a vector norm of one tensor ``v``? Direct calls
  (``torch.linalg.vector_norm``, ``torch.linalg.norm`` and ``torch.norm``/``Tensor.norm`` in their
  vector cases) and hand-written chains: an elementwise power (``v**2``, ``v.pow(2)``,
  ``torch.pow(v, 2)``, ``v*v``, ``square``, ``v.abs()**p``, ``v.abs()``), a reduction (``sum``;
  ``max``/``amax``/``min``/``amin`` of ``abs``), and the matching root (``sqrt``, ``**0.5``,
  ``pow(1/p)``). Reshapes applied to the result (``unsqueeze``, ``view``, ``[None]``...) are part
  of the site, since they move no element.

A recognised norm is described by a ``NormRecipe``: enough to emit either one batched
``vector_norm`` or, in exact mode, the user's own chain of ops on the whole tensor.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.fx as fx

from .graph_utils import (
    bind,
    is_number,
    is_static_int,
    normalize_dim,
    normalize_dims,
    op_name,
    tensor_value,
)

_CASTS = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}
_RESHAPES = {"unsqueeze", "view", "reshape", "squeeze", "flatten"}


@dataclasses.dataclass(frozen=True)
class SliceOf:
    """``node`` is ``source`` indexed at ``index`` along ``dim`` (kept with size 1 if ``keepdim``)."""

    node: fx.Node
    source: fx.Node
    dim: int
    index: int
    keepdim: bool
    parent: fx.Node | None = None  # the unbind/split/chunk node a getitem reads from

    @property
    def key(self) -> tuple:
        return (self.source, self.dim, self.keepdim, self.parent)


def _unit_index(index: Any, size: Any) -> tuple[int, bool] | None:
    """(index, keepdim) for an int or a length-one slice along a dim of ``size``."""
    if is_static_int(index):
        if not is_static_int(size):
            return (index, False) if index >= 0 else None
        return (index % size, False) if -size <= index < size else None
    if isinstance(index, slice):
        parts = (index.start, index.stop, index.step)
        if not all(p is None or is_static_int(p) for p in parts) or index.step not in (None, 1):
            return None
        if is_static_int(size):
            picked = range(*index.indices(size))
            return (picked[0], True) if len(picked) == 1 else None
        start, stop = index.start, index.stop
        if is_static_int(start) and is_static_int(stop) and 0 <= start and stop == start + 1:
            return start, True
    return None


def _is_full_slice(index: Any) -> bool:
    return isinstance(index, slice) and index == slice(None, None, None)


def _match_getitem_index(source: torch.Tensor, index: Any) -> tuple[int, int, bool] | None:
    """(dim, index, keepdim) if ``index`` picks one position along one dim and keeps the rest."""
    items = index if isinstance(index, tuple) else (index,)
    if sum(i is Ellipsis for i in items) > 1 or any(i is None for i in items):
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = source.ndim - (len(items) - 1)
        if fill < 0:
            return None
        items = items[:at] + (slice(None),) * fill + items[at + 1 :]
    picked = [(d, i) for d, i in enumerate(items) if not _is_full_slice(i)]
    if len(picked) != 1 or len(items) > source.ndim:
        return None
    dim, raw = picked[0]
    unit = _unit_index(raw, source.shape[dim])
    if unit is None:
        return None
    return dim, unit[0], unit[1]


# Slices named by (dim, position): how to read the position, and whether the dim is kept.
_POSITIONAL_SLICES = {
    "select": (lambda a: a["index"], False),
    "slice": (lambda a: slice(a["start"], a["end"], a["step"]), True),  # ATen's x[i:i+1]
    "narrow": (lambda a: a["start"] if a["length"] == 1 else None, True),
}


def match_slice(node: fx.Node) -> SliceOf | None:
    name = op_name(node)
    args = bind(node)
    if args is None:
        return None
    if name in _POSITIONAL_SLICES:
        index_of, keepdim = _POSITIONAL_SLICES[name]
        source, index = args["input"], index_of(args)
        src = tensor_value(source)
        if src is None or index is None:
            return None
        dim = normalize_dim(args["dim"], src.ndim)
        unit = None if dim is None else _unit_index(index, src.shape[dim])
        return None if unit is None else SliceOf(node, source, dim, unit[0], keepdim)
    if name != "getitem":
        return None
    parent, index = args["input"], args["index"]
    if not isinstance(parent, fx.Node):
        return None
    src = tensor_value(parent)
    if src is not None:
        picked = _match_getitem_index(src, index)
        if picked is None:
            return None
        return SliceOf(node, parent, *picked)
    # getitem of a tuple: x.unbind(d)[i], x.split(1, d)[i], x.chunk(n, d)[i]
    if not is_static_int(index):
        return None
    pname, pargs = op_name(parent), bind(parent)
    if pargs is None or pname not in ("unbind", "split", "chunk"):
        return None
    source = pargs["input"]
    src = tensor_value(source)
    if src is None:
        return None
    dim = normalize_dim(pargs["dim"], src.ndim)
    if dim is None or not is_static_int(src.shape[dim]):
        return None
    size = src.shape[dim]
    if pname == "unbind":
        keepdim = False
    elif pname == "split":
        sizes = pargs["split_size_or_sections"]
        if not (sizes == 1 or (isinstance(sizes, (list, tuple)) and all(s == 1 for s in sizes))):
            return None
        keepdim = True
    else:
        if pargs["chunks"] != size:
            return None
        keepdim = True
    if not -size <= index < size:
        return None
    return SliceOf(node, source, dim, index % size, keepdim, parent)


@dataclasses.dataclass(frozen=True)
class NormRecipe:
    """A vector norm of ``v``, and the user's steps to recompute it exactly.

    ``steps`` run in order on ``v``: ("cast", dtype), ("abs",), ("pow", p), ("square",),
    ("mul_self",), ("reduce", kind, extra), ("sqrt",), ("root", r). The reduce step's dims are
    not part of the recipe: they belong to the site, and change when the norm is batched.
    """

    ord: float
    steps: tuple[tuple, ...]
    dtype: torch.dtype | None  # the ``dtype=`` of the reduction, if the user gave one
    spelling: str


@dataclasses.dataclass(frozen=True)
class NormSite:
    """``root`` holds a vector norm of ``inputs[0]`` over ``dims`` (None: all), reshaped."""

    root: fx.Node
    inputs: tuple[fx.Node, ...]  # the tensor normed; twice for ``v * v`` spelled with two slices
    nodes: tuple[fx.Node, ...]  # every node of the site but its inputs, root included
    reduction: fx.Node
    recipe: NormRecipe
    dims: tuple[int, ...] | None
    keepdim: bool

    @property
    def signature(self) -> tuple:
        return (self.recipe, self.dims, self.keepdim)


def _vector_norm_call(name: str, args: dict, ndim: int) -> tuple[float, Any] | None:
    """(ord, dims) of a direct norm call in its vector cases; None for matrix norms."""
    dim = args["dim"]
    if name == "vector_norm":
        ord_ = args["ord"]
        return (ord_, dim) if is_number(ord_) else None
    if name == "norm":
        p = args["p"]
        if args["out"] is not None:
            return None
        if p is None:
            p = 2
        if p == "fro":
            if dim is None or is_static_int(dim) or (isinstance(dim, (list, tuple)) and len(dim) <= 2):
                return 2, dim
            return None
        return (p, dim) if is_number(p) else None
    # torch.linalg.norm
    ord_ = args["ord"]
    if dim is None:
        if ord_ is None:
            return 2, None
        if ndim == 1 and is_number(ord_):
            return ord_, None
        if ndim == 2 and ord_ == "fro":
            return 2, None
        return None  # a matrix norm (2, 'nuc', inf, ...) or an error
    if is_static_int(dim) or (isinstance(dim, (list, tuple)) and len(dim) == 1):
        ord_ = 2 if ord_ is None else ord_
        return (ord_, dim) if is_number(ord_) else None
    if isinstance(dim, (list, tuple)) and len(dim) == 2 and ord_ in (None, "fro"):
        return 2, dim
    return None


def _strip_casts(node: fx.Node, nodes: list[fx.Node]) -> tuple[fx.Node, list[tuple]]:
    """Walk down through dtype casts; return the tensor below them and the casts, innermost first."""
    casts: list[tuple] = []
    while len(node.users) <= 1:  # a cast used elsewhere too is the norm's input, not part of it
        name = op_name(node)
        if name in _CASTS and len(node.args) == 1 and not node.kwargs:
            dtype = _CASTS[name]
        elif name == "to":
            args = bind(node)
            if args is None or not isinstance(args["dtype"], torch.dtype):
                break
            dtype = args["dtype"]
        else:
            break
        casts.append(("cast", dtype))
        nodes.append(node)
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return node, casts
    return node, casts[::-1]


def root_exponent(node: fx.Node) -> tuple[float, fx.Node, tuple] | None:
    name = op_name(node)
    if name == "sqrt" and bind(node) is not None:
        return 0.5, node.args[0], ("sqrt",)
    if name == "pow":
        args = bind(node)
        if args and isinstance(args["input"], fx.Node) and is_number(args["exponent"]):
            return float(args["exponent"]), args["input"], ("root", args["exponent"])
    return None


def _same_slice(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return False
    sa, sb = match_slice(a), match_slice(b)
    return sa is not None and sb is not None and (sa.key, sa.index) == (sb.key, sb.index)


def _elementwise(node: fx.Node, nodes: list[fx.Node]) -> tuple[float, list[tuple], tuple[fx.Node, ...], bool] | None:
    """(p, steps, inputs, has_abs) for ``|v|**p`` spelled as a chain ending at ``node``."""
    name, args = op_name(node), bind(node)
    if args is None:
        return None
    power: tuple | None = None
    inputs: tuple[fx.Node, ...]
    if name == "pow" and is_number(args["exponent"]) and isinstance(args["input"], fx.Node):
        p = float(args["exponent"])
        power, below = ("pow", args["exponent"]), args["input"]
    elif name == "square":
        p, power, below = 2.0, ("square",), args["input"]
    elif name == "mul" and _same_slice(args["input"], args["other"]):
        nodes.append(node)
        inputs = (args["input"],) if args["input"] is args["other"] else (args["input"], args["other"])
        base, casts = _strip_casts(inputs[0], nodes) if len(inputs) == 1 else (inputs[0], [])
        if not isinstance(base, fx.Node):
            return None
        return 2.0, [*casts, ("mul_self",)], (base,) if len(inputs) == 1 else inputs, False
    elif name == "abs":
        p, below = 1.0, args["input"]
    else:
        return None
    nodes.append(node)
    steps: list[tuple] = []
    has_abs = name == "abs"
    if power is not None:
        if op_name(below) == "abs" and bind(below) is not None:
            nodes.append(below)
            below = below.args[0]
            has_abs = True
            steps.append(("abs",))
        steps.append(power)
    else:
        steps.append(("abs",))
    if not isinstance(below, fx.Node):
        return None
    base, casts = _strip_casts(below, nodes)
    if not isinstance(base, fx.Node):
        return None
    return p, [*casts, *steps], (base,), has_abs


@dataclasses.dataclass(frozen=True)
class Power:
    """``node`` computes ``|base|**p`` (``has_abs``: the abs is explicit) through ``nodes``."""

    p: float
    has_abs: bool
    base: fx.Node
    casts: bool
    nodes: tuple[fx.Node, ...]


def elementwise_power(node: fx.Node) -> Power | None:
    """``|v|**p`` in one of the recognised spellings (``v*v`` with two slice nodes excluded)."""
    nodes: list[fx.Node] = []
    found = _elementwise(node, nodes)
    if found is None or len(found[2]) != 1:
        return None
    p, steps, inputs, has_abs = found
    return Power(p, has_abs, inputs[0], any(s[0] == "cast" for s in steps), tuple(nodes))


def _spelling(steps: tuple[tuple, ...], reduce_name: str) -> str:
    expr = "v"
    for step in steps:
        kind = step[0]
        if kind == "cast":
            expr = f"{expr}.to({str(step[1]).replace('torch.', '')})"
        elif kind == "abs":
            expr = f"{expr}.abs()"
        elif kind == "pow":
            expr = f"({expr}**{step[1]})"
        elif kind == "square":
            expr = f"{expr}.square()"
        elif kind == "mul_self":
            expr = f"({expr}*{expr})"
        elif kind == "reduce":
            if step[1] == "norm_call":
                expr = f"{reduce_name}({expr}, {step[2]})"
            else:
                expr = f"{expr}.{reduce_name}()"
        elif kind == "sqrt":
            expr = f"{expr}.sqrt()"
        elif kind == "root":
            expr = f"{expr}**{step[1]:.4g}"
    return expr


_NORM_CALL_NAMES = {"vector_norm": "linalg.vector_norm", "linalg_norm": "linalg.norm", "norm": "norm"}


def match_norm(root: fx.Node) -> NormSite | None:
    """The norm site whose result ``root`` holds, or None."""
    nodes: list[fx.Node] = []
    node = root
    while op_name(node) in _RESHAPES or (
        op_name(node) == "getitem" and _is_newaxis_index(node.args[1] if len(node.args) > 1 else 0)
    ):
        nodes.append(node)
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return None

    name, args = op_name(node), bind(node)
    if args is None:
        return None

    if name in _NORM_CALL_NAMES:
        nodes.append(node)
        base, casts = _strip_casts(args["input"], nodes) if isinstance(args["input"], fx.Node) else (None, [])
        value = tensor_value(base)
        if value is None:
            return None
        spec = _vector_norm_call(name, args, value.ndim)
        if spec is None:
            return None
        ord_, dims = spec
        dims = None if dims is None else normalize_dims(dims, value.ndim)
        if dims is not None and len(dims) == 0:
            return None
        if dims is None and args["dim"] is not None:
            return None
        steps = (*casts, ("reduce", "norm_call", float(ord_)))
        recipe = NormRecipe(float(ord_), steps, args.get("dtype"), _spelling(steps, _NORM_CALL_NAMES[name]))
        return NormSite(root, (base,), tuple(nodes), node, recipe, dims, bool(args["keepdim"]))

    root_exp = None
    root_step: tuple = ()
    found = root_exponent(node)
    if found is not None and op_name(found[1]) in ("sum", "amax", "amin", "max", "min"):
        root_exp, below, root_step = found
        nodes.append(node)
        node = below
        name, args = op_name(node), bind(node)
        if args is None:
            return None

    if name not in ("sum", "amax", "amin", "max", "min") or not isinstance(args["input"], fx.Node):
        return None
    reduction = node
    nodes.append(node)
    elem = _elementwise(args["input"], nodes)
    if elem is None:
        return None
    p, steps, inputs, has_abs = elem
    value = tensor_value(inputs[0])
    if value is None:
        return None

    if name == "sum":
        dtype = args["dtype"]
        dims_arg, keepdim = args["dim"], bool(args["keepdim"])
        if p <= 0 or not math.isfinite(p):
            return None
        if not has_abs and not (p == int(p) and int(p) % 2 == 0):
            return None  # v**3 summed is no norm
        if p == 1:
            if root_exp is not None:
                return None
        elif root_exp is None or abs(root_exp * p - 1) > 1e-9:
            return None  # squared norm with no root, or a root that does not undo the power
        ord_ = p
    else:
        if steps[-1] != ("abs",) or root_exp is not None:
            return None
        dtype = None
        if name in ("max", "min"):
            dims_arg, keepdim = None, False
        else:
            dims_arg, keepdim = args["dim"], bool(args["keepdim"])
            if dims_arg == () or dims_arg == []:
                dims_arg = None
        ord_ = math.inf if name in ("max", "amax") else -math.inf

    dims = None if dims_arg is None else normalize_dims(dims_arg, value.ndim)
    if dims_arg is not None and (dims is None or len(dims) == 0):
        return None
    # ``max()`` and ``amax()`` agree on values but not on gradients (a NaN in the slice gives
    # amax a NaN gradient, max() none), so exact mode must know which one the user wrote.
    kind = name if name in ("sum", "amax", "amin") else name + "_all"
    all_steps = (*steps, ("reduce", kind, dtype), *((root_step,) if root_step else ()))
    recipe = NormRecipe(float(ord_), all_steps, dtype, _spelling(all_steps, name))
    return NormSite(root, inputs, tuple(nodes), reduction, recipe, dims, keepdim)


def _is_newaxis_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(i is None for i in items) and all(i is None or i is Ellipsis or _is_full_slice(i) for i in items)
