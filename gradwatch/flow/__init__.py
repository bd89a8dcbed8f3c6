"""Shortcut-path gradient flow: how much of dL/dx reaches a residual block's input through the skip.

For a residual merge ``y = F(x) + S(x)`` the ``AddBackward0`` node hands the same dL/dy to both operands,
so the split cannot be read there. It is read at the *consumers* of ``x``: every autograd node ``N`` with
``N.next_functions[i][0] is x.grad_fn`` receives, as ``grad_inputs[i]`` of a node hook, exactly the
contribution of the path through ``N`` to dL/dx, and the contributions sum to dL/dx. The consumers under
the skip operand give ``skip_grad``, the others ``branch_grad``. Per block and logging step:

=============== ==================================================================
``grad_out``     ‖dL/dy‖ at the merge output
``grad_in``      ‖dL/dx‖ at the fork (the tensor both paths start from)
``skip_grad``    ‖contribution to dL/dx through the skip‖
``branch_grad``  ‖contribution through the branch‖
``skip_share``   skip_grad² / (skip_grad² + branch_grad²)
``transmission`` grad_in / grad_out
=============== ==================================================================

:class:`FlowProbe` finds the merges (:mod:`gradwatch.flow.discovery`) on the first logging step, then on each
logging step arms autograd-node hooks from a forward hook on each block and removes them when the
measurement is collected. Steps that do not log run one forward hook per block (an integer check); until
the first logging step every module carries a discovery hook pair (same check). No full
backward hooks (they break in-place models), no reference to activations after the step. The
:class:`~gradwatch.Monitor` owns a probe (``blocks="auto"``) and records its values with the parameter
metrics, in one device-to-host transfer. See ``docs/flow.md``.

One concern per module; each imports only those above it in this list:

- :mod:`~gradwatch.flow._residual`: the residual test: which adds are a path around a sub-network;
- :mod:`~gradwatch.flow.discovery`: finds merges in a module's autograd graph (reads graphs, nothing else);
- :mod:`~gradwatch.flow._hooks`: the autograd node hooks that fill one merge's norms during backward;
- :mod:`~gradwatch.flow.registry`: the blocks found so far, their names and depth order, the flow status;
- :mod:`~gradwatch.flow.session`: one logging step's armed hooks and its :class:`FlowBatch` of norms;
- :mod:`~gradwatch.flow.modules`: the forward hooks on the model's modules, discovery and arming in them;
- :mod:`~gradwatch.flow.probe`: :class:`FlowProbe` (public surface, sessions, hook entry points);
- :mod:`~gradwatch.flow.tables`: the flow metrics and per-block tables (the only pandas user);
- :mod:`~gradwatch.flow.inspection`: the ``gradwatch inspect`` model loader.
"""

from __future__ import annotations

from ..names import FLOW_METRICS
from .inspection import inspect, load_factory
from .probe import FlowProbe, check_blocks
from .registry import Block, Blocks, FlowStatus
from .tables import flow_metrics, share_table, summary
from .session import FlowBatch

__all__ = [
    "FLOW_METRICS", "Block", "Blocks", "FlowStatus", "FlowBatch", "FlowProbe", "check_blocks", "flow_metrics",
    "summary", "share_table", "inspect", "load_factory",
]
