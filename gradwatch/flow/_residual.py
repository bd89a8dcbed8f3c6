"""The residual test: which adds are a path that carries a tensor *around* a sub-network (a skip), read on the
autograd graph of one module call. :mod:`gradwatch.flow.discovery` finds the candidate splits (an add, a fork,
a skip operand and the branches); the checks here reject those that are not residuals. Each is a property of
the graph, never of a model's or module's name (``docs/flow.md``, "Adds that are not residuals"):

- no operand is broadcast by the add (:func:`_broadcast`: a bias, a mask, a position table);
- the skip's shortest path from the fork carries the fork's value (:func:`_not_a_skip`): no nonlinearity, no
  other merge, no product of two activations, no pick of one entry of a dimension;
- not every consumer of the fork reads a part of it (:data:`PART_OPS`: a scan recurrence);
- a skip with parameters is shallower than the branch (checked where the split is made).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typing only: discovery imports this module
    from .discovery import Graph

#: Autograd node types that can merge a residual (``a + b``, ``a += b``, ``torch.add(a, b, alpha=c)``).
MERGE_OPS = frozenset({"AddBackward0"})
#: Node types that move or pad values without computing: a skip made only of these is an identity skip.
IDENTITY_OPS = frozenset(
    {
        "Slice", "ConstantPadNd", "View", "UnsafeView", "Reshape", "ReshapeAlias", "Expand", "Clone",
        "ToCopy", "Permute", "Transpose", "T", "Unsqueeze", "Squeeze", "Select", "AsStrided", "Index",
        "Alias", "Narrow", "Contiguous", "Identity",
    }
)
#: Elementwise scalings: a skip with one of these (and no projection) is a scaled or gated skip.
SCALE_OPS = frozenset({"Mul", "Div"})


def _base(node: Any) -> str:
    """``"ConvolutionBackward0"`` -> ``"Convolution"``."""
    name = type(node).__name__.rstrip("0123456789")
    return name[: -len("Backward")] if name.endswith("Backward") else name


#: Ops that apply a nonlinearity: a path that carries ``x`` around a branch never passes one (HRNet's fusion of
#: parallel resolutions does: its "skip" is another sub-network).
NONLINEAR_OPS = frozenset(
    {
        "Relu", "Relu6", "Gelu", "Silu", "Sigmoid", "Tanh", "Softmax", "LogSoftmax", "Elu", "LeakyRelu",
        "Hardswish", "Hardsigmoid", "Hardtanh", "Mish", "Softplus", "Threshold", "Exp", "Log", "Prelu", "Celu",
        "Selu", "Glu", "Rrelu", "Erf", "Sin", "Cos",
    }
)
#: Matrix products: on a skip path, one of them with no parameter operand multiplies the fork by another
#: activation (``q @ k^T``: attention scores), which is an interaction, not a path around a branch.
PRODUCT_OPS = frozenset({"Mm", "Bmm", "Baddbmm", "Addmm", "Addbmm", "Addmv", "Mv", "Dot", "Matmul", "Vdot"})
#: Ops that read a part of a tensor: a sum whose every operand reads only parts of the fork (a scan's
#: ``state = dA[t] * state + dBu[t]``) combines elements of one tensor, not a path around a sub-network.
PART_OPS = frozenset({"Select", "Slice", "Index", "Narrow", "Unbind", "Split", "SplitWithSizes", "Gather",
                      "IndexSelect", "Diagonal", "AsStrided"})


_PICK_OPS = frozenset({"Select", "Unbind"})


def _has_param_operand(g: Graph, nid: int, depth: int = 3) -> bool:
    """Whether a parameter reaches node ``nid`` directly or through value-moving ops only (a weight behind
    ``T``/``View``/``ToCopy``)."""
    for _, cid, _ in g.children.get(nid, ()):
        if g.is_leaf_param(cid):
            return True
        if depth > 1 and _base(g.nodes[cid]) in IDENTITY_OPS and _has_param_operand(g, cid, depth - 1):
            return True
    return False


def _carry_path(g: Graph, holder: int, skip_edge: int, fork: int, side: set[int]) -> list[int] | None:
    """Node ids of the shortest skip path, merge side first (fork and holder excluded); None if none."""
    first = next((cid for edge, cid, _ in g.children[holder] if edge == skip_edge), None)
    if first is None:
        return None
    if first == fork:
        return []
    paths = g.paths_within(first, side | {fork})
    if fork not in paths:
        return None
    nodes, nid = [first], first
    for edge in paths[fork][:-1]:
        nid = next(cid for e, cid, _ in g.children[nid] if e == edge)
        nodes.append(nid)
    return nodes


def _not_a_skip(g: Graph, carry: list[int]) -> bool:
    """The residual test on the skip's shortest path from the fork: a skip carries the fork's value around the
    branch through value-moving ops, scalings or gates, a linear projection, a normalisation or pooling; it
    passes no nonlinearity, no other merge, no product with another activation, and does not pick one entry
    of a dimension (``Select``: one time step of a scan, one token)."""
    for nid in carry:
        node = g.nodes[nid]
        base = _base(node)
        if base in NONLINEAR_OPS or base in _PICK_OPS:
            return True
        if type(node).__name__ in MERGE_OPS and len(g.children.get(nid, ())) == 2:
            return True
        if base in PRODUCT_OPS and not _has_param_operand(g, nid):
            return True
    return False


def _shape(node: Any, nr: int = 0) -> tuple[int, ...] | None:
    """The shape of output ``nr`` of an autograd node (its gradient's shape); None where torch does not say."""
    try:
        return tuple(node._input_metadata[nr].shape)
    except Exception:  # a private attribute: older or custom nodes may not have it
        return None


def _broadcast(g: Graph, root: int, terms) -> bool:
    """Whether the sum broadcasts one of its operands: a bias, a mask or a position table added to every
    sample, not a skip (which carries x element for element) nor a branch (which returns x's shape)."""
    out = _shape(g.nodes[root])
    if out is None:
        return False
    for holder, edge, _ in terms:
        child, nr = g.nodes[holder].next_functions[edge]
        shape = _shape(child, nr)
        if shape is not None and shape != out:
            return True
    return False
