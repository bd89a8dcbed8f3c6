"""Layers at one depth: *siblings*, modules that read the very same input tensor in a forward pass (an
attention's query, key and value projections on one LayerNorm's output, a gated MLP's gate and up projections,
an Inception block's parallel branches). :class:`~gradwatch.measure.order.ForwardOrder` finds them once, on
the first measured step; :func:`~gradwatch.alerts.measurements.early_ratio` then reads one value per depth.

Why: the gradient that reaches a depth is shown by the sibling that gets the most of it, not by each sibling.
Attention logits are the bilinear form q·k, so at initialisation (std-0.02 weights, near-uniform softmax) the
query's gradient is scaled by the key's small output and the key's by the query's: both read ~50 times below
the value projection beside them on the same input (2-layer OPT: 0.002 against 0.12). Counted as three early
layers, two tiny ones made the early median read as vanishing on healthy training (``docs/alerts.md``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["Siblings"]


class Siblings:
    """Groups of layer (module) names that read one input: each group is one depth. A layer in no group is a
    depth of its own. :meth:`ids` maps a record's layers to group ids, computed once per set of layer names
    (the monitor's layers rarely change), so the per-step statistic is vectorised."""

    def __init__(self, groups: Iterable[Sequence[str]] = (), modules: Iterable[str] = ()) -> None:
        self.groups: tuple[tuple[str, ...], ...] = tuple(tuple(g) for g in groups if len(g) > 1)
        self._modules = frozenset(modules)  # module names: a name that is one is never read as a parameter's
        self._of = {name: i for i, g in enumerate(self.groups) for name in g}
        self._cache: tuple[tuple[str, ...], np.ndarray] | None = None

    def __bool__(self) -> bool:
        return bool(self.groups)

    def __repr__(self) -> str:
        return f"Siblings({list(self.groups)!r})"

    def ids(self, layers: Sequence[str]) -> np.ndarray:
        """One group id per layer of ``layers``: the index of its group, or ``len(groups) + i`` (its own) for
        a layer in none. A parameter-granularity name (``"q_proj.weight"``: not one of the ``modules`` given)
        takes its module's group; a module's own name never takes its parent's (an attention's output
        projection is not its input projection's sibling because the attention module reads that input too)."""
        key = tuple(layers)
        cached = self._cache
        if cached is not None and cached[0] == key:
            return cached[1]
        base, of = len(self.groups), self._of
        out = np.empty(len(key), dtype=np.int64)
        for i, name in enumerate(key):
            g = of.get(name)
            if g is None and "." in name and name not in self._modules:
                g = of.get(name.rsplit(".", 1)[0])
            out[i] = base + i if g is None else g
        self._cache = (key, out)
        return out
