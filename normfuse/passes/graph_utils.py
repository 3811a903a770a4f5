"""FX helpers shared by the normfuse passes: op names, argument binding, fake values, mutation.

Dynamo's torch-level graph spells one operation several ways (``x.sum()`` is a ``call_method``,
``torch.sum(x)`` a ``call_function``; ``x ** 2`` is ``operator.pow``). ``op_name`` folds the
spellings to one name so that the recognisers match on names, never on targets.
"""

from __future__ import annotations

import builtins
import operator
import re
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

_FUNCTION_NAMES: dict[Any, str] = {
    torch.sum: "sum",
    torch.sqrt: "sqrt",
    torch.pow: "pow",
    operator.pow: "pow",
    torch.square: "square",
    torch.abs: "abs",
    operator.abs: "abs",
    builtins.abs: "abs",
    torch.mul: "mul",
    operator.mul: "mul",
    torch.amax: "amax",
    torch.amin: "amin",
    torch.max: "max",
    torch.min: "min",
    torch.linalg.vector_norm: "vector_norm",
    torch.linalg.norm: "linalg_norm",
    torch.norm: "norm",
    torch.functional.norm: "norm",
    torch.stack: "stack",
    torch.cat: "cat",
    torch.concat: "cat",
    torch.concatenate: "cat",
    torch.select: "select",
    torch.narrow: "narrow",
    torch.unbind: "unbind",
    torch.split: "split",
    torch.chunk: "chunk",
    torch.unsqueeze: "unsqueeze",
    torch.reshape: "reshape",
    torch.squeeze: "squeeze",
    torch.flatten: "flatten",
    operator.getitem: "getitem",
    operator.add: "add",
    torch.add: "add",
    operator.sub: "sub",
    torch.sub: "sub",
    torch.subtract: "sub",
    operator.truediv: "div",
    torch.div: "div",
    torch.true_divide: "div",
    operator.neg: "neg",
    torch.neg: "neg",
    torch.rsqrt: "rsqrt",
    torch.exp: "exp",
    torch.log: "log",
    torch.log1p: "log1p",
    torch.expm1: "expm1",
    torch.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    torch.relu: "relu",
    torch.nn.functional.relu: "relu",
    torch.reciprocal: "reciprocal",
    torch.clamp: "clamp",
    torch.clip: "clamp",
    torch.clamp_min: "clamp_min",
    torch.clamp_max: "clamp_max",
    torch.maximum: "maximum",
    torch.minimum: "minimum",
    torch.sign: "sign",
    torch.sin: "sin",
    torch.cos: "cos",
    torch.mean: "mean",
    torch.movedim: "movedim",
}

_METHOD_NAMES: dict[str, str] = {
    name: name
    for name in (
        "sum", "sqrt", "pow", "square", "abs", "mul", "amax", "amin", "max", "min", "norm",
        "select", "narrow", "unbind", "split", "chunk", "unsqueeze", "reshape", "view",
        "squeeze", "flatten", "to", "float", "double", "half", "bfloat16", "add", "sub", "div",
        "neg", "rsqrt", "exp", "log", "log1p", "expm1", "sigmoid", "tanh", "relu", "reciprocal",
        "clamp", "clamp_min", "clamp_max", "maximum", "minimum", "sign", "sin", "cos", "mean",
    )
}
_METHOD_NAMES.update({
    "__pow__": "pow", "__mul__": "mul", "__abs__": "abs", "__getitem__": "getitem", "__add__": "add",
    "__sub__": "sub", "__truediv__": "div", "__neg__": "neg", "clip": "clamp", "true_divide": "div",
    "subtract": "sub",
})

# Parameter names in order, then defaults, for every op the recognisers read arguments of.
# ``input`` is ``self`` for methods. An argument that is not listed makes binding fail, so an
# unknown keyword (``out=``, ``alpha=``) is never silently dropped.
_SIGNATURES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "sum": (("input", "dim", "keepdim"), {"dim": None, "keepdim": False, "dtype": None}),
    "mean": (("input", "dim", "keepdim"), {"dim": None, "keepdim": False, "dtype": None}),
    "pow": (("input", "exponent"), {}),
    "mul": (("input", "other"), {}),
    "add": (("input", "other"), {"alpha": 1}),
    "slice": (("input", "dim", "start", "end", "step"), {"dim": 0, "start": None, "end": None, "step": 1}),
    "sqrt": (("input",), {}),
    "square": (("input",), {}),
    "abs": (("input",), {}),
    "amax": (("input", "dim", "keepdim"), {"dim": (), "keepdim": False}),
    "amin": (("input", "dim", "keepdim"), {"dim": (), "keepdim": False}),
    "max": (("input",), {}),
    "min": (("input",), {}),
    "vector_norm": (
        ("input", "ord", "dim", "keepdim"),
        {"ord": 2, "dim": None, "keepdim": False, "dtype": None},
    ),
    "linalg_norm": (
        ("input", "ord", "dim", "keepdim"),
        {"ord": None, "dim": None, "keepdim": False, "dtype": None},
    ),
    "norm": (
        ("input", "p", "dim", "keepdim", "out", "dtype"),
        {"p": "fro", "dim": None, "keepdim": False, "out": None, "dtype": None},
    ),
    "stack": (("tensors", "dim"), {"dim": 0}),
    "cat": (("tensors", "dim"), {"dim": 0}),
    "select": (("input", "dim", "index"), {}),
    "narrow": (("input", "dim", "start", "length"), {}),
    "unbind": (("input", "dim"), {"dim": 0}),
    "split": (("input", "split_size_or_sections", "dim"), {"dim": 0}),
    "chunk": (("input", "chunks", "dim"), {"dim": 0}),
    "getitem": (("input", "index"), {}),
    "to": (("input", "dtype"), {}),
}


# ATen overloads (graphs from torch.export, or after AOTAutograd) by their schema's base name.
_ATEN_RENAMES = {
    "linalg_vector_norm": "vector_norm", "true_divide": "div", "split_with_sizes": "split",
    "subtract": "sub", "clip": "clamp",
}
_ATEN_ARG_RENAMES = {"self": "input", "split_size": "split_size_or_sections", "split_sizes": "split_size_or_sections"}


def _aten_name(target: Any) -> str | None:
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    base = target._schema.name.split("::")[-1]
    name = _ATEN_RENAMES.get(base, base)
    known = set(_FUNCTION_NAMES.values()) | set(_METHOD_NAMES.values()) | {"slice"}
    return name if name in known and name not in ("norm", "to", "float", "double", "half", "bfloat16") else None


def op_name(node: fx.Node) -> str | None:
    """The canonical name of the operation a node performs, or None for anything else."""
    if node.op == "call_function":
        try:
            return _FUNCTION_NAMES.get(node.target) or _aten_name(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _METHOD_NAMES.get(node.target)
    return None


def bind(node: fx.Node) -> dict[str, Any] | None:
    """The node's arguments by parameter name, defaults filled in; None if they do not fit."""
    name = op_name(node)
    if name is None or name not in _SIGNATURES:
        return None
    if isinstance(node.target, torch._ops.OpOverload):
        return _bind_aten(node, name)
    positional, defaults = _SIGNATURES[name]
    if len(node.args) > len(positional):
        return None
    bound = dict(defaults)
    bound.update(zip(positional, node.args))
    for key, value in node.kwargs.items():
        if key not in positional and key not in defaults:
            return None
        bound[key] = value
    if any(p not in bound for p in positional):
        return None
    return bound


def _bind_aten(node: fx.Node, name: str) -> dict[str, Any] | None:
    """Bind by the overload's schema, in the canonical names; an argument the canonical signature
    does not know (``aten.max.dim``'s ``dim``) means another operation, so binding fails."""
    positional, defaults = _SIGNATURES[name]
    known = set(positional) | set(defaults)
    bound = dict(defaults)
    schema_args = node.target._schema.arguments
    for arg in schema_args:
        key = _ATEN_ARG_RENAMES.get(arg.name, arg.name)
        if key not in known:
            return None
        if arg.has_default_value():
            bound[key] = arg.default_value
    names = [_ATEN_ARG_RENAMES.get(a.name, a.name) for a in schema_args if not a.kwarg_only]
    if len(node.args) > len(names):
        return None
    bound.update(zip(names, node.args))
    for key, value in node.kwargs.items():
        key = _ATEN_ARG_RENAMES.get(key, key)
        if key not in known:
            return None
        bound[key] = value
    if any(p not in bound for p in positional):
        return None
    return bound


def example_value(node: Any) -> Any:
    """The fake value a node carries: Dynamo's ``example_value``, or AOT's ``val``."""
    if not isinstance(node, fx.Node):
        return node
    if "example_value" in node.meta:
        return node.meta["example_value"]
    return node.meta.get("val")


def tensor_value(node: Any) -> torch.Tensor | None:
    value = example_value(node)
    return value if isinstance(value, torch.Tensor) else None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_static_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def same_size(a: Any, b: Any) -> bool:
    """Whether two (possibly symbolic) sizes are known equal, without adding a guard."""
    if is_static_int(a) and is_static_int(b):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


def same_shape(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def normalize_dim(dim: Any, ndim: int) -> int | None:
    if not is_static_int(dim):
        return None
    if ndim == 0 and dim in (0, -1):
        return 0
    if not -ndim <= dim < ndim:
        return None
    return dim % ndim


def normalize_dims(dims: Any, ndim: int) -> tuple[int, ...] | None:
    """An int or a sequence of ints as sorted non-negative dims; None if any is not an int."""
    if is_static_int(dims):
        dims = (dims,)
    if not isinstance(dims, (tuple, list, torch.Size)):
        return None
    out = []
    for d in dims:
        nd = normalize_dim(d, ndim)
        if nd is None or nd in out:
            return None
        out.append(nd)
    return tuple(sorted(out))


_INPLACE_OPERATORS = {
    operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
    operator.ior, operator.ixor, operator.ilshift, operator.irshift, operator.imatmul,
}


def is_mutating(node: fx.Node) -> bool:
    """Whether a node may write to a tensor in place (Dynamo keeps such calls in its graph)."""
    if node.op == "call_module":
        return True  # opaque: assume the worst
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op != "call_function":
        return False
    if node.target in _INPLACE_OPERATORS:
        return True
    if node.kwargs.get("inplace") is True or node.kwargs.get("out") is not None:
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def is_impure(node: fx.Node) -> bool:
    """Dead-code predicate that keeps in-place calls (``Graph.eliminate_dead_code`` drops them)."""
    return is_mutating(node) or node.is_impure()


def may_alias(a: fx.Node, b: Any) -> bool:
    """Whether two nodes may share storage. Unknown storage counts as shared."""
    va, vb = tensor_value(a), tensor_value(b)
    if va is None or vb is None:
        return True
    try:
        return StorageWeakRef(va.untyped_storage()) == StorageWeakRef(vb.untyped_storage())
    except Exception:
        return True


def fake_mode_of(graph: fx.Graph):
    """The fake mode of the graph's own example values (not the tracing context's)."""
    for node in graph.nodes:
        mode = getattr(tensor_value(node), "fake_mode", None)
        if mode is not None:
            return mode
    return None


class RewriteError(Exception):
    """A group cannot be emitted; the graph is left as it was."""


def is_aten_graph(graph: fx.Graph) -> bool:
    """Whether the graph is ATen-level (``torch.export``, AOTAutograd): fake values under ``val``."""
    metas = [n.meta for n in graph.nodes if n.op != "output"]
    return any("val" in m for m in metas) and not any("example_value" in m for m in metas)


def _int_list(dims: Any) -> list[int]:
    return [dims] if isinstance(dims, int) else list(dims)


def _slice_index(x: Any, index: Any) -> tuple:
    items = index if isinstance(index, tuple) else (index,)
    dim = len(items) - 1
    picked = items[-1]
    if not isinstance(picked, slice) or any(not (isinstance(i, slice) and i == slice(None)) for i in items[:-1]):
        raise RewriteError(f"index {index!r} has no ATen form here")
    return (x, dim, picked.start, picked.stop, 1 if picked.step is None else picked.step)


def _aten_form(op: str, target: Any, args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    """The ATen overload for a torch-level call the rewrites emit (for ``torch.export`` graphs)."""
    aten = torch.ops.aten
    if op == "call_method":
        x, rest = args[0], args[1:]
        table = {
            "movedim": lambda: (aten.movedim.int, (x, *rest), {}),
            "reshape": lambda: (aten.reshape.default, (x, list(rest[0])), {}),
            "unsqueeze": lambda: (aten.unsqueeze.default, (x, *rest), {}),
            "flatten": lambda: (aten.flatten.using_ints, (x, *rest), {}),
            "sum": lambda: (aten.sum.dim_IntList, (x, _int_list(rest[0])), {}),
            "contiguous": lambda: (aten.clone.default, (x,), {"memory_format": torch.contiguous_format}),
            "unbind": lambda: (aten.unbind.int, (x, *rest), {}),
            "to": lambda: (aten._to_copy.default, (x,), {"dtype": rest[0]}),
        }
        if target not in table:
            raise RewriteError(f"no ATen form for Tensor.{target}")
        return table[target]()
    if isinstance(target, torch._ops.OpOverload) or target is operator.getitem and isinstance(args[1], int):
        return target, args, kwargs
    if target is operator.getitem:
        return aten.slice.Tensor, _slice_index(*args), {}
    if target is torch.linalg.vector_norm:
        x, ord_, dims, keepdim = args
        return aten.linalg_vector_norm.default, (x, ord_, _int_list(dims), keepdim), kwargs
    if target in (torch.sum, torch.mean, torch.amax, torch.amin):
        x, dims, keepdim = args
        overload = {
            torch.sum: aten.sum.dim_IntList, torch.mean: aten.mean.dim, torch.amax: aten.amax.default,
            torch.amin: aten.amin.default,
        }
        return overload[target], (x, _int_list(dims), keepdim), kwargs
    simple = {
        torch.abs: aten.abs.default, torch.sqrt: aten.sqrt.default, torch.square: aten.square.default,
        torch.mul: aten.mul.Tensor, torch.stack: aten.stack.default, torch.cat: aten.cat.default,
        torch.index_select: aten.index_select.default,
        torch._foreach_norm: aten._foreach_norm.Scalar,
    }
    if target is torch.pow:
        return (aten.pow.Tensor_Scalar if is_number(args[1]) else aten.pow.Tensor_Tensor), args, kwargs
    if target in simple:
        return simple[target], args, kwargs
    raise RewriteError(f"no ATen form for {getattr(target, '__name__', target)} (an index list, say)")


class NodeBuilder:
    """Inserts nodes before an anchor and gives each the fake value the graph's own nodes carry
    (Dynamo's ``example_value``; in an ATen graph, ATen overloads and ``val``)."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, meta_from: fx.Node):
        self.graph = graph
        self.anchor = anchor
        self.meta = {k: meta_from.meta[k] for k in ("stack_trace", "nn_module_stack") if k in meta_from.meta}
        self.fake_mode = fake_mode_of(graph)
        self.aten = is_aten_graph(graph)
        self.created: list[fx.Node] = []

    def _value(self, op: str, target: Any, args: tuple, kwargs: dict) -> Any:
        fake_args = fx.node.map_arg(args, example_value)
        fake_kwargs = fx.node.map_arg(kwargs, example_value)
        from contextlib import nullcontext

        with self.fake_mode if self.fake_mode is not None else nullcontext():
            if op == "call_method":
                return getattr(fake_args[0], target)(*fake_args[1:], **fake_kwargs)
            return target(*fake_args, **fake_kwargs)

    def add(self, op: str, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        kwargs = kwargs or {}
        if self.aten:
            target, args, kwargs = _aten_form(op, target, args, kwargs)
            op = "call_function"
        value = self._value(op, target, args, kwargs)
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node(op, target, args, kwargs)
        node.meta.update(self.meta)
        node.meta["val" if self.aten else "example_value"] = value
        self.created.append(node)
        return node

    def call(self, target: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        return self.add("call_function", target, args, kwargs)

    def method(self, name: str, *args: Any, **kwargs: Any) -> fx.Node:
        return self.add("call_method", name, args, kwargs)

    def discard(self) -> None:
        for node in reversed(self.created):
            if not node.users:
                self.graph.erase_node(node)
        self.created.clear()


def topo_order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {node: i for i, node in enumerate(graph.nodes)}


def users_within(node: fx.Node, allowed: Iterable[fx.Node]) -> bool:
    allowed = set(allowed)
    return all(user in allowed for user in node.users)


def _last_frame(node: fx.Node) -> tuple[str, str, str] | None:
    """(file, line number, code) of the innermost user frame in the node's stack trace."""
    lines = (node.meta.get("stack_trace") or "").rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        found = re.search(r'File "([^"]+)", line (\d+)', lines[i])
        if found:
            code = next((ln.strip() for ln in lines[i + 1 :] if ln.strip() and set(ln.strip()) - set("^~")), "")
            return found.group(1), found.group(2), code
    return None


def location(node: fx.Node) -> str:
    frame = _last_frame(node)
    return f"{frame[0]}:{frame[1]}" if frame else ""


def source_line(node: fx.Node) -> str:
    frame = _last_frame(node)
    return frame[2] if frame else ""


def describe_source(node: fx.Node) -> str:
    """The user's name for a tensor: Dynamo's source (``L['x']``) for inputs, else the node's."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None) or getattr(node, "_dynamo_source", None)
    name = getattr(source, "name", None)
    if callable(name):  # a method in older torch releases
        name = name()
    return name if isinstance(name, str) else node.name


def is_plain_add(node: fx.Node) -> bool:
    """``a + b``: ``operator.add``, or ATen's ``add.Tensor`` with ``alpha`` 1."""
    if node.op != "call_function":
        return False
    if node.target is operator.add:
        return not node.kwargs
    return node.target is torch.ops.aten.add.Tensor and node.kwargs.get("alpha", 1) == 1 and len(node.args) == 2
