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


@dataclasses.dataclass
class Skip:
    """A combiner of norm-like values that was left alone, and why."""

    pattern: str
    reason: str
    elements: int
    location: str = ""
    code: str = ""


@dataclasses.dataclass
class FuseReport:
    rewrites: list[Rewrite] = dataclasses.field(default_factory=list)
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    exact: bool = False
    error: str | None = None  # set when the pass failed and left the graph unmodified

    @property
    def changed(self) -> bool:
        return bool(self.rewrites)

    @classmethod
    def merge(cls, reports: list["FuseReport"]) -> "FuseReport":
        out = cls(exact=any(r.exact for r in reports))
        for r in reports:
            out.rewrites += r.rewrites
            out.skipped += r.skipped
            out.nodes_before += r.nodes_before
            out.nodes_after += r.nodes_after
            out.error = out.error or r.error
        return out

    def table(self, tablefmt: str = "simple") -> str:
        rows = [
            [
                _where(r.location),
                f"{r.pattern} of {r.slices} slices of {r.source} (dim {r.dim})",
                r.spelling,
                _ord_text(r.ord),
                str(r.dims),
                r.coverage,
                r.nodes_removed,
                "rewritten" + (" (exact)" if r.exact else ""),
            ]
            for r in self.rewrites
        ]
        rows += [
            [_where(s.location), f"{s.pattern} of {s.elements}", "", "", "", "", 0, f"left alone: {s.reason}"]
            for s in self.skipped
        ]
        headers = ["where", "pattern", "per-slice norm", "ord", "dims", "coverage", "nodes removed", "result"]
        return tabulate(rows, headers=headers, tablefmt=tablefmt)

    def __str__(self) -> str:
        head = (
            f"normfuse: {len(self.rewrites)} rewrite(s), {len(self.skipped)} left alone; "
            f"graph nodes {self.nodes_before} -> {self.nodes_after}"
        )
        if self.error:
            head += f"\npass failed, graph left unmodified: {self.error}"
        if not self.rewrites and not self.skipped:
            return head
        return head + "\n" + self.table()
