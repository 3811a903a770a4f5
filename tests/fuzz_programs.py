"""Random naive-norm programs for differential fuzzing (tests/test_fuzz.py), and the oracle.

A ``Program`` is Python source text for ``def fn(x, y): ...`` (so a failure prints as a readable,
pasteable repro), how to build its inputs, and what the generator knows about it: how many loops
normfuse should rewrite, and which fibers of which input are degenerate (where the README's
numerics table allows the default mode to differ from the naive loop).

Generated programs are the naive loops users write: a slicing form (``x[i]``, ``select``,
``for row in x``, ``unbind``, ``x[:, j]``, ``x[..., j]``, ``x[i:i+1]``, ``narrow``, ``split``,
``chunk``), a norm spelling (hand-written chains and direct calls, ord 1, 2, p, inf, -inf and a
few more for ``vector_norm``), reduced dims and keepdim, a cast before the norm, a small program
around it (WGAN-GP, normalise, clip, affine), a reshape after it, a combiner (``stack``, ``cat``,
``sum``, an add chain) and what follows it, a coverage of the batch (all, ranges, reversed,
permuted, repeated), unrelated ops in between, several loops per graph, DP-SGD over two tensors
and edge lengths ``(x[a] - x[b]).norm()``. Inputs: four float dtypes; B = 1; size-0 dims;
transposed, strided and expanded views; zeros, huge and tiny magnitudes, NaN, inf and ties.
Near misses (``near_miss_programs``) must be left exactly as Dynamo made them.

Every choice is drawn through one ``draw`` callable, so this works under hypothesis
(``st.composite``) and shrinks like any strategy.
"""

from __future__ import annotations

import dataclasses
import itertools
import linecache
import math
from typing import Any, Callable

import torch
from hypothesis import strategies as st

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# magnitudes whose squares overflow / underflow in each dtype
HUGE = {torch.float16: 300.0, torch.bfloat16: 3e19, torch.float32: 3e19, torch.float64: 1e160}
TINY = {torch.float16: 1e-4, torch.bfloat16: 1e-24, torch.float32: 1e-24, torch.float64: 1e-170}
INF = math.inf


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One input: its shape and dtype, a layout (a view of a leaf ``base``) and its values."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str = "contiguous"  # contiguous | transposed | strided | expanded
    layout_dim: int = 0
    values: str = "normal"  # normal | zero_slice | zeros | huge | tiny | nan | inf | ties
    slice_dim: int = 0  # the dim the program slices along (for zero/huge/tiny slices)
    seed: int = 0

    def base_shape(self) -> tuple[int, ...]:
        s = list(self.shape)
        if self.layout == "transposed":
            s[self.layout_dim], s[-1] = s[-1], s[self.layout_dim]
        elif self.layout == "strided":
            s[-1] = 2 * s[-1]
        elif self.layout == "expanded":
            s[self.layout_dim] = 1
        return tuple(s)

    def view(self, base: torch.Tensor) -> torch.Tensor:
        if self.layout == "transposed":
            return base.transpose(self.layout_dim, -1)
        if self.layout == "strided":
            return base[..., ::2]
        if self.layout == "expanded":
            return base.expand(self.shape)
        return base

    def base_values(self) -> torch.Tensor:
        """The leaf's values, already rounded to ``dtype``."""
        shape = self.base_shape()
        g = torch.Generator().manual_seed(self.seed)
        v = torch.randn(shape, generator=g, dtype=torch.float64) * 2
        n = v.numel()
        sd = self.slice_dim if self.layout != "transposed" else _swap(self.slice_dim, self.layout_dim, len(shape))
        if n and self.values != "normal":
            pick = int(torch.randint(0, n, (1,), generator=g))
            k = int(torch.randint(0, shape[sd], (1,), generator=g)) if shape[sd] else 0
            one_slice = [slice(None)] * len(shape)
            one_slice[sd] = k
            one_slice = tuple(one_slice)
            if self.values == "zero_slice":
                v[one_slice] = 0
            elif self.values == "zeros":
                v[torch.rand(shape, generator=g) < 0.4] = 0
            elif self.values == "huge":
                v[one_slice] *= HUGE[self.dtype]
            elif self.values == "tiny":
                v[one_slice] *= TINY[self.dtype]
            elif self.values == "nan":
                v.view(-1)[pick] = math.nan
            elif self.values == "inf":
                v.view(-1)[pick] = -math.inf if pick % 2 else math.inf
            elif self.values == "ties":
                v = torch.randint(-2, 3, shape, generator=g).to(torch.float64)
        return v.to(self.dtype)

    def describe(self) -> str:
        return f"{DTYPE_NAMES[self.dtype]}{list(self.shape)} {self.layout}{'' if self.layout == 'contiguous' else f'@{self.layout_dim}'} {self.values} seed={self.seed}"


def _swap(d: int, a: int, ndim: int) -> int:
    a %= ndim
    last = ndim - 1
    return last if d == a else a if d == last else d


# --------------------------------------------------------------------------- programs


@dataclasses.dataclass(frozen=True)
class Fiber:
    """The elements of input ``arg`` one per-slice norm reduces: ``dims`` of the input.

    ``p`` and ``chain_dtype`` describe a hand-written chain (None for a direct norm call, whose
    eager gradient is already vector_norm's): where its powers all underflow to zero (an
    all-zero slice, or a tiny one), the naive gradient is NaN/inf and the default mode's is finite.
    ``extremum``: an ``amax``/``max``/``amin``/``min`` chain; a NaN in the fiber gives a NaN
    gradient in eager and a finite one in the default mode.
    """

    arg: int
    dims: tuple[int, ...]
    p: float | None = None
    chain_dtype: torch.dtype | None = None
    extremum: bool = False
    size: int = 0  # elements per fiber


@dataclasses.dataclass
class Program:
    source: str
    inputs: list[InputSpec]
    kind: str = "rewrite"  # rewrite | near_miss
    expect_rewrites: int | None = None  # None: the README makes no claim (e.g. size-0 dims)
    fibers: list[Fiber] = dataclasses.field(default_factory=list)
    half_chain: bool = False  # a chain squares in float16: the documented float32 accumulation

    one_element_edges: bool = False  # ``sqrt(((x[a] - x[b]) ** 2).sum())`` of one-element rows

    @property
    def one_element_float64_extremes(self) -> bool:
        """One-element chains of huge/tiny float64 values: the float64 run overflows like the loop."""
        return self.one_element_extremes and any(s.dtype == torch.float64 for s in self.inputs)

    @property
    def one_element_extremes(self) -> bool:
        """A hand-written chain over one element per slice, of huge or tiny values (where
        vector_norm's ``|x|`` and the naive ``sqrt(x**2)`` differ)."""
        extreme = [s.values in ("huge", "tiny") for s in self.inputs]
        return (self.one_element_edges and extreme[0]) or any(
            f.p is not None and f.size == 1 and extreme[f.arg] for f in self.fibers
        )
    reordered_grads: bool = False  # exact mode: gradients summed in another order (README)
    backward: bool = True
    tags: tuple[str, ...] = ()

    _counter = itertools.count()

    def fn(self) -> Callable:
        filename = f"<normfuse-fuzz-{next(Program._counter)}>"
        linecache.cache[filename] = (len(self.source), None, self.source.splitlines(True), filename)
        scope: dict[str, Any] = {"torch": torch, "math": math}
        exec(compile(self.source, filename, "exec"), scope)
        return scope["fn"]

    def describe(self) -> str:
        ins = "\n".join(f"#   arg{i}: {s.describe()}" for i, s in enumerate(self.inputs))
        return f"{self.source}# inputs:\n{ins}\n# tags: {', '.join(self.tags)}"


# Slicing forms: (dim (0, 1 or -1), keeps the dim, needs ndim >= 2, template). ``{s}`` is the
# source, ``{i}`` the index; a ``rows`` form iterates a tuple made once before the loop.
FORMS = {
    "index": (0, False, False, "{s}[{i}]"),
    "select": (0, False, False, "{s}.select(0, {i})"),
    "negative_index": (0, False, False, "{s}[{i} - {B}]"),
    "iterate": (0, False, False, None),
    "unbind": (0, False, False, "rows = {s}.unbind(0)"),
    "column": (1, False, True, "{s}[:, {i}]"),
    "select1": (1, False, True, "{s}.select(1, {i})"),
    "unbind1": (1, False, True, "rows = {s}.unbind(1)"),
    "ellipsis_last": (-1, False, True, "{s}[..., {i}]"),
    "unit_slice": (0, True, False, "{s}[{i}:{i} + 1]"),
    "narrow": (0, True, False, "{s}.narrow(0, {i}, 1)"),
    "split": (0, True, False, "rows = {s}.split(1, 0)"),
    "chunk": (0, True, False, "rows = {s}.chunk({B}, 0)"),
}

SQUARES = ["{c} ** 2", "{c}.pow(2)", "torch.pow({c}, 2)", "{c} * {c}", "torch.square({c})", "{c}.square()", "{c}.abs() ** 2", "{c} ** 2.0"]
ROOTS = ["torch.sqrt({s})", "{s}.sqrt()", "{s} ** 0.5", "{s}.pow(0.5)"]
CASTS = ["", ".float()", ".double()", ".to(torch.float32)"]
CAST_DTYPES = {".float()": torch.float32, ".double()": torch.float64, ".to(torch.float32)": torch.float32}
POSTS = {
    "none": "{n}",
    "wgan": "({n} - 1) ** 2",
    "affine": "{n} * 2.0 + 1.0",
    "ratio": "{n} / (1 + {n})",
    "normalise": "{c} / ({n} + 1e-6)",
    "normalise_raw": "{c} / {n}",
    "clip": "{c} * torch.clamp(1.0 / ({n} + 1e-6), max=1.0)",
}
AFTERS = ["{o}", "{o}.sum()", "{o}.mean()", "{o}.amax()", "(1.0 / ({o} + 1e-6)).clamp(max=1.0)", "{o} * 2"]


def _dims_text(dims: tuple[int, ...]) -> str:
    return str(dims[0]) if len(dims) == 1 else "(" + ", ".join(map(str, dims)) + ("," if len(dims) == 1 else "") + ")"


def _sum_call(draw, arg: str, dims, keepdim: bool) -> str:
    if dims is None:
        return draw(st.sampled_from([f"({arg}).sum()", f"torch.sum({arg})"]))
    d = _dims_text(dims)
    return draw(st.sampled_from([f"({arg}).sum({d}, keepdim={keepdim})", f"torch.sum({arg}, dim={d}, keepdim={keepdim})"]))


@dataclasses.dataclass
class Norm:
    text: str
    p: float | None  # None: a direct call (eager gradient already safe)
    extremum: bool = False
    claimed: bool = True


def draw_norm(draw, c: str, vshape: tuple[int, ...], dims, keepdim: bool, allow_extremum: bool) -> Norm:
    """A norm of ``c`` (shape ``vshape``) over ``dims`` (None: all), spelled one of many ways."""
    families = ["l2", "l2", "l2", "p", "l1", "direct", "direct"]
    if allow_extremum:
        families += ["linf", "lneginf"]
    family = draw(st.sampled_from(families))
    d = None if dims is None else _dims_text(dims)
    if family == "l2":
        sq = draw(st.sampled_from(SQUARES)).format(c=c)
        s = _sum_call(draw, sq, dims, keepdim)
        return Norm(draw(st.sampled_from(ROOTS)).format(s=s), 2.0)
    if family == "p":
        p = draw(st.sampled_from([3, 4, 1.5]))
        if p == 4 and draw(st.booleans()):
            s = _sum_call(draw, f"{c} ** 4", dims, keepdim)
            return Norm(f"({s}) ** 0.25", 4.0)
        s = _sum_call(draw, f"{c}.abs().pow({p})", dims, keepdim)
        return Norm(f"({s}).pow(1 / {p})", float(p))
    if family == "l1":
        return Norm(_sum_call(draw, f"{c}.abs()", dims, keepdim), None)
    if family in ("linf", "lneginf"):
        name = "max" if family == "linf" else "min"
        if dims is None and draw(st.booleans()):
            return Norm(f"{c}.abs().{name}()", None, extremum=True)
        if dims is None:
            return Norm(f"{c}.abs().a{name}()", None, extremum=True)
        return Norm(f"{c}.abs().a{name}({d}, keepdim={keepdim})", None, extremum=True)
    # direct calls
    ords = [2, 1, 3, INF, -INF] + ([0, 0.5, -1] if allow_extremum else [0, 0.5])
    ord_ = draw(st.sampled_from(ords if allow_extremum else [o for o in ords if o not in (INF, -INF)]))
    o = {INF: "math.inf", -INF: "-math.inf"}.get(ord_, repr(ord_))
    spelling = draw(st.sampled_from(["vector_norm", "method", "torch_norm", "linalg_norm"]))
    dim_kw = "" if d is None else f", dim={d}, keepdim={keepdim}"
    if spelling == "linalg_norm":
        ndim = len(vshape)
        if dims is not None and len(dims) == 1:
            return Norm(f"torch.linalg.norm({c}, {o}, dim={d}, keepdim={keepdim})", None)
        if dims is None and ndim == 1:
            return Norm(f"torch.linalg.norm({c}, {o})", None)
        if dims is None and ndim == 2:
            return Norm(draw(st.sampled_from([f"torch.linalg.norm({c})", f"torch.linalg.norm({c}, 'fro')"])), None)
        spelling = "vector_norm"
    if spelling == "vector_norm" or (spelling == "torch_norm" and ord_ in (0, 0.5, -1)):
        return Norm(f"torch.linalg.vector_norm({c}, {o}{dim_kw})", None)
    if spelling == "method":
        return Norm(f"{c}.norm({o}{dim_kw})", None)
    return Norm(f"torch.norm({c}, p={o}{dim_kw})", None)


def _x_dims(vdims: tuple[int, ...] | None, vndim: int, sdim: int, keeps: bool, xndim: int) -> tuple[int, ...]:
    """The per-slice reduced dims as dims of the source tensor (the sliced dim excluded)."""
    all_v = tuple(range(vndim)) if vdims is None else vdims
    if keeps:
        return tuple(d for d in all_v if d != sdim)
    return tuple(d if d < sdim else d + 1 for d in all_v)


def draw_shape(draw, min_ndim: int, allow_empty: bool) -> tuple[int, ...]:
    ndim = draw(st.sampled_from([n for n in (1, 2, 2, 3, 3) if n >= min_ndim]))
    sizes = [1, 2, 3, 5] + ([0] if allow_empty else [])
    shape = [draw(st.sampled_from([1, 2, 3, 4, 6]))]
    shape += [draw(st.sampled_from(sizes)) for _ in range(ndim - 1)]
    return tuple(shape)


def _nonempty_at(shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    """The sliced dim holds at least one slice (``torch.stack([])`` is an error in eager too)."""
    dim %= len(shape)
    return tuple(2 if k == dim and s == 0 else s for k, s in enumerate(shape))


def draw_input(draw, shape, dtype, slice_dim: int, values: list[str], layouts=("contiguous",) * 3 + ("transposed", "strided", "expanded")) -> InputSpec:
    layout = draw(st.sampled_from(list(layouts)))
    if layout == "transposed" and len(shape) < 2:
        layout = "contiguous"
    layout_dim = draw(st.integers(min_value=0, max_value=len(shape) - 1)) if layout in ("transposed", "expanded") else 0
    if layout == "transposed" and layout_dim == len(shape) - 1:
        layout_dim = 0
    return InputSpec(
        tuple(shape), dtype, layout, layout_dim, draw(st.sampled_from(values)), slice_dim % len(shape),
        draw(st.integers(min_value=0, max_value=2**16)),
    )


VALUES = ["normal"] * 4 + ["zero_slice", "zeros", "huge", "tiny", "nan", "inf", "ties"]


@dataclasses.dataclass
class Loop:
    lines: list[str]
    out: str
    fibers: list[Fiber]
    half_chain: bool
    claimed: bool
    reordered: bool
    tags: list[str]
    sources: tuple[int, ...] = ()  # the args it slices


def draw_coverage(draw, B: int, full_only: bool) -> tuple[str, list[int]]:
    kind = "all" if full_only else draw(st.sampled_from(["all", "all", "prefix", "range", "reversed", "permuted", "repeats"]))
    if kind == "prefix":
        k = draw(st.integers(min_value=1, max_value=B))
        return f"range({k})", list(range(k))
    if kind == "range":
        a = draw(st.integers(min_value=0, max_value=B - 1))
        b = draw(st.integers(min_value=a + 1, max_value=B))
        s = draw(st.integers(min_value=1, max_value=3))
        return f"range({a}, {b}, {s})", list(range(a, b, s))
    if kind == "reversed":
        return f"reversed(range({B}))", list(reversed(range(B)))
    if kind == "permuted":
        idx = draw(st.permutations(list(range(B))))
        idx = idx[: draw(st.integers(min_value=1, max_value=B))]
        return repr(tuple(idx)) if len(idx) > 1 else f"({idx[0]},)", list(idx)
    if kind == "repeats":
        idx = draw(st.lists(st.integers(min_value=0, max_value=B - 1), min_size=2, max_size=6))
        return repr(tuple(idx)), list(idx)
    return f"range({B})", list(range(B))


def draw_norm_loop(draw, name: str, src: str, arg: int, spec_shape, dtype, form: str, tag: str) -> Loop:
    """One loop ``{name} = combine([post(norm(cast(slice(src, i)))) for i in coverage])``."""
    sdim, keeps, _, template = FORMS[form]
    xndim = len(spec_shape)
    sdim %= xndim
    B = spec_shape[sdim]
    vshape = list(spec_shape)
    if keeps:
        vshape[sdim] = 1
    else:
        del vshape[sdim]
    vshape = tuple(vshape)
    cov_text, cov = draw_coverage(draw, B, full_only=form == "iterate")
    lines: list[str] = []
    if template and template.startswith("rows"):
        lines.append(template.format(s=src, B=B).replace("rows", f"rows_{name}"))
    cast = draw(st.sampled_from(CASTS))
    chain_dtype = CAST_DTYPES.get(cast, dtype)
    # reduced dims of the slice
    vndim = len(vshape)
    if vndim == 0 or draw(st.booleans()):
        dims = None
    else:
        chosen = draw(st.lists(st.integers(min_value=0, max_value=vndim - 1), min_size=1, max_size=vndim, unique=True))
        dims = tuple(sorted(chosen))
        if draw(st.booleans()):  # negative spellings
            dims = tuple(d - vndim for d in dims)
    ndims = None if dims is None else tuple(sorted(d % vndim for d in dims))
    keepdim = dims is not None and draw(st.booleans())
    reduced_sizes = [vshape[d] for d in (ndims if ndims is not None else range(vndim))]
    nonempty = all(s > 0 for s in reduced_sizes)
    norm = draw_norm(draw, "c", vshape, dims, keepdim, allow_extremum=nonempty)
    # the per-slice program around the norm
    r_is_scalar = ndims is None or len(ndims) == vndim and not keepdim
    posts = ["none", "none", "none", "wgan", "affine", "ratio"]
    if r_is_scalar or keepdim:
        posts += ["normalise", "normalise_raw", "clip"]
    post = draw(st.sampled_from(posts))
    # the shape of one element, for the combiner
    if post in ("normalise", "normalise_raw", "clip"):
        rshape = vshape
    else:
        kept = [s if (ndims is not None and i not in ndims) else 1 for i, s in enumerate(vshape)]
        rshape = tuple(kept) if keepdim else tuple(s for i, s in enumerate(vshape) if ndims is not None and i not in ndims)
    reshape = draw(st.sampled_from(["", "", ".unsqueeze(0)", ".reshape(-1)", "[None]", ".flatten()"]))
    if reshape == ".unsqueeze(0)" or reshape == "[None]":
        rshape = (1,) + rshape
    elif reshape in (".reshape(-1)", ".flatten()"):
        rshape = (math.prod(rshape),)
    combiners = ["stack", "stack", "sum"] + (["cat"] if len(rshape) >= 1 else []) + (["chain"] if len(cov) >= 2 else [])
    combiner = draw(st.sampled_from(combiners))
    unrelated = draw(st.sampled_from(["", "", "", "aux", "side", "inplace"]))

    head = f"for v in {src}:" if form == "iterate" else f"for i in {cov_text}:"
    if unrelated == "aux":
        lines.append(f"aux_{name} = y.sum() * 0")
    elif unrelated == "side":
        lines.append(f"side_{name} = {src}.sum() * 0")
    elif unrelated == "inplace":
        lines.append(f"buf_{name} = y.detach().clone()")
    lines.append(f"parts_{name} = []")
    lines.append(head)
    if form != "iterate":
        sl = f"rows_{name}[i]" if template.startswith("rows") else template.format(s=src, i="i", B=B)
        lines.append(f"    v = {sl}")
    lines.append(f"    c = v{cast}")
    lines.append(f"    n = {norm.text}")
    r = POSTS[post].format(n="n", c="c")
    lines.append(f"    r = {f'({r}){reshape}' if reshape and r != 'n' else r + reshape}")
    lines.append(f"    parts_{name}.append(r)")
    extra_out = []
    if unrelated == "aux":
        lines.append(f"    aux_{name} = aux_{name} * 0.5 + y.sin()")
        extra_out.append(f"aux_{name}")
    elif unrelated == "side":
        lines.append(f"    side_{name} = side_{name} + v.sum()")
        extra_out.append(f"side_{name}")
    elif unrelated == "inplace":
        lines.append(f"    buf_{name}.mul_(1.5)")
        extra_out.append(f"buf_{name}")
    if combiner == "stack":
        k = draw(st.integers(min_value=-(len(rshape) + 1), max_value=len(rshape)))
        comb = f"torch.stack(parts_{name}, dim={k})"
    elif combiner == "cat":
        k = draw(st.integers(min_value=-len(rshape), max_value=len(rshape) - 1))
        comb = f"torch.cat(parts_{name}, dim={k})"
    elif combiner == "sum":
        comb = f"sum(parts_{name})"
    else:
        comb = " + ".join(f"parts_{name}[{j}]" for j in range(len(cov)))
    afters = AFTERS if all(spec_shape) else [a for a in AFTERS if "amax" not in a]  # amax of nothing raises
    after = draw(st.sampled_from(afters)) if combiner in ("stack", "cat") else "{o}"
    lines.append(f"{name} = {after.format(o=comb)}")
    out = ", ".join([name] + extra_out)

    xdims = _x_dims(ndims, vndim, sdim, keeps, xndim)
    size = math.prod(spec_shape[d] for d in xdims)
    fiber = Fiber(arg, xdims, norm.p, chain_dtype if norm.p is not None else None, norm.extremum, size)
    claimed = norm.claimed and bool(xdims) and all(s > 0 for s in spec_shape)
    if combiner == "sum" and len(cov) == 1:
        claimed = False  # ``0 + e``: one element, nothing to batch
    tags = [tag, form, combiner, f"post={post}", f"cast={cast or 'none'}", f"unrelated={unrelated or 'none'}"]
    return Loop(
        lines, out, [fiber], norm.p is not None and chain_dtype == torch.float16, claimed,
        len(set(cov)) < len(cov) or unrelated == "side", tags, (arg,),
    )


def _indent(lines: list[str]) -> str:
    return "".join(f"    {ln}\n" for ln in lines)


def _program(loops: list[Loop], inputs: list[InputSpec], kind: str = "rewrite", backward: bool = True) -> Program:
    body = [ln for lp in loops for ln in lp.lines]
    outs = ", ".join(lp.out for lp in loops)
    source = f"def fn(x, y):\n{_indent(body)}    return {outs}\n"
    claimed = all(lp.claimed for lp in loops)
    return Program(
        source, inputs, kind,
        expect_rewrites=len(loops) if claimed and kind == "rewrite" else (0 if kind == "near_miss" else None),
        fibers=[f for lp in loops for f in lp.fibers],
        half_chain=any(lp.half_chain for lp in loops),
        # README: exact gradients agree up to rounding only where a tensor feeds several positions
        # or a slice is also used outside its loop (beside it, or by a second loop over the source)
        reordered_grads=any(lp.reordered for lp in loops)
        or any(sum(a in lp.sources for lp in loops) > 1 for a in range(len(inputs))),
        backward=backward,
        tags=tuple(t for lp in loops for t in lp.tags),
    )


def _y_spec(draw, dtype, shape=None, values=("normal",)) -> InputSpec:
    shape = shape or draw_shape(draw, 1, allow_empty=False)
    return draw_input(draw, shape, dtype, 0, list(values), layouts=("contiguous",))


@st.composite
def norm_programs(draw, *, dtypes=DTYPES, allow_empty: bool = True, values=VALUES) -> Program:
    """A program with one or two naive loops that normfuse rewrites."""
    dtype = draw(st.sampled_from(dtypes))
    shape_kind = draw(st.sampled_from(["single"] * 6 + ["two_loops", "dpsgd", "edges"]))
    if shape_kind == "dpsgd":
        return _dpsgd(draw, dtype)
    if shape_kind == "edges":
        return _edges(draw, dtype)
    form = draw(st.sampled_from(list(FORMS)))
    shape = _nonempty_at(draw_shape(draw, 2 if FORMS[form][2] else 1, allow_empty=allow_empty and draw(st.integers(0, 3)) == 0), FORMS[form][0])
    x = draw_input(draw, shape, dtype, FORMS[form][0], list(values))
    loops = [draw_norm_loop(draw, "a", "x", 0, shape, dtype, form, "single")]
    if shape_kind == "two_loops":
        if draw(st.booleans()):  # a second loop over the same source, another spelling
            form2 = draw(st.sampled_from([
                f for f in FORMS if (not FORMS[f][2] or len(shape) >= 2) and shape[FORMS[f][0] % len(shape)] > 0
            ]))
            y = _y_spec(draw, dtype)
            loops.append(draw_norm_loop(draw, "b", "x", 0, shape, dtype, form2, "second_loop_same_source"))
        else:
            form2 = draw(st.sampled_from(list(FORMS)))
            yshape = _nonempty_at(draw_shape(draw, 2 if FORMS[form2][2] else 1, allow_empty=False), FORMS[form2][0])
            y = draw_input(draw, yshape, dtype, FORMS[form2][0], list(values))
            loops.append(draw_norm_loop(draw, "b", "y", 1, yshape, dtype, form2, "second_loop_other_source"))
    else:
        y = _y_spec(draw, dtype)
    return _program(loops, [x, y])


def _dpsgd(draw, dtype) -> Program:
    """The per-sample norm over two tensors (DP-SGD), as a chain or via a generator ``sum``."""
    B = draw(st.sampled_from([1, 2, 3, 5]))
    xs = (B,) + tuple(draw(st.sampled_from([1, 2, 3])) for _ in range(draw(st.integers(1, 2))))
    ys = (B,) + tuple(draw(st.sampled_from([1, 2, 4])) for _ in range(draw(st.integers(1, 2))))
    values = ["normal", "normal", "huge", "nan", "inf"]
    x = draw_input(draw, xs, dtype, 0, values)
    y = draw_input(draw, ys, dtype, 0, values)
    spelling = draw(st.sampled_from(["chain", "gen_sum"]))
    if spelling == "chain":
        n = "torch.sqrt((x[i] ** 2).sum() + (y[i] ** 2).sum())"
    else:
        n = "torch.sqrt(sum((g[i] ** 2).sum() for g in (x, y)))"
    after = draw(st.sampled_from(["{o}", "(1.0 / ({o} + 1e-6)).clamp(max=1.0)"]))
    lines = [f"a = {after.format(o=f'torch.stack([{n} for i in range({B})])')}"]
    loop = Loop(lines, "a", [], dtype == torch.float16, True, False, ["dpsgd", spelling])
    return _program([loop], [x, y])


def _edges(draw, dtype) -> Program:
    """``(x[a] - x[b]).norm()`` over a list of edges (endpoints shared: gradients reordered)."""
    B = draw(st.sampled_from([2, 3, 5]))
    shape = (B, draw(st.sampled_from([1, 2, 3])))
    pairs = [(a, (a + d) % B) for a, d in draw(st.lists(st.tuples(st.integers(0, B - 1), st.integers(1, B - 1)), min_size=1, max_size=5))]
    x = draw_input(draw, shape, dtype, 0, ["normal", "normal", "huge", "nan", "inf"], layouts=("contiguous", "transposed", "strided"))
    spelling = draw(st.sampled_from(["norm", "chain"]))
    n = "(x[a] - x[b]).norm(dim=-1)" if spelling == "norm" else "torch.sqrt(((x[a] - x[b]) ** 2).sum())"
    lines = [f"a = torch.stack([{n} for a, b in {pairs!r}])"]
    loop = Loop(lines, "a", [], dtype == torch.float16 and spelling == "chain", True, True, ["edges", spelling])
    program = _program([loop], [x, _y_spec(draw, dtype)])
    program.one_element_edges = spelling == "chain" and shape[1] == 1
    return program


# --------------------------------------------------------------------------- near misses

NEAR_MISSES = {
    "eps_in_root": "torch.sqrt((c ** 2).sum({d}) + 1e-6)",
    "squared_norm": "(c ** 2).sum({d})",
    "mismatched_root": "c.abs().pow(3).sum({d}).pow(0.5)",
    "root_of_square_wrong": "(c ** 2).sum({d}).pow(1 / 3)",
    "odd_power_without_abs": "c.pow(3).sum({d}).pow(1 / 3)",
    "root_of_l1": "c.abs().sum({d}).sqrt()",
}


@st.composite
def near_miss_programs(draw, *, dtypes=DTYPES) -> Program:
    """A loop that looks like a norm loop but must be left exactly as written."""
    dtype = draw(st.sampled_from(dtypes))
    defect = draw(st.sampled_from(list(NEAR_MISSES) + ["mutated", "setitem", "alias_mutated", "mixed_sources", "mixed_norms", "norm_escapes", "not_all_norms"]))
    form = draw(st.sampled_from(["index", "select", "unbind", "column", "unit_slice", "narrow"]))
    sdim, keeps, needs2, template = FORMS[form]
    shape = draw_shape(draw, 2, allow_empty=False)
    B = shape[sdim]
    if B < 2:
        shape = tuple(3 if k == sdim else s for k, s in enumerate(shape))
        B = 3
    x = draw_input(draw, shape, dtype, sdim, ["normal", "zeros", "nan"])
    y = _y_spec(draw, dtype, shape=shape)
    lines = []
    src = "x"
    if defect in ("mutated", "setitem", "alias_mutated"):
        lines.append("src = x.detach().clone(memory_format=torch.contiguous_format)")
        src = "src"
        if defect == "alias_mutated":
            lines.append("flat = src.view(-1)")
    if template.startswith("rows"):
        lines.append(template.format(s=src, B=B))
        lines.append(template.format(s="y", B=B).replace("rows", "rows_y"))
    sl = "rows[i]" if template.startswith("rows") else template.format(s=src, i="i", B=B)
    sl_y = "rows_y[i]" if template.startswith("rows") else template.format(s="y", i="i", B=B)
    d = draw(st.sampled_from(["", "-1"]))
    goods = ["c.norm()", "torch.sqrt((c ** 2).sum())", "c.abs().sum()"] if not d else [
        "c.norm(dim=-1)", "torch.sqrt((c ** 2).sum(-1))", "c.abs().sum(-1)"]
    good = draw(st.sampled_from(goods))
    other = "c.norm(1)" if not d else "c.norm(1, dim=-1)"
    lines.append("parts = []")
    lines.append(f"for k, i in enumerate(range({B})):")
    if defect == "mixed_sources":
        lines.append(f"    v = ({sl}) if k % 2 == 0 else ({sl_y})")
    else:
        lines.append(f"    v = {sl}")
    lines.append("    c = v")
    if defect in NEAR_MISSES:
        lines.append(f"    n = {NEAR_MISSES[defect].format(d=d)}")
    elif defect == "mixed_norms":
        if "abs().sum" in good:  # L1 both ways would be one norm
            other = "c.norm()" if not d else "c.norm(dim=-1)"
        lines.append(f"    n = {good} if k != 1 else {other}")
    elif defect == "not_all_norms":
        lines.append(f"    n = {good} if k != 1 else c.sum({d})")
    else:
        lines.append(f"    n = {good}")
    if defect == "mutated":
        lines.append("    if k == 0:")
        lines.append(f"        {src}.mul_(2)")
    elif defect == "setitem":
        lines.append("    if k == 0:")
        lines.append(f"        {src}[1] = 0.5")
    elif defect == "alias_mutated":
        lines.append("    if k == 0:")
        lines.append("        flat.add_(1)")
    elif defect == "norm_escapes":
        lines.append("    if k == 0:")
        lines.append("        first = n + 1")
    lines.append("    parts.append(n)")
    comb = draw(st.sampled_from(["torch.stack(parts)", "sum(parts)"]))
    lines.append(f"a = {comb}")
    outs = "a, first" if defect == "norm_escapes" else "a"
    source = f"def fn(x, y):\n{_indent(lines)}    return {outs}\n"
    return Program(
        source, [x, y], "near_miss", expect_rewrites=0,
        backward=defect not in ("mutated", "setitem", "alias_mutated"),
        tags=("near_miss", defect, form),
    )


# --------------------------------------------------------------------------- running and the oracle

# conftest's TOLERANCES, by the lowest precision a program computes in
_PRECISION = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@dataclasses.dataclass
class Run:
    outs: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    leaves: list[torch.Tensor]
    args: list[torch.Tensor]


def flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in flat(o)]


def make_args(program: Program, float64: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    leaves, args = [], []
    for spec in program.inputs:
        base = spec.base_values()
        leaf = (base.double() if float64 else base.clone()).requires_grad_(True)
        leaves.append(leaf)
        args.append(spec.view(leaf))
    return leaves, args


def seeds_for(outs: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]


def run(program: Program, call: Callable, *, float64: bool = False, seeds: list[torch.Tensor] | None = None) -> Run:
    """Call ``call(*args)`` on fresh leaves, then backward with ``seeds`` (eager's by default)."""
    leaves, args = make_args(program, float64)
    outs = flat(call(*args))
    grads: list[torch.Tensor | None] = [None] * len(leaves)
    if program.backward:
        seeds = seeds or seeds_for(outs)
        pairs = [(o, s.to(o.dtype)) for o, s in zip(outs, seeds) if o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [s for _, s in pairs])
        grads = [leaf.grad for leaf in leaves]
    return Run([o.detach() for o in outs], grads, leaves, args)


def precision(program: Program) -> dict[str, float]:
    """conftest's tolerance for the lowest precision the program computes in (inputs and casts)."""
    from conftest import TOLERANCES

    used = {s.dtype for s in program.inputs}
    used |= {CAST_DTYPES[c] for c in CAST_DTYPES if c in program.source}
    return TOLERANCES[min(used, key=_PRECISION.index)]


def degenerate_mask(program: Program, arg_index: int) -> torch.Tensor | None:
    """Elements of leaf ``arg_index`` where the README lets the default mode's gradient be finite
    where the naive loop's is NaN/inf: fibers of a hand-written chain whose powers are all zero in
    the chain's dtype (an all-zero slice, or one whose squares all underflow), fibers of a p-norm
    chain (p != 2) whose powers overflow, and fibers of an amax/max/amin/min chain holding a NaN."""
    spec = program.inputs[arg_index]
    fibers = [f for f in program.fibers if f.arg == arg_index and (f.p is not None or f.extremum)]
    if not fibers:
        return None
    x = spec.view(spec.base_values())
    mask = torch.zeros(x.shape, dtype=torch.bool)
    for f in fibers:
        if f.p is not None:
            powers = x.to(f.chain_dtype).abs() ** f.p
            total = powers.sum(f.dims, keepdim=True) if f.dims else powers
            hit = (total == 0) | ((total == math.inf) if f.p != 2 else False)
        else:
            hit = x.isnan().any(f.dims, keepdim=True) if f.dims else x.isnan()
        mask |= hit.expand(x.shape)
    # the view's elements back onto its leaf
    probe = torch.zeros(spec.base_shape(), dtype=torch.float64, requires_grad=True)
    (spec.view(probe) * mask.double()).sum().backward()
    return probe.grad != 0


class Mismatch(AssertionError):
    pass


def compare(got, want, ref, tol: dict[str, float], *, allow: torch.Tensor | None = None,
            accurate: dict[str, bool] | None = None, what: str = "") -> dict[str, int]:
    """normfuse's ``got`` against eager's ``want``, element by element, with the float64 ``ref``.

    Equal shape and dtype; NaN and inf where eager has them; finite values within ``tol`` of
    eager, or at least as close to the float64 reference as eager is (up to a factor 2 and
    ``tol``: cancellation amplifies rounding equally in both). Where eager is non-finite and
    normfuse finite, only named deviations pass: each ``accurate`` one that is on (normfuse
    then must match the float64 reference, e.g. float16 squares that overflow while vector_norm
    accumulates in float32) and ``allow`` (the degenerate fibers of ``degenerate_mask``).
    Returns how many elements passed through each deviation.
    """
    if got is None or want is None:
        if got is not None or want is not None:
            raise Mismatch(f"{what}: one of the gradients is None (normfuse {got is None}, eager {want is None})")
        return {}
    if got.dtype != want.dtype or got.shape != want.shape:
        raise Mismatch(f"{what}: normfuse {got.dtype}{list(got.shape)} vs eager {want.dtype}{list(want.shape)}")
    g, w, r = got.double(), want.double(), ref.double()
    atol, rtol = tol["atol"], tol["rtol"]
    same_nonfinite = (g.isnan() & w.isnan()) | (~w.isfinite() & ~w.isnan() & (g == w))
    finite = g.isfinite() & w.isfinite()
    close = (g - w).abs() <= atol + rtol * w.abs()
    better = r.isfinite() & ((g - r).abs() <= 2 * (w - r).abs() + atol + rtol * r.abs())
    ok = same_nonfinite | (finite & (close | better))
    deviates = ~ok & ~w.isfinite() & g.isfinite()
    seen = {}
    for name, on in (accurate or {}).items():
        if on:
            hit = deviates & r.isfinite() & ((g - r).abs() <= atol + rtol * r.abs()) & ~ok
            ok |= hit
            seen[name] = int(hit.sum())
    if allow is not None:
        degenerate = deviates & allow & ~ok
        ok |= degenerate
        seen["documented: finite gradient where the naive norm is 0, a p-norm overflows or an amax sees NaN"] = int(
            degenerate.sum())
    if not ok.all():
        bad = (~ok).nonzero()[:5].tolist()
        rows = "\n".join(f"  at {tuple(i)}: normfuse {g[tuple(i)].item()!r} eager {w[tuple(i)].item()!r} float64 {r[tuple(i)].item()!r}" for i in bad)
        raise Mismatch(f"{what}: {int((~ok).sum())} of {ok.numel()} elements differ\n{rows}")
    return {k: v for k, v in seen.items() if v}


def compare_bitwise(got, want, what: str) -> None:
    if got is None or want is None:
        if got is not None or want is not None:
            raise Mismatch(f"{what}: one of the gradients is None")
        return
    if got.dtype != want.dtype or got.shape != want.shape:
        raise Mismatch(f"{what}: normfuse {got.dtype}{list(got.shape)} vs eager {want.dtype}{list(want.shape)}")
    if not (torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())):
        diff = (got.double().nan_to_num() - want.double().nan_to_num()).abs()
        raise Mismatch(f"{what}: not bitwise equal (max difference {diff.max().item()!r}, NaN positions equal: {torch.equal(got.isnan(), want.isnan())})")


def check_against_eager(program: Program, got: Run, eager: Run, ref: Run, *, documented: bool, label: str,
                        grads: bool = True) -> dict[str, int]:
    """The property, for one compiled run: every output and (``grads``) every leaf gradient."""
    tol = precision(program)
    accurate = {
        "documented: float32 accumulation of float16": documented and program.half_chain,
        "documented: a one-element slice is abs(x)": documented and program.one_element_extremes,
    }
    seen: dict[str, int] = {}

    def add(d):
        for k, v in d.items():
            seen[k] = seen.get(k, 0) + v

    if len(got.outs) != len(eager.outs):
        raise Mismatch(f"{label}: {len(got.outs)} outputs, eager has {len(eager.outs)}")
    for k, (g, w, r) in enumerate(zip(got.outs, eager.outs, ref.outs)):
        add(compare(g, w, r, tol, accurate=accurate, what=f"{label} output {k}"))
    for k, (g, w, r) in enumerate(zip(got.grads, eager.grads, ref.grads) if grads else ()):
        allow = degenerate_mask(program, k) if documented else None
        add(compare(g, w, r, tol, allow=allow, accurate=accurate, what=f"{label} grad of arg {k}"))
    return seen


def check_exact(program: Program, got: Run, eager: Run, ref: Run, *, forward: str = "bitwise", grads: str = "bitwise") -> None:
    """Exact mode in eager: bitwise, forward and backward (README), except gradients that autograd
    sums in another order where one tensor feeds several slice positions. ``forward`` and
    ``grads`` (bitwise, tolerance, skip) relax a check for a known bug."""
    tol = precision(program)
    for k, (g, w, r) in enumerate(zip(got.outs, eager.outs, ref.outs)):
        if forward == "bitwise":
            compare_bitwise(g, w, f"exact output {k}")
        else:
            compare(g, w, r, tol, what=f"exact output {k}")
    if grads == "skip":
        return
    for k, (g, w, r) in enumerate(zip(got.grads, eager.grads, ref.grads)):
        if program.reordered_grads or grads == "tolerance":
            compare(g, w, r, tol, what=f"exact grad of arg {k} (reordered sums)")
        else:
            compare_bitwise(g, w, f"exact grad of arg {k}")
