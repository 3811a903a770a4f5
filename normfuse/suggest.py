"""The batched PyTorch a person could write instead of a per-slice loop, as runnable code.

``suggest(group)`` turns a group the pass rewrote into code in the user's own names: Dynamo's
source ``L['x']`` is the argument ``x``, ``L['self']._modules['lin']._parameters['weight']`` is
``self.lin.weight``, ``G['W']`` the global ``W``. A value the function computed itself and that
cannot be recomputed from its inputs (it was written in place, say) keeps the graph's name for it,
which Dynamo takes from the user's variable where it can, and the suggestion says so in a note.

For a loop of bare norms the code is one line, ``torch.linalg.vector_norm(x, dim=1)``; for a
per-slice program (``e / e.norm()``, WGAN-GP, DP-SGD, capsule squash) it is the whole program run
once on the batch, which may take a few lines: values used more than once get a name (the one the
user gave them inside the loop where Dynamo kept it) and the last line is the expression that
replaces the combiner (``torch.stack([...])``, ``torch.cat``, ``sum``).

Nothing here runs the code: ``normfuse.explain`` runs it on the example inputs and compares it
with what the unmodified graph computed (``Rewrite.check``).
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import keyword
import math
import operator
import re
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import _get_qualified_name

from .passes.graph_utils import (
    describe_source,
    is_mutating,
    location,
    may_alias,
    op_name,
    same_shape,
    same_size,
    source_line,
    tensor_value,
)
from .passes.chains import ChainGroup, MultiNormGroup
from .passes.grouping import NormGroup, ProgramGroup
from .passes.programs import Ref, reduce_dims
from .passes.rewrite import without_dims

KIND_NORM = "batched norm"  # the whole group: one vector_norm and a layout
KIND_PROGRAM = "batched program"  # the whole per-slice program, run once on the batch
KIND_NORM_PART = "norm part only"  # only the norm inside a program: not the combiner's value


@dataclasses.dataclass
class Suggestion:
    code: str  # statements, one a line; the last line is an expression
    kind: str
    names: dict[str, str]  # each name the code reads (``x``, ``self.lin.weight``) -> graph node
    note: str = ""


class _Unwritable(Exception):
    """An op or constant with no faithful spelling in source code."""


# precedence of a rendered expression: what must be parenthesised as an operand
_ATOM, _POW, _UNARY, _MUL, _ADD = 100, 14, 13, 12, 11
_INFIX = {
    operator.add: ("+", _ADD), operator.sub: ("-", _ADD), operator.mul: ("*", _MUL),
    operator.truediv: ("/", _MUL), operator.floordiv: ("//", _MUL), operator.mod: ("%", _MUL),
    operator.pow: ("**", _POW), operator.matmul: ("@", _MUL),
}
# ops whose result depends on their operands only: a value computed outside the loop from the
# inputs with these is written out again (``w.sum()``) instead of naming a graph node
_PURE = {
    "add", "sub", "mul", "div", "pow", "neg", "abs", "sqrt", "rsqrt", "exp", "log", "log1p",
    "expm1", "sigmoid", "tanh", "relu", "square", "reciprocal", "clamp", "clamp_min", "clamp_max",
    "maximum", "minimum", "sign", "sin", "cos", "float", "double", "half", "bfloat16", "to",
    "sum", "mean", "amax", "amin", "getitem", "unsqueeze", "reshape", "view", "squeeze", "flatten",
    "select", "narrow", "movedim", "vector_norm",
}


@dataclasses.dataclass(frozen=True)
class _E:
    text: str
    prec: int = _ATOM

    def operand(self, below: int) -> str:
        return self.text if self.prec >= below else f"({self.text})"


_ROOT = re.compile(r"^[LG]\['([A-Za-z_]\w*)'\]")
_STEP = re.compile(
    r"^(?:\._(?:modules|parameters|buffers)\['([A-Za-z_]\w*)'\]|\.([A-Za-z_]\w*)|\[(-?\d+)\]|\[('[^'\\]*')\])"
)


def user_name(source: str) -> str | None:
    """The user's expression for a Dynamo source name, or None if it has no plain spelling.

    >>> user_name("L['self']._modules['lin']._parameters['weight']")
    'self.lin.weight'
    """
    found = _ROOT.match(source)
    if not found:
        return None
    out, rest = found.group(1), source[found.end() :]
    while rest:
        step = _STEP.match(rest)
        if not step:
            return None
        member, attr, index, key = step.groups()
        out += f".{member or attr}" if (member or attr) else f"[{index if index is not None else key}]"
        rest = rest[step.end() :]
    return out


def _number(value: Any) -> _E:
    if isinstance(value, bool) or value is None:
        return _E(repr(value))
    if isinstance(value, float) and not math.isfinite(value):
        return _E("float('nan')" if value != value else f"float('{'' if value > 0 else '-'}inf')")
    if isinstance(value, (int, float)):
        return _E(repr(value), _UNARY if value < 0 else _ATOM)
    raise _Unwritable(f"constant {value!r}")


def _index(value: Any, render) -> str:
    """The text inside ``x[...]``."""
    if isinstance(value, tuple):
        return ", ".join(_index(v, render) for v in value) + ("," if len(value) == 1 else "")
    if isinstance(value, slice):
        parts = ["" if p is None else _number(p).text for p in (value.start, value.stop, value.step)]
        return ":".join(parts[:2]) + (f":{parts[2]}" if value.step is not None else "")
    if value is Ellipsis:
        return "..."
    return render(value).text


def _dims_text(dims: tuple[int, ...]) -> str:
    return str(dims[0]) if len(dims) == 1 else str(tuple(dims))


def _ord_arg(ord_: float) -> str:
    if ord_ == 2:
        return ""
    if math.isfinite(ord_) and ord_ == int(ord_):
        return f", ord={int(ord_)}"
    return f", ord={_number(float(ord_)).text}"


def _shape_args(n: int, shape: torch.Size) -> str:
    sizes = [s if isinstance(s, int) else -1 for s in shape]
    if sizes.count(-1) > 1:
        raise _Unwritable("more than one symbolic size")
    return ", ".join(str(s) for s in (n, *sizes))


def _auto_named(node: fx.Node) -> bool:
    """Whether Dynamo named the node after its op (``pow_1``) rather than a user variable."""
    base = re.sub(r"_\d+$", "", node.name)
    target = getattr(node.target, "__name__", str(node.target))
    return base in {op_name(node), target, target.strip("_"), "getitem", "truediv", "linalg_vector_norm", "element", "value"}


class _Writer:
    """Renders values as source text, collecting the names the text reads."""

    def __init__(self, graph: fx.Graph):
        self.names: dict[str, str] = {}
        self.notes: list[str] = []
        self.lines: list[str] = []
        self.taken: set[str] = {"torch", "float", "abs"}
        for node in graph.nodes:  # every name the code may read, so that no temporary shadows one
            self.taken.add(node.name)
            if node.op == "placeholder":
                self.taken.add(re.split(r"[.\[]", user_name(describe_source(node)) or node.name)[0])
        self._mutators = [n for n in graph.nodes if is_mutating(n)]
        self._memo: dict[fx.Node, _E] = {}

    # values computed outside the batch -------------------------------------------------------

    def _written_in_place(self, node: fx.Node) -> bool:
        return any(not m.args or may_alias(node, m.args[0]) for m in self._mutators)

    def _bind(self, expr: str, node: fx.Node) -> _E:
        self.names[expr] = node.name
        self.taken.add(re.split(r"[.\[]", expr)[0])
        return _E(expr)

    def value(self, node: fx.Node, depth: int = 0) -> _E:
        if node not in self._memo:
            self._memo[node] = self._value(node, depth)
        return self._memo[node]

    def _value(self, node: fx.Node, depth: int) -> _E:
        if node.op == "placeholder":
            return self._bind(user_name(describe_source(node)) or node.name, node)
        if node.op != "get_attr" and not _auto_named(node) and node.name.isidentifier():
            return self._bind(node.name, node)  # Dynamo named it after the user's variable
        if (
            node.op in ("call_function", "call_method")
            and op_name(node) in _PURE
            and not is_mutating(node)
            and depth < 4
            and not self._written_in_place(node)
        ):
            try:
                return self.call(node.op, node.target, self.const(node.args, depth + 1), self.const(node.kwargs, depth + 1))
            except _Unwritable:
                pass
        where = location(node)
        self.notes.append(
            f"{node.name} is the graph's value of `{source_line(node)}`" + (f" ({where.rsplit('/', 1)[-1]})" if where else "")
        )
        return self._bind(node.name, node)

    def const(self, value: Any, depth: int = 0) -> Any:
        """Arguments with graph nodes written out; everything else left as a Python value."""
        if isinstance(value, fx.Node):
            return self.value(value, depth)
        if isinstance(value, (list, tuple)):
            return type(value)(self.const(v, depth) for v in value)
        if isinstance(value, dict):
            return {k: self.const(v, depth) for k, v in value.items()}
        return value

    # rendering -------------------------------------------------------------------------------

    def render(self, value: Any) -> _E:
        if isinstance(value, _E):
            return value
        if isinstance(value, torch.dtype):
            return _E(str(value))
        if isinstance(value, torch.device):
            return _E(f"torch.device({str(value)!r})")
        if isinstance(value, str):
            return _E(repr(value))
        if isinstance(value, (list, tuple)):
            items = [self.render(v).text for v in value]
            if isinstance(value, list):
                return _E(f"[{', '.join(items)}]")
            return _E(f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})")
        return _number(value)

    def call(self, op: str, target: Any, args: tuple, kwargs: dict) -> _E:
        pos = [self.render(a) for a in args]
        named = [f"{k}={self.render(v).text}" for k, v in kwargs.items()]
        if op == "call_method":
            if not pos:
                raise _Unwritable("a method call without a receiver")
            return _E(f"{pos[0].operand(_ATOM)}.{target}({', '.join([a.text for a in pos[1:]] + named)})")
        if target is operator.getitem and len(args) == 2 and not kwargs:
            return _E(f"{pos[0].operand(_ATOM)}[{_index(args[1], self.render)}]")
        if target in _INFIX and len(args) == 2 and not kwargs:
            symbol, prec = _INFIX[target]
            if symbol == "**":  # right-associative, and binds tighter than a unary minus on its left
                return _E(f"{pos[0].operand(_ATOM)} ** {pos[1].operand(_UNARY)}", _POW)
            return _E(f"{pos[0].operand(prec)} {symbol} {pos[1].operand(prec + 1)}", prec)
        if target is operator.neg and len(args) == 1 and not kwargs:
            return _E(f"-{pos[0].operand(_UNARY)}", _UNARY)
        name = "abs" if target in (builtins.abs, operator.abs) else _get_qualified_name(target) if callable(target) else ""
        if name != "abs" and not name.startswith("torch."):
            raise _Unwritable(f"call of {name or target!r}")
        return _E(f"{name}({', '.join([a.text for a in pos] + named)})")

    def method(self, receiver: _E, name: str, *args: str) -> _E:
        return _E(f"{receiver.operand(_ATOM)}.{name}({', '.join(args)})")

    def temp(self, hint: fx.Node | None, expr: _E) -> _E:
        """Give ``expr`` a name of its own (the user's for the value inside the loop if Dynamo kept it)."""
        base = hint.name if hint is not None and not _auto_named(hint) else ""
        if not base.isidentifier() or keyword.iskeyword(base):
            base = ""
        names = ([base] if base else []) + [f"{base or 't'}{k}" for k in range(1 if not base else 2, 1000)]
        name = next(c for c in names if c not in self.taken)
        self.taken.add(name)
        self.lines.append(f"{name} = {expr.text}")
        return _E(name)

    def finish(self, final: _E, kind: str) -> Suggestion:
        return Suggestion("\n".join([*self.lines, final.text]), kind, dict(self.names), "; ".join(dict.fromkeys(self.notes)))

    # batched pieces --------------------------------------------------------------------------

    def coverage(self, source: fx.Node, d: int, idx: list[int]) -> _E:
        """``source`` restricted to positions ``idx`` along ``d``, in that order."""
        x = self.value(source)
        n = len(idx)
        if same_size(tensor_value(source).shape[d], n) and idx == list(range(n)):
            return x
        step = idx[1] - idx[0] if n > 1 else 1
        if step >= 1 and all(b - a == step for a, b in zip(idx, idx[1:])):
            picked = f"{idx[0]}:{idx[-1] + 1}" + ("" if step == 1 else f":{step}")
            return _E(f"{x.operand(_ATOM)}[{':, ' * d}{picked}]")
        device = tensor_value(source).device
        where = "" if device.type == "cpu" else f", device={x.operand(_ATOM)}.device"
        return self.method(x, "index_select", str(d), f"torch.tensor({idx}{where})")

    def vector_norm(self, x: _E, recipe, dims: tuple[int, ...], keepdim: bool) -> _E:
        for step in recipe.steps:
            if step[0] == "cast":
                x = self.method(x, "to", str(step[1]))
        extra = _ord_arg(recipe.ord) + f", dim={_dims_text(dims)}" + (", keepdim=True" if keepdim else "")
        if recipe.dtype is not None:
            extra += f", dtype={recipe.dtype}"
        return _E(f"torch.linalg.vector_norm({x.text}{extra})")

    def place(self, stacked: _E, comb) -> _E:
        """``stacked`` holds the per-slice results along dim 0: lay them out as the combiner did."""
        if comb.kind == "sum":
            return self.method(stacked, "sum", "0")
        out = stacked if comb.dim == 0 else self.method(stacked, "movedim", "0", str(comb.dim))
        if comb.kind == "cat":
            out = self.method(out, "flatten", str(comb.dim), str(comb.dim + 1))
        return out


def _norm_group(w: _Writer, group: NormGroup) -> Suggestion:
    recipe, comb, d, dims = group.site.recipe, group.combiner, group.dim, group.reduce_dims
    n = len(group.indices)
    xs = w.coverage(group.source, d, group.indices)
    shape = list(tensor_value(group.source).shape)
    shape[d] = n
    per = list(tensor_value(group.site.root).shape)
    dropped = without_dims(shape, set(dims))  # the shape of vector_norm(xs, dim=dims)
    kept = [1 if i in dims else s for i, s in enumerate(shape)]  # ... with keepdim=True
    dd = d - sum(r < d for r in dims)  # where the sliced dim lands when the others are dropped
    # the layouts where one vector_norm already is the combiner's result
    direct = {
        ("stack", dd, False): without_dims(dropped, {dd}),
        ("stack", d, True): without_dims(kept, {d}),
        ("cat", dd, False): dropped[:dd] + [1] + dropped[dd + 1 :],
        ("cat", d, True): kept[:d] + [1] + kept[d + 1 :],
    }
    for (kind, at, keepdim), want in direct.items():
        if comb.kind == kind and comb.dim == at and same_shape(per, want):
            return w.finish(w.vector_norm(xs, recipe, dims, keepdim), KIND_NORM)
    if comb.kind in ("stack", "sum") and same_shape(per, without_dims(dropped, {dd})):
        y = w.vector_norm(xs, recipe, dims, False)
        if comb.kind == "sum":
            return w.finish(w.method(y, "sum", str(dd)), KIND_NORM)
        return w.finish(w.method(y, "movedim", str(dd), str(comb.dim)), KIND_NORM)
    y = w.vector_norm(xs, recipe, dims, True)
    if d:
        y = w.method(y, "movedim", str(d), "0")
    y = w.method(y, "reshape", _shape_args(n, tensor_value(group.site.root).shape))
    return w.finish(w.place(y, comb), KIND_NORM)


def _uses(program) -> dict[Ref, int]:
    counts: dict[Ref, int] = {}

    def walk(value: Any) -> None:
        if isinstance(value, Ref):
            if value.kind in ("leaf", "op"):
                counts[value] = counts.get(value, 0) + 1
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    for op in program.ops:
        walk(op.args)
        walk(tuple(op.kwargs.values()))
    return counts


def _program(w: _Writer, group: ProgramGroup) -> Suggestion:
    """Mirrors ``rewrite.emit_program``: batch-first leaves, ops aligned by unsqueezing dim 1."""
    first = group.programs[0]
    n = len(group.programs)
    uses = _uses(first)
    values: dict[Ref, tuple[_E, int]] = {}
    norm_of: dict[Ref, tuple[Any, _E, tuple[int, ...]]] = {}  # inlined norms, for keepdim=True
    for j, sl in enumerate(first.leaves):
        x = w.coverage(sl.source, sl.dim, [p.leaves[j].index for p in group.programs])
        if sl.dim:
            x = w.method(x, "movedim", str(sl.dim), "0")
        if sl.keepdim:
            x = w.method(x, "unsqueeze", str(sl.dim + 1))
        ref = Ref("leaf", j)
        if uses.get(ref, 0) > 1 and not x.text.isidentifier():
            x = w.temp(sl.node, x)
        values[ref] = (x, tensor_value(sl.node).ndim)

    def at_rank(value: Any, rank: int) -> Any:
        if isinstance(value, Ref):
            if value.kind == "shared":
                return w.value(value.value)
            if value.kind == "const":
                return value.value
            x, own = values[value]
            if rank > own:
                if value in norm_of and rank - own == len(norm_of[value][2]):
                    site, operand, dims = norm_of[value]
                    return w.vector_norm(operand, site.recipe, dims, True)
                return _E(f"{x.operand(_ATOM)}[:{', None' * (rank - own)}]")
            return x
        if isinstance(value, (list, tuple)):
            return type(value)(at_rank(v, rank) for v in value)
        return value

    for k, op in enumerate(first.ops):
        rank = tensor_value(op.node).ndim
        ref = Ref("op", k)
        if op.kind == "elementwise":
            args = at_rank(op.args, rank)
            kwargs = {key: at_rank(v, rank) for key, v in op.kwargs.items()}
            expr = w.call(op.node.op, op.node.target, args, kwargs)
        elif op.kind == "reshape":
            expr = w.method(values[op.args[0]][0], "reshape", _shape_args(n, tensor_value(op.node).shape))
        elif op.kind == "reduce":
            x, own = values[op.args[0]]
            dims, keepdim = reduce_dims(op.node, own)
            extra = [_dims_text(tuple(d + 1 for d in dims))] + (["keepdim=True"] if keepdim else [])
            if op.node.kwargs.get("dtype") is not None:
                extra.append(f"dtype={op.node.kwargs['dtype']}")
            expr = w.method(x, op_name(op.node), *extra)
        else:
            x, own = values[op.args[0]]
            if own == 0:
                raise _Unwritable("a norm of a per-slice scalar")
            site = op.site
            dims = tuple(d + 1 for d in (site.dims if site.dims is not None else range(own)))
            expr = w.vector_norm(x, site.recipe, dims, site.keepdim)
            if not site.keepdim and len(dims) == own and uses.get(ref, 0) == 1:
                norm_of[ref] = (site, x, dims)
        if uses.get(ref, 0) > 1:
            expr = w.temp(op.node, expr)
        values[ref] = (expr, rank)
    final = values[Ref("op", len(first.ops) - 1)][0]
    return w.finish(w.place(final, group.combiner), KIND_PROGRAM)


def _norm_part(w: _Writer, group: ProgramGroup) -> Suggestion | None:
    """The first norm of a program whose operand is a slice: its batched vector_norm."""
    first = group.programs[0]
    for op in first.ops:
        if op.kind == "norm" and op.args[0].kind == "leaf":
            sl = first.leaves[op.args[0].value]
            x = w.coverage(sl.source, sl.dim, [p.leaves[op.args[0].value].index for p in group.programs])
            own = tensor_value(sl.node).ndim
            per = op.site.dims if op.site.dims is not None else range(own)
            # per-slice dims in the source's coordinates, the sliced dim left out
            dims = tuple(sorted({p if sl.keepdim or p < sl.dim else p + 1 for p in per} - ({sl.dim} if sl.keepdim else set())))
            if not dims:
                return None
            return w.finish(w.vector_norm(x, op.site.recipe, dims, False), KIND_NORM_PART)
    return None


def _chain(w: _Writer, group: ChainGroup) -> Suggestion:
    site = group.site
    x = w.value(site.inputs[0])
    dims = site.dims if site.dims is not None else tuple(range(tensor_value(site.inputs[0]).ndim))
    out = w.vector_norm(x, site.recipe, dims, site.keepdim)
    if tuple(tensor_value(site.root).shape) != tuple(_shape_after(site, dims)):
        raise _Unwritable("the chain's result is reshaped")
    return w.finish(out, KIND_NORM)


def _shape_after(site, dims: tuple[int, ...]) -> list[Any]:
    shape = list(tensor_value(site.inputs[0]).shape)
    return [1 if i in dims else s for i, s in enumerate(shape)] if site.keepdim else without_dims(shape, set(dims))


def _multi_norm(w: _Writer, group: MultiNormGroup) -> Suggestion:
    if len({tensor_value(t).dtype for t in group.tensors}) > 1:
        raise _Unwritable("tensors of several dtypes")
    ord_text = _ord_arg(group.ord)
    norms = ", ".join(f"torch.linalg.vector_norm({w.value(t).text}{ord_text})" for t in group.tensors)
    return w.finish(_E(f"torch.linalg.vector_norm(torch.stack([{norms}]){ord_text})"), KIND_NORM)


def suggest(group: Any, graph: fx.Graph) -> Suggestion | None:
    """Runnable code for what ``group`` computes, batched; None if it has no faithful spelling."""
    if isinstance(group, (ChainGroup, MultiNormGroup)):
        try:
            return (_chain if isinstance(group, ChainGroup) else _multi_norm)(_Writer(graph), group)
        except _Unwritable:
            return None
    if isinstance(group, NormGroup):
        try:
            return _norm_group(_Writer(graph), group)
        except _Unwritable:
            return None
    if isinstance(group, ProgramGroup):
        try:
            return _program(_Writer(graph), group)
        except _Unwritable:
            try:
                return _norm_part(_Writer(graph), group)
            except _Unwritable:
                return None
    return None


def evaluate(code: str, namespace: dict[str, Any]) -> Any:
    """Run a suggestion: its statements, then the value of its last line."""
    *statements, last = code.splitlines()
    scope = {"torch": torch, **namespace}
    for statement in statements:
        exec(compile(statement, "<normfuse suggestion>", "exec"), scope)
    return eval(compile(last, "<normfuse suggestion>", "eval"), scope)


class _Members:
    """Stands for an object the suggestion reads attributes or items of (``self.lin.weight``)."""

    def __init__(self) -> None:
        self.members: dict[Any, Any] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["members"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key: Any) -> Any:
        return self.members[key]


def namespace(names: dict[str, Any]) -> dict[str, Any]:
    """A namespace in which each expression of ``names`` (``x``, ``self.lin.weight``, ``xs[0]``)
    evaluates to its value."""
    out: dict[str, Any] = {}
    for expr, value in names.items():
        path: list[Any] = []
        node = ast.parse(expr, mode="eval").body
        while not isinstance(node, ast.Name):
            if isinstance(node, ast.Attribute):
                path.append(node.attr)
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                path.append(node.slice.value)
            else:
                raise ValueError(f"not a plain name: {expr}")
            node = node.value
        path.append(node.id)
        path.reverse()
        holder: Any = out
        for key in path[:-1]:
            table = holder if isinstance(holder, dict) else holder.members
            holder = table.setdefault(key, _Members())
        (holder if isinstance(holder, dict) else holder.members)[path[-1]] = value
    return out


def element_nodes(group: Any) -> tuple[str, ...]:
    """The names of the graph nodes of a group's first element: its slices and per-slice ops."""
    if isinstance(group, NormGroup):
        sl, site = group.slices[0], group.site
        nodes = [sl.parent, sl.node, *site.inputs, *site.nodes]
    elif isinstance(group, ProgramGroup):
        program = group.programs[0]
        nodes = [n for sl in program.leaves for n in (sl.parent, sl.node)] + list(program.nodes)
        nodes += [n for op in program.ops if op.site is not None for n in op.site.inputs]
    elif isinstance(group, ChainGroup):
        nodes = [*group.site.inputs, *group.site.nodes]
    elif isinstance(group, MultiNormGroup):
        nodes = [*group.tensors, *group.nodes]
    else:
        return ()
    return tuple(dict.fromkeys(n.name for n in nodes if n is not None))
