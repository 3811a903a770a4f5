"""What a normfuse pass did, as data and as a table."""

from __future__ import annotations

import dataclasses
import math
import os

from tabulate import tabulate


def _where(location: str) -> str:
    return os.path.basename(location) if location else "?"


def _ord_text(ord_: float) -> str:
    if math.isinf(ord_):
        return "inf" if ord_ > 0 else "-inf"
    return f"{ord_:g}"


# Why each case the pass leaves alone is left alone, in words (the reasons come from
# ``passes.grouping``; a reason not listed here is shown as it is).
REASONS = {
    "eps inside the root": "sqrt(sum(v**2) + eps) is not a norm of v; an eps added after the root "
    "(norm + eps) would be fine",
    "squared norm with no root": "sum(v**2) is a squared norm: batching it as a norm would invent a sqrt "
    "(write (x**2).sum(dim) to batch it yourself)",
    "the root does not undo the power": "the root's exponent is not 1/p for the power p (or v**p with odd p "
    "has no abs), so this is not a p-norm",
    "matrix norm": "a matrix norm (spectral, nuclear, or an induced norm over two dims) is not a vector norm",
    "complex input": "v**2 of a complex number is not |v|**2, so the loop is not a norm of the values as written",
    "integer input": "integer squares wrap around and vector_norm refuses integers (call .float() on the slice "
    "first and it is rewritten)",
    "slices of different source tensors or dims": "the elements slice different tensors (or one tensor along "
    "different dims): they are not one batch",
    "the norms are not all the same": "the elements compute different norms (ord, dims or spelling): they are "
    "not one batch",
    "the source is mutated between the slices": "the tensor (or a view of it) is written in place between the "
    "first slice and the last norm: a batched norm would read other values",
    "an intermediate is used elsewhere": "a per-slice square, sum or other intermediate is also used outside "
    "the norm: the per-slice work would stay alive",
    "a per-slice norm is used elsewhere": "one of the per-slice results is also used outside the combiner: "
    "it would still be computed on its own",
    "not every element is a norm": "the combiner mixes norms with other values: they are not one batch",
    "a norm input is not a slice of a tensor": "a norm's input is not x[i] (or an equivalent slice) of one tensor",
    "unknown source tensor": "the sliced tensor has no example value to check shapes and dtypes against",
    "non-float reduction dtype": "the sum asks for a non-float dtype=, which vector_norm does not accept",
    "the norm reduces no dim besides the sliced one": "each norm is of a single element: there is nothing to batch",
}


def reason_in_words(reason: str) -> str:
    """The longer explanation of a skip reason."""
    if reason in REASONS:
        return REASONS[reason]
    if reason.startswith("cannot batch: "):
        return "the batched form could not be built with the same shape and dtype: " + reason[len("cannot batch: ") :]
    if reason.endswith(" input"):
        return f"vector_norm takes real floating inputs only ({reason})"
    return reason


@dataclasses.dataclass
class Rewrite:
    """One group of per-slice norms collapsed into one batched norm."""

    pattern: str  # "stack", "cat" or "sum" of per-slice norms
    source: str  # the sliced tensor, as Dynamo names it (L['x'], ...)
    dim: int  # the sliced dim of the source
    slices: int
    coverage: str  # "all", "[0:8:2]", "index_select(...)"
    ord: float
    dims: tuple[int, ...]  # dims of the source the norm reduces
    spelling: str  # the per-slice expression, with v for the slice
    nodes_removed: int  # graph nodes before minus after, for this group
    location: str = ""  # file:line of the user's code
    code: str = ""  # that line
    exact: bool = False
    # The code a person could write instead (``normfuse.suggest``), in the user's names; lines
    # before the last are statements, the last line is the value of the combiner.
    suggestion: str = ""
    suggestion_kind: str = ""  # "batched norm", "batched program", "norm part only"
    names: dict[str, str] = dataclasses.field(default_factory=dict)  # name in suggestion -> graph node
    note: str = ""  # what the suggestion's names mean, where they are not the user's
    check: str = "not checked"  # "passed" / "failed" / "not checked: why" (set by normfuse.explain)
    max_abs_diff: float | None = None  # suggestion against the unmodified graph's value
    node: str = ""  # the graph node whose value the group replaced (the combiner)
    element_nodes: tuple[str, ...] = ()  # the graph nodes of its first element, slice included
    anchor: str = ""  # the node the batched computation was inserted before
    graph_before: str = ""  # those nodes as Dynamo's code, with the combiner (set by explain)
    graph_after: str = ""  # the inserted nodes as code (set by explain)

    @property
    def checked(self) -> bool:
        return self.check == "passed"

    def check_text(self) -> str:
        if self.max_abs_diff is None:
            return self.check
        return f"{self.check} (max abs diff {self.max_abs_diff:.2g})"


@dataclasses.dataclass
class Skip:
    """A combiner of norm-like values that was left alone, and why."""

    pattern: str
    reason: str
    elements: int
    location: str = ""
    code: str = ""

    @property
    def why(self) -> str:
        return reason_in_words(self.reason)


def _pattern(r: Rewrite) -> str:
    if r.pattern in ("stack", "cat", "sum"):
        return f"{r.pattern} of {r.slices} slices of {r.source} (dim {r.dim})"
    return f"{r.pattern}: {r.source}" + (f" ({r.slices} tensors)" if r.slices > 1 else "")


def _one_line(code: str) -> str:
    return "; ".join(code.splitlines())


def _indent(label: str, text: str) -> list[str]:
    lines = text.splitlines() or [""]
    pad = " " * len(label)
    return [f"    {label}{lines[0]}"] + [f"    {pad}{line}" for line in lines[1:]]


@dataclasses.dataclass
class FuseReport:
    rewrites: list[Rewrite] = dataclasses.field(default_factory=list)
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    exact: bool = False
    error: str | None = None  # set when the pass failed and left the graph unmodified
    detailed: bool = False  # print each site's code, graph and check after the table (explain)

    @property
    def changed(self) -> bool:
        return bool(self.rewrites)

    @classmethod
    def merge(cls, reports: list["FuseReport"]) -> "FuseReport":
        out = cls(exact=any(r.exact for r in reports), detailed=any(r.detailed for r in reports))
        for r in reports:
            out.rewrites += r.rewrites
            out.skipped += r.skipped
            out.nodes_before += r.nodes_before
            out.nodes_after += r.nodes_after
            out.error = out.error or r.error
        return out

    def table(self, tablefmt: str = "simple") -> str:
        """One row a site; ord, dims and coverage are in ``details()`` (and in the code to write)."""
        rows = [
            [
                _where(r.location),
                _pattern(r),
                r.spelling,
                r.nodes_removed,
                "rewritten" + (" (exact)" if r.exact else ""),
                _one_line(r.suggestion) + (f" [{r.suggestion_kind}]" if r.suggestion_kind == "norm part only" else ""),
                r.check if r.suggestion else "",
            ]
            for r in self.rewrites
        ]
        rows += [
            [_where(s.location), f"{s.pattern} of {s.elements}", "", 0, f"left alone: {s.reason}", "", ""]
            for s in self.skipped
        ]
        headers = ["where", "pattern", "per-slice norm", "nodes removed", "result", "write instead", "check"]
        return tabulate(rows, headers=headers, tablefmt=tablefmt)

    def details(self) -> str:
        """Each site in turn: the user's line, the graph before and after, the suggestion and its check."""
        out: list[str] = []
        for k, r in enumerate(self.rewrites, 1):
            out.append(f"[{k}] {_where(r.location)}  rewritten{' (exact)' if r.exact else ''}: {_pattern(r)}")
            out += _indent("code:    ", r.code)
            out += _indent("loop:    ", f"{r.slices} x {r.spelling}, ord {_ord_text(r.ord)} over dims {r.dims}, coverage {r.coverage}")
            if r.graph_before:
                out += _indent("before:  ", r.graph_before)
            if r.graph_after:
                out += _indent("after:   ", r.graph_after)
            if r.suggestion:
                out += _indent("instead: ", r.suggestion)
                out += _indent("         ", f"({r.suggestion_kind}; {r.note})" if r.note else f"({r.suggestion_kind})")
                out += _indent("check:   ", r.check_text())
            else:
                out += _indent("instead: ", "(no suggestion for this kind of rewrite)")
        for k, s in enumerate(self.skipped, len(self.rewrites) + 1):
            out.append(f"[{k}] {_where(s.location)}  left alone: {s.pattern} of {s.elements}")
            out += _indent("code:    ", s.code)
            out += _indent("why:     ", f"{s.reason}: {s.why}" if s.why != s.reason else s.reason)
            out += _indent("graph:   ", "unchanged")
        return "\n".join(out)

    def __str__(self) -> str:
        head = (
            f"normfuse: {len(self.rewrites)} rewrite(s), {len(self.skipped)} left alone; "
            f"graph nodes {self.nodes_before} -> {self.nodes_after}"
        )
        if self.error:
            head += f"\npass failed, graph left unmodified: {self.error}"
        if not self.rewrites and not self.skipped:
            return head
        text = head + "\n" + self.table()
        if self.detailed:
            text += "\n\n" + self.details()
        return text
