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

:class:`FlowProbe` finds the merges (:mod:`gradwatch.discovery`) on the first logging step, then on each
logging step arms autograd-node hooks from a forward hook on each block and removes them when the
measurement is collected. Steps that do not log run one forward hook per block (an integer check); until
the first logging step every module carries a discovery hook pair (same check). No full
backward hooks (they break in-place models), no reference to activations after the step. The
:class:`~gradwatch.Monitor` owns a probe (``blocks="auto"``) and records its values with the parameter
metrics, in one device-to-host transfer. See ``docs/flow.md``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .discovery import Graph, MergePattern, Resolved, boundary_node, find_dead_merges, find_merges, resolve
from .layers import ROOT_NAME, clean_name
from .metrics import safe_ratio

log = logging.getLogger("gradwatch")

__all__ = [
    "FLOW_METRICS", "Block", "Blocks", "FlowStatus", "FlowBatch", "FlowProbe", "flow_metrics", "summary",
    "share_table", "inspect", "load_factory",
]

#: Per-block metric names (a contract, like :data:`gradwatch.METRICS`).
FLOW_METRICS = ("grad_out", "grad_in", "skip_grad", "branch_grad", "skip_share", "transmission")

_OUT, _IN, _SKIP, _BRANCH = range(4)
_MAX_REDISCOVERIES = 10

try:
    from torch._dynamo.eval_frame import OptimizedModule as _OptimizedModule
except Exception:  # pragma: no cover - builds without dynamo
    _OptimizedModule = ()  # type: ignore[assignment]


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except Exception:  # pragma: no cover - older torch
        return False


def _is_scripted(m: nn.Module) -> bool:
    return isinstance(m, torch.jit.ScriptModule)


def _is_compiled(m: nn.Module) -> bool:
    return isinstance(m, _OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None


@dataclass(frozen=True)
class Block:
    """One residual merge found in the model (what :meth:`Monitor.describe` lists).

    Attributes:
        name: its name in ``history()`` and TensorBoard (``<metric>/<name>``): the module's qualified name,
            with ``[i]`` appended (``h.0[0]``, ``h.0[1]``) when one module holds several merges.
        module: qualified name of the module whose forward creates the merge.
        kind: ``identity`` (the skip only moves values: identity, slicing, zero-padding), ``projection``
            (learnable: 1x1 conv, linear, BN), ``scaled`` (a multiply/divide on the skip: gated or scaled
            skips) or ``other``.
        index: depth order, 0 nearest the input.
        skip: the skip path's ops from fork to merge (``""`` for an identity skip), e.g.
            ``"Slice>Slice>ConstantPadNd"`` or ``"Convolution>NativeBatchNorm"``.
        found: ``"auto"`` (graph discovery), ``"watch"`` (explicitly watched module) or ``"sibling"``
            (matched against a block of the same class because its own skip carried no gradient).
        note: anything unusual, e.g. ``"skip carries no gradient"``.
    """

    name: str
    module: str
    kind: str
    index: int
    skip: str
    found: str
    note: str = ""

    def __str__(self) -> str:
        skip = self.skip or "-"
        note = f"  ({self.note})" if self.note else ""
        return f"{self.index:>4}  {self.name:<28} {self.kind:<10} {skip}{note}"


class Blocks(list):
    """A list of :class:`Block` that prints as a table (followed by the flow status, when known)."""

    status: FlowStatus | None = None

    def __str__(self) -> str:
        lines = []
        if self:
            lines.append(f"{'idx':>4}  {'name':<28} {'kind':<10} skip path (fork > merge)")
            lines.extend(str(b) for b in self)
        if self.status is not None:
            lines.append(f"block flow: {self.status}")
        elif not self:
            lines.append("no residual blocks found")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.__str__()


@dataclass(frozen=True)
class FlowStatus:
    """Whether block flow is being measured, and if not, why.

    ``state`` is one of ``"off"`` (``blocks=None``), ``"waiting"`` (no training forward on a logging step
    yet), ``"ok"``, ``"partial"`` (some regions cannot be measured: ``unavailable`` lists them),
    ``"unavailable"`` (nothing can be measured) or ``"none"`` (no residual merge in the model).
    """

    state: str
    reason: str
    blocks: int = 0
    unavailable: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        return self.state in ("ok", "partial")

    def __str__(self) -> str:
        return f"{self.state}: {self.reason}"


@dataclass
class FlowBatch:
    """On-device norms of one logging step: ``values[4*i : 4*i+4]`` = grad_out, grad_in, skip, branch of
    ``names[i]`` (NaN where a hook never fired)."""

    names: list[str]
    values: torch.Tensor
    step: int | None = None  # the step the probe was armed for (``step()`` at the first hooked forward)


def flow_metrics(norms: np.ndarray) -> dict[str, np.ndarray]:
    """The six :data:`FLOW_METRICS` from an ``(n, 4)`` array of norms (grad_out, grad_in, skip, branch)."""
    norms = np.asarray(norms, dtype=np.float64).reshape(-1, 4)
    out, inp, skip, branch = norms.T
    return {
        "grad_out": out,
        "grad_in": inp,
        "skip_grad": skip,
        "branch_grad": branch,
        "skip_share": safe_ratio(skip * skip, skip * skip + branch * branch),
        "transmission": safe_ratio(inp, out),
    }


def summary(history: pd.DataFrame, step: int | None = None, how: str = "median") -> pd.DataFrame:
    """One row per block, one column per flow metric, from a ``Monitor.history()`` frame.

    ``step``: the values of that logging step; otherwise ``how`` (``"median"``, ``"mean"``, ``"first"``,
    ``"last"``, ``"min"``, ``"max"``) over all logged steps. Rows keep the depth order the blocks were logged
    in. Empty frame when the history holds no block metrics.

    >>> flow.summary(mon.history())[["skip_share", "transmission"]]   # doctest: +SKIP
    """
    rows = history[history.metric.isin(FLOW_METRICS)]
    if step is not None:
        rows = rows[rows.step == step]
    if rows.empty:
        return pd.DataFrame(columns=list(FLOW_METRICS), dtype=float)
    order = list(dict.fromkeys(rows.name))
    if how not in ("median", "mean", "first", "last", "min", "max"):
        raise ValueError(f"how must be median, mean, first, last, min or max, got {how!r}")
    table = rows.sort_values("step", kind="stable").groupby(["name", "metric"], sort=False).value.agg(how)
    table = table.unstack("metric").reindex(index=order, columns=list(FLOW_METRICS))
    table.index.name = "block"
    table.columns.name = None
    return table


def share_table(histories: dict[str, pd.DataFrame], metric: str = "skip_share", how: str = "median") -> str:
    """A text table of one flow metric per block (rows, depth order) for several runs (columns).

    ``histories`` maps a run label to its ``Monitor.history()``; runs without blocks (a plain net) show
    ``-``. Meant for printouts such as the demo's:

    >>> print(flow.share_table({"postact": h1, "preact": h2, "broken_skip": h3}))   # doctest: +SKIP
    """
    if metric not in FLOW_METRICS:
        raise ValueError(f"metric must be one of {FLOW_METRICS}, got {metric!r}")
    columns = {label: summary(h, how=how)[metric] for label, h in histories.items()}
    rows: list[str] = []
    for col in columns.values():
        rows.extend(n for n in col.index if n not in rows)
    width = max([5] + [len(r) for r in rows])
    head = f"{'block':<{width}}" + "".join(f" {label:>12}" for label in columns)
    lines = [head]
    for r in rows:
        cells = []
        for col in columns.values():
            v = col.get(r, np.nan)
            cells.append(f" {'-':>12}" if not np.isfinite(v) else f" {v:>12.3g}")
        lines.append(f"{r:<{width}}" + "".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- hooks
def _norm(g: torch.Tensor) -> torch.Tensor:
    if g.dtype == torch.float64:
        return torch.linalg.vector_norm(g)
    return torch.linalg.vector_norm(g, dtype=torch.float32)


class _Slot:
    """The four norms of one merge on one step, filled by autograd hooks (first backward wins)."""

    __slots__ = ("norms", "sums", "left", "fork_nr", "on_error", "keep", "vectors")

    def __init__(self, n_skip: int, n_branch: int, dead: bool, fork_nr: int, on_error, keep: bool) -> None:
        self.norms: list[Any] = [None, None, 0.0 if dead else None, None]
        self.sums: list[Any] = [None, None]
        self.left = [n_skip, n_branch]
        self.fork_nr = fork_nr
        self.on_error = on_error
        self.keep = keep
        self.vectors: dict[str, torch.Tensor] | None = {} if keep else None

    def _add(self, role: int, g: torch.Tensor | None, known: torch.Tensor | None) -> None:
        if self.left[role] <= 0:
            return  # complete already (a second backward through a retained graph)
        if self.keep and g is not None:
            key = ("skip", "branch")[role]
            self.vectors[key] = g.detach().clone() if key not in self.vectors else self.vectors[key] + g
        if self.left[role] == 1 and self.sums[role] is None:
            self.norms[_SKIP + role] = known if known is not None else (0.0 if g is None else _norm(g))
            self.left[role] = 0
            return
        if g is not None:
            self.sums[role] = g if self.sums[role] is None else self.sums[role] + g
        self.left[role] -= 1
        if self.left[role] == 0:
            self._close(role)

    def _close(self, role: int) -> None:
        s = self.sums[role]
        self.norms[_SKIP + role] = 0.0 if s is None else _norm(s)
        self.sums[role] = None
        self.left[role] = 0

    def finish(self) -> None:
        """Every consumer that will fire has fired (the fork ran, or the step is over)."""
        for role in (0, 1):
            if self.left[role] > 0 and (self.sums[role] is not None or self.norms[_IN] is not None):
                self._close(role)


def _on_node(slot: _Slot, edges: tuple[tuple[int, int], ...], want_out: bool, grad_inputs, grad_outputs) -> None:
    try:
        known = None
        if want_out:
            g0 = grad_outputs[0]
            if slot.norms[_OUT] is None:
                slot.norms[_OUT] = 0.0 if g0 is None else _norm(g0)
                if slot.keep and g0 is not None:
                    slot.vectors["out"] = g0.detach().clone()
            known = slot.norms[_OUT]
        for edge, role in edges:
            g = grad_inputs[edge]
            # alpha=1 adds pass dL/dy itself to the operand: reuse its norm
            slot._add(role, g, known if (want_out and g is not None and g is grad_outputs[0]) else None)
    except Exception as err:  # never raise into autograd
        slot.on_error(err)


def _on_fork(slot: _Slot, also: tuple[_Slot, ...], grad_outputs) -> None:
    """Pre-hook on the fork: dL/dx. ``also``: slots whose merge output is this fork (pre-activation nets: one
    block's merge feeds the next), given the same norm as their ``grad_out`` instead of computing it twice."""
    try:
        if slot.norms[_IN] is None:
            g = grad_outputs[slot.fork_nr] if slot.fork_nr < len(grad_outputs) else None
            slot.norms[_IN] = 0.0 if g is None else _norm(g)
            if slot.keep and g is not None:
                slot.vectors["in"] = g.detach().clone()
            for other in also:
                if other.norms[_OUT] is None:
                    other.norms[_OUT] = slot.norms[_IN]
                    if other.keep and g is not None:
                        other.vectors["out"] = slot.vectors["in"]
        slot.finish()
    except Exception as err:
        slot.on_error(err)


# ---------------------------------------------------------------------------------------------- probe
@dataclass
class _Entry:
    """A merge the probe knows: where it is (pattern) and how it is presented (block)."""

    pattern: MergePattern
    block: Block
    key: tuple  # sort key for the depth index


class _Session:
    """Hooks and values of one logging step. Holds no graph node once its hooks are registered."""

    def __init__(self, step: int | None, number: int, discovery_only: bool = False) -> None:
        self.step = step
        self.number = number
        self.discovery_only = discovery_only
        self.inputs: dict[int, list[Any]] = {}  # module id -> stack of input nodes (during its forward)
        self.claimed: set[int] = set()
        self.rejected: set[int] = set()
        self.armed: dict[int, bool] = {}  # module id -> armed by a training-mode forward
        self.slots: dict[int, list[tuple[_Entry, _Slot]]] = {}
        self.handles: dict[int, list[Any]] = {}
        self.examined: list[int] = []
        self.order: dict[int, int] = {}  # module id -> position of its first completed call (depth order)
        self.merges: dict[int, _Slot] = {}  # id of an armed merge node -> its slot

    def disarm(self, mid: int) -> None:
        for h in self.handles.pop(mid, ()):
            h.remove()
        self.slots.pop(mid, None)

    def close(self) -> None:
        for mid in list(self.handles):
            self.disarm(mid)
        self.slots.clear()
        self.inputs.clear()
        self.claimed.clear()
        self.rejected.clear()
        self.merges.clear()


def _check_member(model: nn.Module, module: Any, arg: str) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{arg} must hold nn.Module instances, got {type(module).__name__}")
    if not any(m is module for m in model.modules()):
        raise ValueError(f"{arg}: {type(module).__name__} is not a submodule of the monitored model")


def check_blocks(model: nn.Module, blocks: Any) -> list[nn.Module] | None:
    """Validate a ``blocks=`` argument: None for ``"auto"``, else the list of modules (all in ``model``)."""
    if isinstance(blocks, str):
        if blocks != "auto":
            raise ValueError(f"blocks must be 'auto', None or a list of modules, got {blocks!r}")
        return None
    if isinstance(blocks, nn.Module):
        raise TypeError("blocks must be 'auto', None or a list of modules; wrap a single module in a list")
    try:
        mods = list(blocks)
    except TypeError:
        raise TypeError(f"blocks must be 'auto', None or a list of modules, got {type(blocks).__name__}") from None
    for m in mods:
        _check_member(model, m, "blocks")
    return mods


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    return [t for t in torch.utils._pytree.tree_leaves(obj) if isinstance(t, torch.Tensor)]


def _out_nodes(output: Any) -> list[Any]:
    return [t.grad_fn for t in _tensors(output)]


class FlowProbe:
    """Finds the residual merges of ``model`` and measures their gradient split on logging steps.

    Normally created by :class:`~gradwatch.Monitor` (``blocks=``); usable alone::

        probe = FlowProbe(model, is_logging=lambda: True, step=lambda: step)
        loss.backward(); batch = probe.collect()   # norms on device, or None
        host = batch.values.cpu().numpy(); flow_metrics(host)

    Args:
        model: the network.
        blocks: ``"auto"`` (find merges in every module), or modules of ``model`` to watch (each may hold
            several merges; discovery rules are relaxed for them: no parameter needed on the branch, and a
            skip without gradient is reported as such).
        is_logging: returns whether the step in progress logs (checked at every block forward).
        step: returns the current step number (tells one logging step's forwards from the next's).
        on_error: receives exceptions raised inside the probe's hooks (default: re-raise).
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: str | Iterable[nn.Module] = "auto",
        *,
        is_logging: Callable[[], bool],
        step: Callable[[], int],
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.model = model
        self._is_logging = is_logging
        self._step = step
        self._on_error = on_error
        self._explicit: dict[int, str | None] = {}
        mods = check_blocks(model, blocks)
        self.auto = mods is None
        for m in mods or ():
            self._explicit[id(m)] = None
        #: Debugging aid (tests): keep the gradient vectors of the last measured step in :attr:`vectors`.
        #: Holds activation-sized tensors; leave off in training.
        self.keep_vectors = False
        self.vectors: dict[str, dict[str, torch.Tensor]] = {}
        self._entries: dict[int, list[_Entry]] = {}
        self._modules: dict[int, nn.Module] = {}
        self._names: dict[int, str] = {}
        self._exam: dict[int, tuple[int, int]] = {}  # examined module id -> (session, completion order)
        self._plain: dict[int, nn.Module] = {}  # examined, no merge: candidates for sibling matching
        self._disc_handles: dict[int, tuple[Any, Any]] = {}
        self._arm_handles: dict[int, Any] = {}
        self._mismatches: dict[int, int] = {}
        self._compiled: list[str] = []
        self._compiled_seen: set[str] = set()
        self._root_compiled = _is_compiled(model)
        self._session: _Session | None = None
        self._sessions = 0
        self._discovered_once = False
        self._silent_steps = 0
        self._seen = False  # a hook of ours ran (eagerly) since the last collect
        self._announced = False
        self._warned: set[str] = set()
        self._signature: tuple[int, ...] = ()
        self._closed = False
        self._index: list[_Entry] = []
        self._constants: dict[tuple, torch.Tensor] = {}
        self._scripted: list[str] = []  # TorchScript modules: forward hooks cannot be registered on them
        if self._root_compiled:
            self._warn_once(
                "root-compiled",
                "gradwatch: block flow is unavailable: the model is compiled with torch.compile, so its backward "
                "is one CompiledFunctionBackward node per graph and no residual merge can be seen or split. "
                "Parameter metrics are unaffected. To measure block flow, monitor the uncompiled model (e.g. a "
                "short diagnostic run) or compile only modules you do not need to watch.",
            )
            return
        self._refresh_modules()

    # ------------------------------------------------------------------ public
    def describe(self) -> Blocks:
        """The blocks found so far, in depth order."""
        blocks = Blocks(e.block for e in self._index)
        blocks.status = self.status
        return blocks

    @property
    def status(self) -> FlowStatus:
        n = len(self._index)
        compiled = tuple(self._compiled)
        if self._closed and not n:
            return FlowStatus("off", "the monitor is closed")
        if self._root_compiled:
            return FlowStatus(
                "unavailable",
                "the model is compiled with torch.compile: its autograd graph cannot be walked "
                "(CompiledFunctionBackward); parameter metrics continue",
                0,
                (ROOT_NAME,),
            )
        if self._silent_steps >= 3:
            return FlowStatus(
                "unavailable",
                f"no forward of the model ran gradwatch's hooks on the last {self._silent_steps} logging steps "
                "(compiled with torch.compile after the Monitor was attached?)",
            )
        if not self._discovered_once:
            return FlowStatus("waiting", "no training forward pass on a logging step yet")
        if compiled:
            why = "compiled with torch.compile (CompiledFunctionBackward cannot be walked): " + ", ".join(compiled)
            if n:
                return FlowStatus("partial", f"{n} blocks measured; not measurable: {why}", n, compiled)
            return FlowStatus("unavailable", why, 0, compiled)
        if n:
            kinds = pd.Series([e.block.kind for e in self._index]).value_counts()
            text = ", ".join(f"{k}: {v}" for k, v in kinds.items())
            return FlowStatus("ok", f"{n} residual merges ({text})", n)
        return FlowStatus("none", "no residual merge found (an add whose operands both come from one tensor)")

    def watch(self, module: nn.Module, name: str | None = None) -> None:
        """Measure ``module``'s residual merges under ``name`` (default: its qualified name).

        Discovery rules are relaxed for it (see :class:`FlowProbe`). Found on the next logging step.
        """
        _check_member(self.model, module, "module")
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError("name must be a non-empty str")
        mid = id(module)
        self._explicit[mid] = name
        if self._root_compiled:
            return
        if mid in self._entries and not name:
            return
        if mid in self._entries:
            self._set_entries(module, [e.pattern for e in self._entries[mid]], [e.key for e in self._entries[mid]],
                              [e.block.found for e in self._entries[mid]])
            return
        self._plain.pop(mid, None)
        self._exam.pop(mid, None)
        self._add_discovery(module)

    def collect(self) -> FlowBatch | None:
        """End the logging step: remove its hooks and return the norms measured (None if nothing armed)."""
        sess, self._session = self._session, None
        if self._closed or self._root_compiled:
            if sess is not None:
                sess.close()
            return None
        seen, self._seen = self._seen, False
        if sess is None:
            if seen:  # forwards ran, none on a logging step (e.g. an integration's trigger said no)
                self._silent_steps = 0
                return None
            if self._discovered_once and not self._index and not self._compiled:
                return None  # discovery ran and found no residual merge (a plain net): nothing to hear from
            self._silent_steps += 1
            if self._silent_steps == 3:
                self._warn_once("silent", "gradwatch: block flow is unavailable: " + self.status.reason)
            return None
        self._silent_steps = 0
        try:
            self._end_of_session(sess)
            return self._gather(sess)
        finally:
            sess.close()

    def record(self, step: int, batch: FlowBatch, host: np.ndarray, record: Callable[..., None]) -> None:
        """Turn one batch's host norms into :data:`FLOW_METRICS` and hand each to ``record``."""
        for metric, values in flow_metrics(host).items():
            record(step, batch.names, metric, values, None)

    @torch.no_grad()
    def _restore(self, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for buf, value in saved:
            buf.copy_(value)

    def discover(self, *args: Any, **kwargs: Any) -> Blocks:
        """Find the blocks now with one training-mode forward on example inputs.

        Buffers (BatchNorm statistics), train/eval flags and the RNG state are left as they were; no
        gradient is computed.
        """
        if self._root_compiled:
            return self.describe()
        saved = [(b, b.detach().clone()) for b in self.model.buffers()]
        modes = [(m, m.training) for m in self.model.modules()]
        prev, self._session = self._session, None
        self._sessions += 1
        self._session = _Session(None, self._sessions, discovery_only=True)
        self._forced = True
        try:
            self.model.train()  # the graph of training (dropout, batch statistics) is the one to match later
            with torch.random.fork_rng(), torch.enable_grad():
                self.model(*args, **kwargs)
            self._end_of_session(self._session)
        finally:
            self._forced = False
            self._session.close()
            self._session = prev
            self._restore(saved)
            for m, mode in modes:
                m.training = mode
        return self.describe()

    def close(self) -> None:
        """Remove every hook."""
        self._closed = True
        if self._session is not None:
            self._session.close()
            self._session = None
        for pre, post in self._disc_handles.values():
            pre.remove()
            post.remove()
        self._disc_handles.clear()
        for h in self._arm_handles.values():
            h.remove()
        self._arm_handles.clear()

    # ------------------------------------------------------------------ module bookkeeping
    _forced = False

    def _refresh_modules(self) -> None:
        """(Re)scan the module tree: name modules, hook new ones for discovery, forget removed ones."""
        named = list(self.model.named_modules(remove_duplicate=True))
        self._signature = tuple(id(m) for _, m in named)
        present = {id(m) for _, m in named}
        self._names = {id(m): (clean_name(n) or ROOT_NAME) for n, m in named}
        self._modules = {id(m): m for _, m in named}
        for store in (self._entries, self._plain, self._exam, self._explicit):
            for mid in [k for k in store if k not in present]:
                store.pop(mid)
        for mid in [k for k in self._disc_handles if k not in present]:
            for h in self._disc_handles.pop(mid):
                h.remove()
        for mid in [k for k in self._arm_handles if k not in present]:
            self._arm_handles.pop(mid).remove()
        inside_compiled: set[int] = set()
        compiled_names = []
        for name, m in named:
            if id(m) in inside_compiled:
                continue
            if _is_compiled(m):
                compiled_names.append(clean_name(name) or ROOT_NAME)
                # hooks inside compiled code would be traced (or ignored): hook only an OptimizedModule wrapper
                inside_compiled.update(id(c) for c in m.modules() if c is not m or not isinstance(m, _OptimizedModule))
        for cname in compiled_names:
            self._note_compiled(cname)
        scripted = [clean_name(name) or ROOT_NAME for name, m in named if _is_scripted(m)]
        watched = self._modules if self.auto else {mid: self._modules[mid] for mid in self._explicit}
        for mid, m in watched.items():
            if mid in inside_compiled or mid in self._exam or mid in self._entries or _is_scripted(m):
                continue
            self._add_discovery(m)
        self._note_scripted(scripted)
        self._reindex()

    def _note_scripted(self, names: Sequence[str]) -> None:
        """Say once which TorchScript submodules are not watched (they accept no forward hooks)."""
        new = [n for n in names if n not in self._scripted and not any(n.startswith(s + ".") for s in names)]
        if new:
            self._scripted.extend(new)
            self._warn_once(
                "scripted-" + ",".join(new),
                "gradwatch: TorchScript modules accept no forward hooks, so block flow does not watch them as "
                f"blocks: {', '.join(new)} (a merge inside one may be found by the enclosing module and named after "
                "it). Other blocks and all parameter metrics are measured.",
            )

    def _add_discovery(self, module: nn.Module) -> None:
        mid = id(module)
        if mid in self._disc_handles:
            return
        if _is_scripted(module):
            self._note_scripted([self._names.get(mid, ROOT_NAME)])
            return
        pre = module.register_forward_pre_hook(self._disc_pre, with_kwargs=True)
        post = module.register_forward_hook(self._disc_post, with_kwargs=True)
        self._disc_handles[mid] = (pre, post)

    def _drop_discovery(self, mid: int) -> None:
        handles = self._disc_handles.pop(mid, None)
        if handles:
            for h in handles:
                h.remove()

    def _add_arming(self, module: nn.Module) -> None:
        if id(module) not in self._arm_handles:
            self._arm_handles[id(module)] = module.register_forward_hook(self._arm_hook)

    def _note_compiled(self, name: str) -> None:
        if name not in self._compiled_seen:
            self._compiled_seen.add(name)
            self._compiled.append(name)

    def _set_entries(self, module: nn.Module, patterns: Sequence[MergePattern], keys: Sequence[tuple],
                     found: Sequence[str]) -> None:
        mid = id(module)
        base = self._explicit.get(mid) or self._names.get(mid, ROOT_NAME)
        many = len(patterns) > 1
        entries = []
        for i, (p, key, how) in enumerate(zip(patterns, keys, found)):
            note = "skip carries no gradient" if p.dead or how == "sibling" else ""
            block = Block(
                name=f"{base}[{i}]" if many else base,
                module=self._names.get(mid, ROOT_NAME),
                kind=p.kind,
                index=-1,
                skip=p.skip_ops,
                found=how,
                note=note,
            )
            entries.append(_Entry(p, block, key))
        if entries:
            self._entries[mid] = entries
            self._plain.pop(mid, None)
            self._add_arming(module)
        else:
            self._entries.pop(mid, None)
        self._harmonize()
        self._reindex()

    def _harmonize(self) -> None:
        """Name merges alike across modules of one class: a transformer layer whose attention residual has no
        gradient (its input needs none) still calls its MLP residual ``layers.0[1]``, like its siblings."""
        by_class: dict[type, list[int]] = {}
        for mid in self._entries:
            if mid in self._modules:
                by_class.setdefault(type(self._modules[mid]), []).append(mid)
        for mids in by_class.values():
            ref = max(mids, key=lambda m: len(self._entries[m]))
            where = [(e.pattern.out_index, e.pattern.to_merge) for e in self._entries[ref]]
            if len(where) < 2:
                continue
            for mid in mids:
                entries = self._entries[mid]
                if len(entries) == len(where) or self._explicit.get(mid):
                    continue
                spots = [(e.pattern.out_index, e.pattern.to_merge) for e in entries]
                if not all(s in where for s in spots) or len(set(spots)) != len(spots):
                    continue
                base = self._names.get(mid, ROOT_NAME)
                for e, spot in zip(entries, spots):
                    e.block = dataclasses.replace(e.block, name=f"{base}[{where.index(spot)}]")

    def _reindex(self) -> None:
        entries = sorted((e for es in self._entries.values() for e in es), key=lambda e: e.key)
        for i, e in enumerate(entries):
            if e.block.index != i:
                e.block = dataclasses.replace(e.block, index=i)
        self._index = entries

    # ------------------------------------------------------------------ sessions
    def _open(self) -> _Session | None:
        """The session of the step in progress (opened at the first hooked forward of a logging step)."""
        sess = self._session
        if self._forced:
            return sess
        step = self._step()
        if sess is not None and sess.step == step:
            return sess
        if sess is not None:
            sess.close()  # a logging step whose measurement never came: drop it
        self._sessions += 1
        sess = self._session = _Session(step, self._sessions)
        if self.auto and tuple(id(m) for m in self.model.modules()) != self._signature:
            self._refresh_modules()
        return sess

    def _end_of_session(self, sess: _Session) -> None:
        """After a session's forwards: announce what discovery found, queue sibling candidates."""
        if not sess.examined:
            return
        self._discovered_once = True
        classes = {type(self._modules[mid]) for mid in self._entries if mid in self._modules}
        for mid, m in list(self._plain.items()):
            if type(m) in classes:
                self._add_arming(m)  # try a sibling's pattern on its next logging forward
        if self._compiled:
            self._warn_once(
                "compiled",
                "gradwatch: block flow is unavailable inside modules compiled with torch.compile "
                f"({', '.join(self._compiled)}): their backward is a CompiledFunctionBackward node that cannot be "
                "walked. Other blocks and all parameter metrics are measured.",
            )
        if not self._announced:
            self._announced = True
            status = self.status
            log.info("gradwatch: block flow: %s", status)

    def _gather(self, sess: _Session) -> FlowBatch | None:
        rows = []
        for mid, pairs in sess.slots.items():
            for entry, slot in pairs:
                slot.finish()
                rows.append((entry.block.index, entry.block.name, slot))
        if not rows:
            return None
        rows.sort(key=lambda r: r[0])
        flat = [v for _, _, slot in rows for v in slot.norms]
        tensors = [v for v in flat if isinstance(v, torch.Tensor)]
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        device = tensors[0].device if tensors else torch.device("cpu")
        parts = []
        for v in flat:
            if isinstance(v, torch.Tensor):
                parts.append(v.to(device=device, dtype=dtype))
            else:  # a hook that never fired (NaN) or a dead path (0.0): cached constants, no copy per value
                parts.append(self._constant(float("nan") if v is None else float(v), device, dtype))
        if self.keep_vectors:
            self.vectors = {name: dict(slot.vectors or {}) for _, name, slot in rows}
        return FlowBatch([name for _, name, _ in rows], torch.stack(parts), sess.step)

    def _constant(self, value: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A 0-d tensor holding ``value`` on ``device``, built (one host-to-device copy) once per value."""
        key = (repr(value), device, dtype)
        t = self._constants.get(key)
        if t is None:
            t = self._constants[key] = torch.tensor(value, dtype=dtype).to(device)
        return t

    # ------------------------------------------------------------------ hooks (run inside the user's forward)
    def _live(self) -> bool:
        return not self._closed and (self._forced or self._is_logging())

    def _error(self, err: BaseException) -> None:
        if self._on_error is None:
            raise err
        self._on_error(err)

    def _disc_pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if _compiling():
            return
        self._seen = True
        if not self._live():
            return
        try:
            sess = self._open()
            if sess is None:
                return
            stack = sess.inputs.setdefault(id(module), [])
            if not torch.is_grad_enabled():
                stack.append(None)
                return
            nodes = [boundary_node(t) for t in _tensors((args, kwargs))]
            stack.append([n for n in nodes if n is not None])
        except Exception as err:
            self._error(err)

    def _disc_post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if _compiling() or not self._live():
            return
        try:
            sess = self._session
            if sess is None:
                return
            sess.order.setdefault(id(module), len(sess.order))  # also under no_grad (reentrant checkpoint)
            stack = sess.inputs.get(id(module))
            if not stack:
                return
            boundary = stack.pop()
            if boundary is None or not torch.is_grad_enabled():
                return
            outs = _out_nodes(output)
            if not any(o is not None for o in outs):
                return
            mid = id(module)
            if mid in self._disc_handles:
                self._discover(module, outs, boundary, sess)
            if mid in self._entries:
                self._arm_module(module, outs, sess)
        except Exception as err:
            self._error(err)

    def _arm_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if _compiling():
            return
        self._seen = True
        if not self._live():
            return
        try:
            if not torch.is_grad_enabled() or id(module) in self._disc_handles:
                return  # a module waiting for (re)discovery is handled by its discovery hook
            sess = self._open()
            if sess is not None:
                self._arm_module(module, _out_nodes(output), sess)
        except Exception as err:
            self._error(err)

    # ------------------------------------------------------------------ discovery and arming
    def _discover(self, module: nn.Module, outs: list[Any], boundary: list[Any], sess: _Session) -> None:
        mid = id(module)
        self._drop_discovery(mid)
        g = Graph(outs, boundary)
        if g.truncated:
            log.info("gradwatch: %s: autograd graph too large to walk; flow not measured there", self._names.get(mid))
        explicit = mid in self._explicit
        found = find_merges(g, sess.claimed, sess.rejected, relaxed=explicit)
        if explicit and not found:
            found = find_dead_merges(g, sess.claimed, [])
        if g.compiled and not found:
            name = self._names.get(mid, ROOT_NAME)
            inner = name == ROOT_NAME or any(c.startswith(name + ".") for c in self._compiled)
            if not (inner and self._compiled):
                self._note_compiled(name)  # only the innermost module around a compiled region
        self._exam[mid] = (sess.number, sess.order.get(mid, len(sess.order)))
        sess.examined.append(mid)
        del g
        old = [e.key for e in self._entries.get(mid, ())]
        if found:
            how = "watch" if explicit else "auto"
            keys = old if len(old) == len(found) else [self._exam[mid] + (f[1],) for f in found]
            self._set_entries(module, [f[0] for f in found], keys, [how] * len(found))
            return
        if old:  # rediscovered: no merge any more
            self._set_entries(module, [], [], [])
            handle = self._arm_handles.pop(mid, None)
            if handle is not None:
                handle.remove()
        if self._adopt_sibling(module, outs, sess):
            return
        if explicit:
            self._warn_once(
                f"nomerge-{mid}",
                f"gradwatch: watched module {self._names.get(mid)} has no residual merge in its forward "
                "(an add of two tensors computed from one input); nothing is measured for it",
            )
        self._plain[mid] = module

    def _adopt_sibling(self, module: nn.Module, outs: list[Any], sess: _Session) -> bool:
        """A module with no live merge, of the same class as a block: is it a block whose skip is dead?"""
        mid = id(module)
        seen = set()
        for other, entries in list(self._entries.items()):
            if other == mid or type(self._modules.get(other)) is not type(module):
                continue
            for e in entries:
                if e.pattern in seen:
                    continue
                seen.add(e.pattern)
                r = resolve(e.pattern, outs)
                if isinstance(r, Resolved) and r.dead:
                    key = self._exam.get(mid, (sess.number, len(sess.order))) + (0,)
                    # what the skip was before it was cut off is not in the graph: its kind is unknown
                    dead = dataclasses.replace(e.pattern, kind="other", skip_ops="")
                    self._set_entries(module, [dead], [key], ["sibling"])
                    log.info("gradwatch: %s: residual block whose skip carries no gradient (matched to %s)",
                             self._names.get(mid), e.block.name)
                    return True
        return False

    def _arm_module(self, module: nn.Module, outs: list[Any], sess: _Session) -> None:
        mid = id(module)
        entries = self._entries.get(mid)
        if entries is None:
            if mid in self._plain and not sess.discovery_only:
                if not self._adopt_sibling(module, outs, sess):
                    self._plain.pop(mid, None)  # not a dead block: stop trying
                    handle = self._arm_handles.pop(mid, None)
                    if handle is not None:
                        handle.remove()
                    return
                entries = self._entries[mid]
            else:
                return
        prev = sess.armed.get(mid)
        if prev is not None:
            if torch._C._current_graph_task_id() != -1:
                return  # activation-checkpoint recompute: the original forward's graph is measured
            if prev and not module.training:
                return  # an eval-mode forward does not replace a training one
        results = [resolve(e.pattern, outs) for e in entries]
        results = [None if e.block.found == "sibling" and isinstance(r, Resolved) and not r.dead else r
                   for e, r in zip(entries, results)]  # a skip that came back is rediscovered as what it is
        if any(r is None for r in results):
            self._mismatch(module)
        live = [(e, r) for e, r in zip(entries, results) if isinstance(r, Resolved)]
        for _, r in live:
            sess.claimed.add(id(r.merge))
        if not live or sess.discovery_only:
            return
        sess.disarm(mid)
        sess.armed[mid] = module.training
        handles: list[Any] = []
        pairs = []
        for entry, r in live:
            slot = self._hook(r, handles, sess)
            pairs.append((entry, slot))
        sess.slots[mid] = pairs
        sess.handles[mid] = handles

    def _hook(self, r: Resolved, handles: list[Any], sess: _Session) -> _Slot:
        n_skip = sum(1 for _, _, s in r.consumers if s)
        n_branch = len(r.consumers) - n_skip
        slot = _Slot(n_skip, n_branch, r.dead, r.fork_nr, self._error, self.keep_vectors)
        groups: dict[int, tuple[Any, list[tuple[int, int]]]] = {id(r.merge): (r.merge, [])}
        for node, edge, is_skip in r.consumers:
            groups.setdefault(id(node), (node, []))[1].append((edge, 0 if is_skip else 1))
        for nid, (node, edges) in groups.items():
            want_out = nid == id(r.merge)
            handles.append(node.register_hook(partial(_on_node, slot, tuple(edges), want_out)))
        prev = sess.merges.get(id(r.fork)) if r.fork_nr == 0 else None
        sess.merges[id(r.merge)] = slot
        handles.append(r.fork.register_prehook(partial(_on_fork, slot, (prev,) if prev is not None else ())))
        return slot

    def _mismatch(self, module: nn.Module) -> None:
        mid = id(module)
        count = self._mismatches.get(mid, 0) + 1
        self._mismatches[mid] = count
        name = self._names.get(mid)
        if count > _MAX_REDISCOVERIES:
            self._warn_once(f"unstable-{mid}", f"gradwatch: {name}: the autograd graph keeps changing shape; "
                            "its residual merges are no longer rediscovered")
            return
        log.debug("gradwatch: %s: graph changed; rediscovering its merges on the next logging step", name)
        self._exam.pop(mid, None)
        self._add_discovery(module)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)


# ---------------------------------------------------------------------------------------------- inspect
def load_factory(spec: str, kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, tuple]:
    """Build ``(model, example_args)`` from ``"package.module:factory"`` or ``"path/to/file.py:factory"``.

    ``factory`` (dotted attributes allowed) is a model, or a callable called with ``kwargs`` returning a
    model or ``(model, example_input)``. Without an example, ``example_args`` is empty.
    """
    import importlib
    import importlib.util
    import os
    import sys

    where, sep, attr = spec.partition(":")
    if not sep or not where or not attr:
        raise ValueError(f"expected MODULE:FACTORY (e.g. gradwatch.blocks:resnet), got {spec!r}")
    if where.endswith(".py") or os.sep in where:
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise ValueError(f"no such file: {where}")
        module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(where)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise ValueError(f"{spec} is neither a model nor a callable that builds one")
        obj = obj(**(kwargs or {}))
    elif kwargs:
        raise ValueError(f"{spec} is a model instance: it takes no arguments")
    example: tuple = ()
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], nn.Module):
        obj, ex = obj
        example = tuple(ex) if isinstance(ex, (tuple, list)) else (ex,)
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{spec} returned {type(obj).__name__}, not an nn.Module")
    return obj, example


def inspect(
    spec: str, input_shape: Sequence[int] | None = None, kwargs: dict[str, Any] | None = None
) -> tuple[Blocks, FlowStatus]:
    """The blocks of the model a factory builds, found with one training-mode forward (``gradwatch inspect``).

    The example input is, in order: ``input_shape`` (``torch.randn``), what the factory returned beside the
    model, or the model's ``example_input_array`` (Lightning's convention).
    """
    model, example = load_factory(spec, kwargs)
    if input_shape:
        example = (torch.randn(*input_shape),)
    if not example:
        ex = getattr(model, "example_input_array", None)
        if ex is not None:
            example = tuple(ex) if isinstance(ex, (tuple, list)) else (ex,)
    if not example:
        raise ValueError(
            "no example input: pass --input-shape (e.g. 2,3,32,32), return (model, example_input) from the "
            "factory, or give the model an example_input_array"
        )
    model.train()
    probe = FlowProbe(model, is_logging=lambda: False, step=lambda: 0, on_error=None)
    try:
        blocks = probe.discover(*example)
        return blocks, probe.status
    finally:
        probe.close()
