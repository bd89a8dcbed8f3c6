"""Finding residual merges in a module's autograd graph.

A *residual merge* is an ``AddBackward0`` node ``y = a + b`` whose two operands both trace back, inside one
module's forward, to a common tensor ``x`` (the *fork*), where the path through one operand (the *branch*)
holds learnable parameters other than scalars (a learnable activation's coefficients, as in xIELU, do not make a
block). The operand with the shorter path to the fork is the *skip*. Concatenation
(DenseNet) and multiplicative gates (squeeze-excitation) are not additions and are not merges.

This module only reads graphs: it never registers a hook and keeps no node after it returns. What it
finds is stored as a :class:`MergePattern`, a description in edge indices (``next_functions`` positions)
from the module's output to the merge and from the merge to every consumer of the fork. On a later
forward the same pattern is *resolved* on the new graph with a few attribute reads (:func:`resolve`):
discovery is paid once, not per step.

Definitions used throughout (see ``docs/flow.md``):

- the **fork** is the lowest common ancestor of the two operands (the one created last in the forward);
  it is the block input ``x`` for identity, zero-pad and post-activation projection shortcuts, and the
  pre-activated input for pre-activation blocks whose projection reads ``relu(bn(x))``;
- a **consumer** is an edge ``(node, i)`` with ``node.next_functions[i][0] is fork`` on a path from the
  merge to the fork; in backward it carries exactly that path's contribution to dL/dx;
- consumers only under the skip operand are the skip; all others the branch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ._residual import (
    IDENTITY_OPS, MERGE_OPS, PART_OPS, SCALE_OPS, _base, _broadcast, _carry_path, _not_a_skip,
)

__all__ = [
    "MERGE_OPS",
    "MergePattern",
    "Resolved",
    "NO_GRAD",
    "Graph",
    "boundary_node",
    "find_merges",
    "find_dead_merges",
    "resolve",
    "resolve_lost",
]

COMPILED = "CompiledFunctionBackward"
#: Reentrant activation checkpointing: one node stands for the whole checkpointed call, whose inner graph
#: exists only during backward (the recompute), where no forward hook of ours can see it.
CHECKPOINTED = "CheckpointFunctionBackward"
_ACCUMULATE = "AccumulateGrad"
_WALK_LIMIT = 200_000


def _seq(node: Any) -> int:
    """Creation order of a node (leaves: -1, they precede everything)."""
    if type(node).__name__ == _ACCUMULATE:
        return -1
    try:
        return int(node._sequence_nr())
    except Exception:  # pragma: no cover - custom nodes without a sequence number
        return -1


def boundary_node(t: Any) -> Any:
    """The autograd node that produced tensor ``t`` (its AccumulateGrad node for a leaf); None if no grad."""
    if not getattr(t, "requires_grad", False):
        return None
    if t.grad_fn is not None:
        return t.grad_fn
    # A leaf: its AccumulateGrad node, reached through a throwaway view. The caller holds the node, which
    # keeps the tensor's weakly cached accumulator the same object the module's ops will use.
    return t.expand_as(t).grad_fn.next_functions[0][0]


@dataclass(frozen=True)
class MergePattern:
    """Where one residual merge sits relative to its module's output, in ``next_functions`` indices."""

    out_index: int  # which tensor of the module's flattened output leads to the merge
    to_merge: tuple[int, ...]  # edges from that tensor's grad_fn to the merge node
    merge_type: str  # e.g. "AddBackward0"
    skip_edge: int  # operand index of the skip at the merge node
    consumers: tuple[tuple[tuple[int, ...], int, bool], ...]  # (edges merge->consumer, edge to fork, is_skip)
    kind: str  # identity | projection | scaled | other
    skip_ops: str  # the skip's ops from fork to merge, e.g. "Slice>Slice>ConstantPadNd"
    dead: bool = False  # found with a skip that carries no gradient (its operand has no grad_fn)
    #: n-way merges (``x + attn(ln x) + mlp(ln x)``): edges from the merge (the root of the sum) to the add
    #: that takes the skip operand; ``()`` when the merge itself takes it (every two-way merge).
    skip_at: tuple[int, ...] = ()
    branches: int = 1  # operands of the sum other than the skip (n - 1 for an n-way merge)


@dataclass
class Resolved:
    """A :class:`MergePattern` located on one forward's graph (held only until hooks are registered)."""

    merge: Any
    fork: Any
    fork_nr: int
    consumers: list[tuple[Any, int, bool]]  # (node, edge, is_skip)
    dead: bool


#: :func:`resolve` result when the block's input needs no gradient (nothing to measure, not a mismatch).
NO_GRAD = object()


class Graph:
    """The autograd graph of one module call: everything reachable from its outputs, stopping at its inputs.

    Inputs (``boundary``), leaves (AccumulateGrad) and compiled regions are visited but not expanded. Keeps
    node references only as long as the object lives (a forward hook's duration).
    """

    def __init__(self, roots: list[Any], boundary: Iterable[Any], limit: int = _WALK_LIMIT) -> None:
        self.boundary = {id(n) for n in boundary if n is not None}
        self.nodes: dict[int, Any] = {}
        self.children: dict[int, list[tuple[int, int, int]]] = {}  # id -> [(edge, child id, output nr)]
        self.parent: dict[int, tuple[int, int] | None] = {}  # id -> (parent id, edge); roots: None
        self.root_index: dict[int, int] = {}
        self.compiled = False
        self.checkpointed = False  # holds a reentrant checkpoint: merges inside it cannot be seen
        self.truncated = False
        queue: deque[Any] = deque()
        for i, root in enumerate(roots):
            if root is not None and id(root) not in self.nodes:
                self.nodes[id(root)] = root
                self.parent[id(root)] = None
                self.root_index[id(root)] = i
                queue.append(root)
        while queue:
            node = queue.popleft()
            nid = id(node)
            name = type(node).__name__
            if nid in self.boundary or name == _ACCUMULATE:
                continue
            if name == COMPILED:
                self.compiled = True
                continue
            if name == CHECKPOINTED:
                self.checkpointed = True  # its inputs are walked on: what lies before it is visible
            if len(self.nodes) > limit:
                self.truncated = True
                break
            kids = []
            for edge, (child, nr) in enumerate(node.next_functions):
                if child is None:
                    continue
                cid = id(child)
                kids.append((edge, cid, nr))
                if cid not in self.nodes:
                    self.nodes[cid] = child
                    self.parent[cid] = (nid, edge)
                    queue.append(child)
            self.children[nid] = kids

    def is_leaf_param(self, nid: int) -> bool:
        """A leaf that is not one of the module's inputs: a parameter (or a captured trainable tensor)."""
        return nid not in self.boundary and type(self.nodes[nid]).__name__ == _ACCUMULATE

    def is_leaf_tensor(self, nid: int) -> bool:
        """A leaf parameter of more than one element: not a learned scalar (a flattened FSDP1 parameter, whose
        shape says nothing of the layer's, counts)."""
        if not self.is_leaf_param(nid):
            return False
        variable = getattr(self.nodes[nid], "variable", None)
        return variable is None or variable.numel() > 1

    def reach(self, start: int) -> dict[int, int]:
        """Nodes reachable from ``start`` (itself included) with their distance in edges."""
        dist = {start: 0}
        queue = deque([start])
        while queue:
            nid = queue.popleft()
            for _, cid, _ in self.children.get(nid, ()):
                if cid not in dist:
                    dist[cid] = dist[nid] + 1
                    queue.append(cid)
        return dist

    def path_from_root(self, nid: int) -> tuple[int, tuple[int, ...]]:
        """(output index, edges) leading from a root to ``nid`` along the walk's shortest path."""
        edges = []
        while (link := self.parent[nid]) is not None:
            pid, edge = link
            edges.append(edge)
            nid = pid
        return self.root_index[nid], tuple(reversed(edges))

    def paths_within(self, start: int, allowed: set[int]) -> dict[int, tuple[int, ...]]:
        """Shortest edge paths from ``start`` to every node of ``allowed`` reachable inside ``allowed``."""
        paths: dict[int, tuple[int, ...]] = {start: ()}
        queue = deque([start])
        while queue:
            nid = queue.popleft()
            for edge, cid, _ in self.children.get(nid, ()):
                if cid in allowed and cid not in paths:
                    paths[cid] = paths[nid] + (edge,)
                    queue.append(cid)
        return paths


def _classify(g: Graph, skip_side: set[int], fork: int, has_param: dict[int, bool]) -> str:
    """Kind of a skip from the nodes on its fork-to-merge paths (a gate's own computation is off-path)."""
    inside = skip_side | {fork}
    side = [n for n in skip_side if fork in g.paths_within(n, inside)]
    bases = [_base(g.nodes[n]) for n in side]
    if any(has_param.get(n, False) and b not in SCALE_OPS for n, b in zip(side, bases)):
        return "projection"
    if any(b in SCALE_OPS for b in bases):
        return "scaled"
    if all(b in IDENTITY_OPS for b in bases):
        return "identity"
    return "other"


def _skip_ops(g: Graph, merge: int, skip_edge: int, fork: int, side: set[int]) -> str:
    """Ops on the shortest skip path, in forward order (fork -> merge)."""
    first = next((cid for edge, cid, _ in g.children[merge] if edge == skip_edge), None)
    if first is None or first == fork:
        return ""
    paths = g.paths_within(first, side | {fork})
    if fork not in paths:
        return ""
    names, nid = [], first
    names.append(_base(g.nodes[nid]))
    for edge in paths[fork][:-1]:
        nid = next(cid for e, cid, _ in g.children[nid] if e == edge)
        names.append(_base(g.nodes[nid]))
    return ">".join(reversed(names))


_MAX_FORK_CANDIDATES = 16

_SCAN = object()  # :func:`_try_fork`: a sum of parts of one tensor; no earlier fork makes it a residual


def _try_fork(g: Graph, root: int, terms, adds: set[int], reaches, fork: int, has_param, has_tensor,
              relaxed: bool) -> MergePattern | object | None:
    """The sum rooted at ``root`` split at ``fork``, or None if that split is not a residual.

    ``terms``: the sum's operands as ``(add node, edge, operand node)`` (two for ``a + b``; n for an n-way
    sum ``x + attn(ln x) + mlp(ln x)`` whose inner adds feed only the next add); ``adds``: the sum's add nodes;
    ``reaches``: each operand's :meth:`Graph.reach`.
    """
    rf = g.reach(fork)
    sides = [{n for n in r if n not in rf} for r in reaches]
    params = [any(has_param.get(n, False) for n in side) for side in sides]
    tensors = [any(has_tensor.get(n, False) for n in side) for side in sides]
    dists = [r[fork] for r in reaches]
    shortest = min(dists)
    tied = [i for i, d in enumerate(dists) if d == shortest]
    plain = [i for i in tied if not params[i]]
    # ties: the operand without parameters; else the last one (`out + identity`)
    k = (plain or tied)[-1]
    holder, skip_edge, _ = terms[k]
    skip_side = sides[k]
    branch_side: set[int] = set().union(*(sides[i] for i in range(len(terms)) if i != k))
    if params[k] and any(dists[i] == shortest for i in range(len(terms)) if i != k):
        return None  # two parallel sub-networks of equal depth (the average of two heads), not a shortcut
    if not relaxed and not all(tensors[i] for i in range(len(terms)) if i != k):
        # no parameter but scalars on a branch: an op's internals (GELU, rotary embedding; a learnable
        # activation such as xIELU, whose learned scalars weigh `x * x` beside `x`), not a block
        return None
    between = set().union(*sides) | adds
    consumers = []
    nrs = set()
    for n in between:
        for edge, cid, nr in g.children.get(n, ()):
            if cid == fork:
                is_skip = (n == holder and edge == skip_edge) or (n in skip_side and n not in branch_side)
                consumers.append((n, edge, is_skip))
                nrs.add(nr)
    if len(nrs) != 1 or not any(c[2] for c in consumers) or all(c[2] for c in consumers):
        return None  # different outputs of one node (chunk/split coupling), or no path of its own for the skip
    if all(_base(g.nodes[n]) in PART_OPS for n, _, _ in consumers):
        return _SCAN  # every operand reads a part of the fork: a scan recurrence, not a residual
    pure_skip = skip_side - branch_side
    carry = _carry_path(g, holder, skip_edge, fork, pure_skip)
    if carry is None or _not_a_skip(g, carry):
        return None
    paths = g.paths_within(root, between)
    if any(n not in paths for n, _, _ in consumers) or holder not in paths:
        return None
    out_index, to_merge = g.path_from_root(root)
    return MergePattern(
        out_index=out_index,
        to_merge=to_merge,
        merge_type=type(g.nodes[root]).__name__,
        skip_edge=skip_edge,
        consumers=tuple(sorted((paths[n], edge, is_skip) for n, edge, is_skip in consumers)),
        kind=_classify(g, pure_skip, fork, has_param),
        skip_ops=_skip_ops(g, holder, skip_edge, fork, pure_skip),
        skip_at=paths[holder],
        branches=len(terms) - 1,
    )


def _is_live_add(g: Graph, nid: int) -> bool:
    node = g.nodes[nid]
    kids = g.children.get(nid)
    return (type(node).__name__ in MERGE_OPS and kids is not None and len(kids) == 2
            and len(node.next_functions) == 2)


def _sum_terms(g: Graph, root: int, indegree: dict[int, int], skip: set[int]) -> tuple[list, set[int]]:
    """The operands of the sum rooted at ``root``: inner adds whose only consumer is an add of the sum are
    expanded (``(a + b) + c`` has the terms a, b, c). Returns ``(terms, add nodes)``."""
    terms, adds = [], {root}
    stack = [root]
    while stack:
        nid = stack.pop()
        for edge, cid, _ in g.children[nid]:
            if (cid not in adds and cid not in skip and indegree.get(cid, 0) == 1 and _is_live_add(g, cid)
                    and not g.is_leaf_param(cid)):
                adds.add(cid)
                stack.append(cid)
            else:
                terms.append((nid, edge, cid))
    return terms, adds


_UNRELATED = object()  # :func:`_merge_at`: the operands share no ancestor here (an enclosing module may)


def _merge_at(g: Graph, nid: int, terms, adds: set[int], has_param, has_tensor,
              relaxed: bool) -> MergePattern | object | None:
    """The residual merge of the sum at ``nid`` with these terms, trying its latest common ancestors; None when
    it is no residual, :data:`_UNRELATED` when its operands share no ancestor in this module."""
    if len({t[2] for t in terms}) != len(terms) or any(g.is_leaf_param(t[2]) for t in terms):
        return _UNRELATED
    if _broadcast(g, nid, terms):
        return None
    reaches = [g.reach(t[2]) for t in terms]
    common = [c for c in reaches[0] if all(c in r for r in reaches[1:]) and not g.is_leaf_param(c)]
    if not common:
        return _UNRELATED
    common.sort(key=lambda c: _seq(g.nodes[c]), reverse=True)
    for fork in common[:_MAX_FORK_CANDIDATES]:
        pattern = _try_fork(g, nid, terms, adds, reaches, fork, has_param, has_tensor, relaxed)
        if pattern is _SCAN:
            return None  # its operands read parts of one tensor (dA[t] * state + dBu[t]): an earlier fork is moot
        if pattern is not None:
            return pattern
    return None


def find_merges(
    g: Graph, claimed: set[int], rejected: set[int], *, relaxed: bool = False
) -> list[tuple[MergePattern, int, int]]:
    """Residual merges created in the walked module and not already claimed by an inner module.

    Returns ``(pattern, creation order, merge node id)`` in creation order. The fork is the latest common ancestor
    of the operands that gives a valid split (a consumer only the skip reaches, a branch with parameters other than
    scalars); going further back than the latest one matters for gated skips, where the gate computed from ``x`` is
    itself shared by both operands (highway: ``t * h(x) + (1 - t) * x``). A sum of n operands (``x + attn(ln x) +
    mlp(ln x)``: adds whose result only feeds the next add) is one merge with n - 1 branches when all its operands
    share the fork; otherwise its adds are looked at one by one. Adds whose operands share no ancestor inside this
    module stay unclaimed (an enclosing module may see the fork); adds with common ancestors but no valid split go
    to ``rejected`` and are not looked at again: an op's internals (``x + 0.04 * x**3`` inside GELU, rotary
    embeddings, a learnable activation's ``a * x * x + b * x``), and the adds that are not a path around a
    sub-network (see :func:`_not_a_skip` and ``docs/flow.md``: attention-score adds, scan recurrences, fusion of
    parallel sub-networks, averages of heads). ``relaxed`` (explicitly watched modules) drops the parameter
    requirement.
    """
    found = []
    has_param = {nid: any(g.is_leaf_param(c) for _, c, _ in kids) for nid, kids in g.children.items()}
    has_tensor = {nid: any(g.is_leaf_tensor(c) for _, c, _ in kids) for nid, kids in g.children.items()}
    indegree: dict[int, int] = {}
    for kids in g.children.values():
        for _, cid, _ in kids:
            indegree[cid] = indegree.get(cid, 0) + 1
    for nid, node in list(g.nodes.items()):
        if nid in claimed or nid in rejected or type(node).__name__ not in MERGE_OPS:
            continue
        if not _is_live_add(g, nid):
            continue  # an operand without gradient: not a live merge (see find_dead_merges)
        pattern: MergePattern | object | None = None
        terms, adds = _sum_terms(g, nid, indegree, claimed | rejected)
        if len(terms) > 2:
            pattern = _merge_at(g, nid, terms, adds, has_param, has_tensor, relaxed)
        if not isinstance(pattern, MergePattern):
            kids = g.children[nid]
            adds = {nid}
            pattern = _merge_at(g, nid, [(nid, e, c) for e, c, _ in kids], adds, has_param, has_tensor, relaxed)
        if pattern is _UNRELATED:
            continue
        if not isinstance(pattern, MergePattern):
            rejected.add(nid)
            continue
        claimed.update(adds)
        found.append((pattern, _seq(node), nid))
    found.sort(key=lambda f: f[1])
    return found


def find_dead_merges(g: Graph, claimed: set[int], live: list[int]) -> list[tuple[MergePattern, int, int]]:
    """For explicitly watched modules: adds with one operand that carries no gradient (``s.detach()``).

    The live operand must reach one of the module's inputs or one of its live merges (``live``, node ids);
    the latest of those it reaches is the fork, and every consumer of it is the branch.
    """
    found = []
    stream = set(g.boundary) | set(live)
    for nid, node in list(g.nodes.items()):
        if nid in claimed or type(node).__name__ not in MERGE_OPS:
            continue
        nf = node.next_functions
        if len(nf) != 2 or (nf[0][0] is None) == (nf[1][0] is None):
            continue
        skip_edge = 0 if nf[0][0] is None else 1
        branch = next(cid for edge, cid, _ in g.children.get(nid, ()) if edge != skip_edge)
        rb = g.reach(branch)
        forks = [c for c in rb if c in stream and c in g.nodes]
        if not forks:
            continue
        fork = max(forks, key=lambda c: _seq(g.nodes[c]))
        rf = g.reach(fork)
        between = {n for n in rb if n not in rf} | {nid}
        consumers = [(n, edge) for n in between for edge, cid, _ in g.children.get(n, ()) if cid == fork]
        if not consumers:
            continue
        paths = g.paths_within(nid, between)
        out_index, to_merge = g.path_from_root(nid)
        pattern = MergePattern(
            out_index=out_index,
            to_merge=to_merge,
            merge_type=type(node).__name__,
            skip_edge=skip_edge,
            consumers=tuple(sorted((paths[n], edge, False) for n, edge in consumers if n in paths)),
            kind="other",
            skip_ops="",
            dead=True,
        )
        claimed.add(nid)
        found.append((pattern, _seq(node), nid))
    found.sort(key=lambda f: f[1])
    return found


def _follow(node: Any, path: tuple[int, ...]) -> Any:
    for edge in path:
        nf = node.next_functions
        if edge >= len(nf):
            return None
        node = nf[edge][0]
        if node is None:
            return None
    return node


def resolve(p: MergePattern, outs: list[Any]) -> Resolved | object | None:
    """Locate ``p`` on a new forward's graph. ``outs``: grad_fn of each flattened output tensor.

    Returns a :class:`Resolved`, :data:`NO_GRAD` when the block's output or input carries no gradient
    (nothing to measure), or None when the graph no longer matches (the structure changed: rediscover).
    A skip operand without gradient (``s.detach()``) resolves with ``dead=True``.
    """
    if p.out_index >= len(outs):
        return None
    root = outs[p.out_index]
    if root is None:
        return NO_GRAD
    merge = _follow(root, p.to_merge)
    if merge is None or type(merge).__name__ != p.merge_type:
        return None
    holder = _follow(merge, p.skip_at) if p.skip_at else merge
    if holder is None or type(holder).__name__ not in MERGE_OPS:
        return None
    mf = holder.next_functions
    if p.skip_edge >= len(mf):
        return None
    dead = mf[p.skip_edge][0] is None
    fork: Any = None
    fork_nr = 0  # read only once fork is set
    consumers = []
    for path, edge, is_skip in p.consumers:
        if dead and is_skip:
            continue
        node = _follow(merge, path)
        if node is None:
            return None
        nf = node.next_functions
        if edge >= len(nf):
            return None
        target, nr = nf[edge]
        if target is None:
            return NO_GRAD  # the block input needs no gradient (e.g. a block fed straight from data)
        if fork is None:
            fork, fork_nr = target, nr
        elif target is not fork or nr != fork_nr:
            return None
        consumers.append((node, edge, is_skip))
    if fork is None:
        return None
    if p.dead and not dead:
        return None  # the skip came back: rediscover it as a live merge
    return Resolved(merge, fork, fork_nr, consumers, dead)


def resolve_lost(p: MergePattern, outs: list[Any], boundary: Sequence[Any]) -> Resolved | None:
    """A block whose merge is gone, located on this forward's graph as a merge whose skip carries nothing.

    The module's output (``p.out_index``) stands for the merge and the first of its inputs that its graph
    consumes for the fork; every consumer of that input inside the module is the branch. None when the output
    carries no gradient, is an input itself (the module passed it through) or consumes no input.
    """
    root = outs[p.out_index] if p.out_index < len(outs) else next((o for o in outs if o is not None), None)
    if root is None:
        return None
    inputs = [b for b in boundary if b is not None]
    if any(root is b for b in inputs):
        return None
    g = Graph([root], inputs)
    for b in inputs:
        consumers = [(g.nodes[n], edge, nr) for n, kids in g.children.items() for edge, cid, nr in kids if cid == id(b)]
        if consumers and len({nr for _, _, nr in consumers}) == 1:
            return Resolved(root, b, consumers[0][2], [(n, e, False) for n, e, _ in consumers], True)
    return None
