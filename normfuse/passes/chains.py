"""Loop-free norm chains and norms over several tensors.

Two rewrites that need no loop, both for the default mode only (exact mode keeps the user's ops,
which are already what it would emit):

* **Chains.** ``torch.sqrt(torch.sum(x ** 2, dim=d, keepdim=k))`` on a whole tensor, in any
  spelling ``spellings.match_norm`` recognises, becomes ``vector_norm(x, 2, d, k)``. So does the
  denominator of ``x / sqrt(sum(x**2, -1, keepdim=True))``; no eps is invented. A chain on a slice
  is left to the loop rewrites (and stays as written when its loop is left alone).
* **Several tensors.** A global norm over a list of differently shaped tensors, spelled
  ``sqrt(sum((p ** 2).sum() for p in ps))``, ``sum(p.norm() ** 2 for p in ps).sqrt()`` or
  ``max(p.abs().max() for p in ps)``, becomes the form ``clip_grad_norm_`` uses: one norm per
  tensor (``torch._foreach_norm`` per device and dtype, or one ``vector_norm`` each), then one
  ``vector_norm`` of their stack; or one ``vector_norm`` of the tensors concatenated; or the
  user's fused sum of powers, kept: whichever measures fastest under Inductor on the device
  (``MULTI_TENSOR_FORM``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import torch
import torch.fx as fx

from .graph_utils import NodeBuilder, bind, is_mutating, is_number, may_alias, op_name, tensor_value
from .spellings import NormSite, elementwise_power, match_norm, match_slice, root_exponent

_REAL_FLOATS = {torch.float16, torch.bfloat16, torch.float32, torch.float64}

#: How a norm over several tensors is emitted, by device type: "keep" (the user's summed powers,
#: which Inductor fuses into one kernel), "cat" (one ``vector_norm`` of the flattened tensors
#: concatenated, which Inductor fuses into one reduction), "vector_norm" (one per tensor, then a
#: norm of the stack) or "foreach" (``torch._foreach_norm`` per device and dtype, then a norm of
#: the stack: the form ``clip_grad_norm_`` uses). Measured under Inductor, global norm of 64
#: MLP-shaped gradients (``python -m bench --workloads grad-norm``,
#: ``python -m bench.multi_tensor_forms``): on CPU (torch 2.13, 1 thread) keep 0.14 ms, cat 0.17,
#: vector_norm ~1.2x keep, foreach ~1.8x (Inductor calls ``_foreach_norm`` as an extern kernel);
#: on an H200 (torch 2.11) keep 0.86 ms, foreach 1.33 ms, cat 0.52 ms.
MULTI_TENSOR_FORM = {"cpu": "keep", "cuda": "cat"}


def multi_tensor_form(tensors: list[fx.Node]) -> str:
    devices = {tensor_value(t).device.type for t in tensors}
    return MULTI_TENSOR_FORM.get(devices.pop(), "keep") if len(devices) == 1 else "keep"


@dataclasses.dataclass
class ChainGroup:
    site: NormSite
    anchor: fx.Node

    @property
    def combiner_node(self) -> fx.Node:
        return self.site.root

    def owned_nodes(self) -> set[fx.Node]:
        return set(self.site.nodes)


@dataclasses.dataclass
class MultiNormGroup:
    root: fx.Node  # the node whose value is the global norm
    tensors: list[fx.Node]
    ord: float
    nodes: set[fx.Node]  # every node of the spelling, root included
    anchor: fx.Node
    spelling: str

    def owned_nodes(self) -> set[fx.Node]:
        return set(self.nodes)


def _real_float(node: fx.Node) -> bool:
    value = tensor_value(node)
    return value is not None and value.dtype in _REAL_FLOATS


def _private(nodes: set[fx.Node], root: fx.Node) -> bool:
    return all(u in nodes for n in nodes - {root} for u in n.users)


def _unmutated(sources: list[fx.Node], first: fx.Node, last: fx.Node, order: dict, nodes: list) -> bool:
    for node in nodes[order[first] : order[last] + 1]:
        if is_mutating(node) and any(not node.args or may_alias(s, node.args[0]) for s in sources):
            return False
    return True


def find_chains(graph: fx.Graph, claimed: set[fx.Node], order: dict, nodes: list) -> list[ChainGroup]:
    found = []
    for node in nodes:
        if node in claimed:
            continue
        site = match_norm(node)
        if site is None or site.root is not node or claimed & set(site.nodes):
            continue
        if any(step[1] == "norm_call" for step in site.recipe.steps if step[0] == "reduce"):
            continue  # already a norm call
        if any(step[0] == "cast" for step in site.recipe.steps) or len(site.inputs) != 1:
            continue
        source = site.inputs[0]
        if match_slice(source) is not None or not _real_float(source):
            continue
        if not _private(set(site.nodes), site.root) or _root_over_rootless(site):
            continue
        first = min(site.nodes, key=order.__getitem__)
        if not _unmutated([source], first, site.root, order, nodes):
            continue
        found.append(ChainGroup(site, first))
        claimed |= set(site.nodes)
    return found


def _root_over_rootless(site: NormSite) -> bool:
    has_root = any(step[0] in ("sqrt", "root") for step in site.recipe.steps)
    return not has_root and any(root_exponent(u) is not None for u in site.root.users)


def emit_chain(b: NodeBuilder, group: ChainGroup, exact: bool) -> tuple[dict[fx.Node, fx.Node], str]:
    site = group.site
    recipe = site.recipe
    value = tensor_value(site.inputs[0])
    dims = site.dims if site.dims is not None else tuple(range(value.ndim))
    kwargs = {"dtype": recipe.dtype} if recipe.dtype is not None else {}
    ord_ = int(recipe.ord) if math.isfinite(recipe.ord) and recipe.ord == int(recipe.ord) else recipe.ord
    dim_arg = dims[0] if len(dims) == 1 else dims
    node = b.call(torch.linalg.vector_norm, site.inputs[0], ord_, dim_arg, site.keepdim, **kwargs)
    want = tensor_value(site.root)
    if tuple(tensor_value(node).shape) != tuple(want.shape):
        node = b.method("reshape", node, tuple(want.shape))
    return {site.root: node}, "whole tensor"


# ---- norms over several tensors -----------------------------------------------------------


def _add_leaves(node: Any, out: list, nodes: set) -> bool:
    """Flatten an add tree (``sum(gen)`` starts at 0) into its terms."""
    if is_number(node):
        return node == 0
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target is operator.add and not node.kwargs:
        nodes.add(node)
        return all(_add_leaves(a, out, nodes) for a in node.args)
    out.append(node)
    return True


def _powered_term(term: fx.Node, nodes: set) -> tuple[fx.Node, float] | None:
    """(tensor, p) for ``sum(|v|**p)`` or ``norm_p(v) ** p``, full reductions of one tensor."""
    name = op_name(term)
    if name == "sum":
        args = bind(term)
        if args is None or args["dim"] is not None or args["dtype"] is not None or not isinstance(args["input"], fx.Node):
            return None
        power = elementwise_power(args["input"])
        if power is None or power.casts:
            return None
        if not power.has_abs and not (power.p == int(power.p) and int(power.p) % 2 == 0):
            return None
        nodes.update(power.nodes)
        nodes.add(term)
        return power.base, power.p
    if name == "pow" and len(term.args) == 2 and is_number(term.args[1]) and isinstance(term.args[0], fx.Node):
        site = match_norm(term.args[0])
        if site is None or site.dims is not None or site.keepdim or len(site.inputs) != 1:
            return None
        if any(step[0] == "cast" for step in site.recipe.steps) or site.recipe.dtype is not None:
            return None
        if float(term.args[1]) != site.recipe.ord:
            return None
        nodes.update(site.nodes)
        nodes.add(term)
        return site.inputs[0], site.recipe.ord
    return None


def _match_multi_norm(root: fx.Node) -> tuple[list[fx.Node], float, set[fx.Node], str] | None:
    found = root_exponent(root)
    nodes: set[fx.Node] = {root}
    if found is not None:
        exponent, below, _ = found
        terms: list[fx.Node] = []
        if not _add_leaves(below, terms, nodes) or len(terms) < 2:
            return None
        tensors, ords = [], set()
        for term in terms:
            got = _powered_term(term, nodes)
            if got is None:
                return None
            tensors.append(got[0])
            ords.add(got[1])
        if len(ords) != 1:
            return None
        p = ords.pop()
        if p <= 0 or abs(p * exponent - 1) > 1e-9:
            return None
        return tensors, p, nodes, "root of summed powered norms"
    if op_name(root) == "maximum":
        leaves: list[fx.Node] = []

        def walk(n: fx.Node) -> bool:
            if op_name(n) == "maximum" and n.op == "call_function" and len(n.args) == 2 and not n.kwargs:
                nodes.add(n)
                return all(isinstance(a, fx.Node) and walk(a) for a in n.args)
            leaves.append(n)
            return True

        if not walk(root) or len(leaves) < 2:
            return None
        tensors = []
        for leaf in leaves:
            site = match_norm(leaf)
            if site is None or site.recipe.ord != math.inf or site.dims is not None or site.keepdim:
                return None
            if len(site.inputs) != 1 or any(s[0] == "cast" for s in site.recipe.steps):
                return None
            nodes.update(site.nodes)
            tensors.append(site.inputs[0])
        return tensors, math.inf, nodes, "max of per-tensor max norms"
    return None


def find_multi_norms(graph: fx.Graph, claimed: set[fx.Node], order: dict, nodes: list) -> list[MultiNormGroup]:
    found = []
    for node in reversed(nodes):
        if node in claimed:
            continue
        got = _match_multi_norm(node)
        if got is None:
            continue
        tensors, p, owned, spelling = got
        if owned & claimed or not _private(owned, node):
            continue
        if not all(_real_float(t) for t in tensors) or any(match_slice(t) is not None for t in tensors):
            continue
        first = min(owned, key=order.__getitem__)
        if not _unmutated(list(tensors), first, node, order, nodes):
            continue
        claimed |= owned  # also when kept: its per-tensor pieces are no chains to rewrite
        if multi_tensor_form(tensors) != "keep":
            found.append(MultiNormGroup(node, tensors, p, owned, node, spelling))
    return found


def emit_multi_norm(b: NodeBuilder, group: MultiNormGroup, exact: bool) -> tuple[dict[fx.Node, fx.Node], str]:
    ord_ = int(group.ord) if math.isfinite(group.ord) and group.ord == int(group.ord) else group.ord
    form = multi_tensor_form(group.tensors)
    dtype = tensor_value(group.root).dtype
    if form == "cat":
        # torch.cat promotes mixed dtypes as the naive sum does; flatten each tensor first
        flat = [b.method("reshape", t, (-1,)) for t in group.tensors]
        flat = [f if tensor_value(f).dtype == dtype else b.method("to", f, dtype) for f in flat]
        total = b.call(torch.linalg.vector_norm, b.call(torch.cat, flat), ord_)
        return {group.root: total}, f"{len(group.tensors)} tensors, cat"
    norms: list[fx.Node] = []
    if form == "foreach":
        by_kind: dict[tuple, list[fx.Node]] = {}
        for t in group.tensors:
            v = tensor_value(t)
            by_kind.setdefault((v.device, v.dtype), []).append(t)
        for members in by_kind.values():
            out = b.call(torch._foreach_norm, members, ord_)
            norms += [b.call(operator.getitem, out, i) for i in range(len(members))]
    else:
        norms = [b.call(torch.linalg.vector_norm, t, ord_) for t in group.tensors]
    # the naive sum promotes mixed dtypes as it adds; stack the norms in the result's dtype
    norms = [n if tensor_value(n).dtype == dtype else b.method("to", n, dtype) for n in norms]
    total = b.call(torch.linalg.vector_norm, b.call(torch.stack, norms), ord_)
    return {group.root: total}, f"{len(group.tensors)} tensors, {form}"
